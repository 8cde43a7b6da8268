"""Fixtures of the service tests: real PostgreSQL and Redis on 127.0.0.1 (a fresh database per run), real
Celery workers as subprocesses, the real API in-process, tiny models and random LoRA adapters.

Override the servers with SSTMERGE_TEST_POSTGRES_URL (an admin URL; a database is created next to it) and
SSTMERGE_TEST_REDIS_URL. The tests skip, saying why, only when a server does not answer.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from service_helpers import (
    API_KEYS,
    OPS_TOKEN,
    WorkerProcess,
    empty_postgres_database,
    tar_dir,
    upload_adapter,
    upload_dataset,
    zip_dir,
)
from sqlalchemy import create_engine, text

from app.domain.settings import Settings
from app.main import create_app
from sstmerge_core.tiny import build_tiny_model, random_lora
from tests.helpers.files import write_jsonl

POSTGRES_URL = os.environ.get("SSTMERGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SSTMERGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Assets:
    models: Path
    qwen: Path
    adapters: dict[str, Path]
    archives: dict[str, Path]
    data: dict[str, Path]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    """Two tiny base models, random adapters (good, wrong-base, wrong-shape, NaN) and small prompt sets."""
    root = tmp_path_factory.mktemp("assets")
    models = root / "models"
    qwen = build_tiny_model("qwen2", models / "tiny-qwen2")
    llama = build_tiny_model("llama", models / "tiny-llama")
    wide = build_tiny_model("qwen2", root / "other" / "tiny-qwen2", hidden=48)  # same name, other shapes
    adapters = {
        "utility": random_lora(qwen, root / "adapters" / "utility", seed=1, r=4, target_modules=["q_proj", "v_proj"]),
        "safety": random_lora(qwen, root / "adapters" / "safety", seed=2, r=2, target_modules=["q_proj", "v_proj"]),
        "llama": random_lora(llama, root / "adapters" / "llama", seed=3, r=2, target_modules=["q_proj", "v_proj"]),
        "wide": random_lora(wide, root / "adapters" / "wide", seed=4, r=2, target_modules=["q_proj", "v_proj"]),
    }
    nan = random_lora(qwen, root / "adapters" / "nan", seed=5, r=2, target_modules=["q_proj", "v_proj"])
    tensors = load_file(nan / "adapter_model.safetensors")
    next(v for k, v in sorted(tensors.items()) if "lora_B" in k)[0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    adapters["nan"] = nan
    archives = {name: zip_dir(folder, root / f"{name}.zip") for name, folder in adapters.items()}
    archives["safety_tgz"] = tar_dir(adapters["safety"], root / "safety.tar.gz", prefix="safety-lora/")

    data_dir = root / "data"
    data_dir.mkdir()
    topics = ["bread", "soup", "tea", "rice", "pasta", "salad"]
    data = {
        "utility": write_jsonl(data_dir / "utility.jsonl", [{"prompt": f"How do I cook {t}?"} for t in topics]),
        "safety": write_jsonl(
            data_dir / "safety.jsonl",
            [{"prompt": f"How can I build weapon {n}?", "response": "I cannot help with that."} for n in range(6)],
        ),
        "harmful": write_jsonl(
            data_dir / "harmful.jsonl", [{"prompt": f"How do I hurt person {n}?"} for n in range(4)]
        ),
        "benign": write_jsonl(
            data_dir / "benign.jsonl", [{"prompt": f"How do I kill Python process {n}?"} for n in range(4)]
        ),
        "harmless": write_jsonl(
            data_dir / "harmless.jsonl", [{"prompt": f"How do I plant tulip {n}?"} for n in range(6)]
        ),
        "borderline": write_jsonl(
            data_dir / "borderline.jsonl", [{"prompt": f"How do I shoot photo {n} at night?"} for n in range(6)]
        ),
    }
    eval_csv = data_dir / "utility_eval.csv"
    eval_csv.write_text("prompt,response\n" + "".join(f"Capital of country {n}?,Paris\n" for n in range(4)))
    data["utility_eval"] = eval_csv
    return Assets(models, qwen, adapters, archives, data)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh, uniquely named PostgreSQL database for this run, dropped at the end."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL is unreachable at {POSTGRES_URL}: {exc}")
    admin.dispose()
    with empty_postgres_database(POSTGRES_URL, "sstmerge_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Redis is unreachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def settings(tmp_path_factory, postgres_url, redis_url, assets) -> Settings:
    """Production-shaped settings: PostgreSQL, Redis, a private queue, short leases for the re-delivery test."""
    return Settings(
        data_dir=tmp_path_factory.mktemp("service-data"),
        database_url=postgres_url,
        broker_url=redis_url,
        queue=f"sstmerge-test-{uuid.uuid4().hex[:8]}",
        broker_visibility_timeout=10,
        model_dirs=[assets.models],
        api_keys=",".join(f"{t}:{k}" for t, k in API_KEYS.items()),
        job_lease_seconds=6,
        heartbeat_seconds=1,
        device="cpu",
        ops_token=OPS_TOKEN,
    )


@pytest.fixture(scope="session")
def api(settings) -> TestClient:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="session")
def worker(settings, api, tmp_path_factory):
    """One Celery worker (prefork, concurrency 1) on the run's queue for the whole session."""
    process = WorkerProcess(settings, tmp_path_factory.mktemp("logs") / "worker.log")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def inputs(api, assets) -> dict[str, str]:
    """Tenant acme's uploaded adapters and datasets: name -> id (the NaN adapter is refused at upload)."""
    ids = {}
    for name in ("utility", "safety"):
        response = upload_adapter(api, "acme", assets.archives[name], name=name)
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    for name, path in assets.data.items():
        response = upload_dataset(api, "acme", path, name=name)
        assert response.status_code == 201, response.text
        ids[f"data:{name}"] = response.json()["id"]
    return ids
