"""Helpers of the service tests: archives, uploads, polling, worker processes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.domain.settings import Settings
from tests.helpers.files import write_jsonl
from tests.helpers.processes import kill_process_group, stop_process_group

API_KEYS = {"acme": "key-acme-7c1f0d2b9e", "globex": "key-globex-4a8e6f3d1c"}
OPS_TOKEN = "ops-token-5b2e9a0c7d"
TERMINAL = {"succeeded", "failed", "cancelled"}


@contextmanager
def empty_postgres_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new, uniquely named database on the server of `server_url` (any database URL of it); dropped on exit."""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[tenant]}"}


def zip_dir(folder: Path, destination: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(destination, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, prefix + path.name)
    return destination


def tar_dir(folder: Path, destination: Path, prefix: str = "") -> Path:
    with tarfile.open(destination, "w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, prefix + path.name)
    return destination


def tar_with(destination: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(destination, "w:gz") as archive:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return destination


def upload_adapter(client, tenant: str, archive: Path, name: str | None = None):
    data = {"name": name} if name else {}
    with archive.open("rb") as handle:
        return client.post("/adapters", headers=auth(tenant), files={"file": (archive.name, handle)}, data=data)


def upload_dataset(client, tenant: str, path: Path, name: str | None = None):
    data = {"name": name} if name else {}
    with path.open("rb") as handle:
        return client.post("/datasets", headers=auth(tenant), files={"file": (path.name, handle)}, data=data)


def upload_merge_inputs(client, assets, tenant: str = "acme") -> dict[str, str]:
    """Upload the utility and safety adapters and data sets of `assets` (the conftest's `Assets`), unnamed and
    unchecked: {"utility": id, "safety": id, "data:utility": id, "data:safety": id}, as `merge_body` takes them."""
    ids = {name: upload_adapter(client, tenant, assets.archives[name]).json()["id"] for name in ("utility", "safety")}
    for name in ("utility", "safety"):
        ids[f"data:{name}"] = upload_dataset(client, tenant, assets.data[name]).json()["id"]
    return ids


def wait_for(client, tenant: str, job_id: str, until=TERMINAL, timeout: float = 240.0, check=None) -> dict:
    """Poll GET /merges/{id} until its status is in `until` (or `check(job)` is true)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/merges/{job_id}", headers=auth(tenant)).json()
        if job["status"] in until or (check is not None and check(job)):
            return job
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            events = client.get(f"/merges/{job_id}/events", headers=auth(tenant)).json()
            raise AssertionError(f"job {job_id} did not reach {until}: {job}\nevents: {events}")
        time.sleep(0.2)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process the same `Settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSTMERGE_")}
    env.update(
        {
            "SSTMERGE_DATA_DIR": str(settings.data_dir),
            "SSTMERGE_QUEUE": settings.queue,
            "SSTMERGE_BROKER_VISIBILITY_TIMEOUT": str(settings.broker_visibility_timeout),
            "SSTMERGE_MODEL_DIRS": ":".join(str(p) for p in settings.model_dirs),
            "SSTMERGE_API_KEYS": ",".join(f"{k.tenant}:{k.key.get_secret_value()}" for k in settings.api_keys),
            "SSTMERGE_JOB_LEASE_SECONDS": str(settings.job_lease_seconds),
            "SSTMERGE_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "SSTMERGE_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
        }
    )
    for name in (  # the knobs the fault tests turn (defaults elsewhere)
        "job_time_limit_seconds",
        "republish_max_seconds",
        "task_max_retries",
        "min_free_bytes",
        "leftover_grace_seconds",
        "input_cache_max_bytes",
        "fisher_cache_max_bytes",
        "webhook_timeout_seconds",
        "webhook_retry_base_seconds",
        "webhook_retry_max_seconds",
        "webhook_max_attempts",
        "webhook_poll_seconds",
    ):
        if name in settings.model_fields_set:
            env[f"SSTMERGE_{name.upper()}"] = str(getattr(settings, name))
    if settings.webhook_allowed_hosts:
        env["SSTMERGE_WEBHOOK_ALLOWED_HOSTS"] = ",".join(settings.webhook_allowed_hosts)
    for name in (
        "database_url",
        "broker_url",
        "storage_backend",
        "s3_bucket",
        "s3_prefix",
        "s3_endpoint_url",
        "s3_region",
    ):
        if (value := getattr(settings, name)) is not None:
            env[f"SSTMERGE_{name.upper()}"] = value
    return env


class WorkerProcess:
    """`sstmerge worker` in its own process group, so that a test can SIGKILL the worker and its pool child."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sstmerge_core.cli", "worker"],
            env=settings_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        kill_process_group(self.proc)
        self._log.close()

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()


SLOW_PARAMS = {"alphas": [0.5, 1.0], "max_samples": 400, "max_length": 64, "continuation_tokens": 32}


def long_data(folder: Path, name: str, rows: int = 400) -> Path:
    """Prompts without responses, so that the sampled utility Fisher generates continuations: with
    `SLOW_PARAMS` the pass takes several seconds on the tiny model. Unique text: no Fisher cache hit."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    return write_jsonl(
        folder / f"{name}.jsonl",
        [{"prompt": f"[{tag}] How do I bake bread number {n} at home today?"} for n in range(rows)],
    )


def merge_body(ids: dict[str, str], **overrides) -> dict:
    """A small SST job on the tiny model (no evaluation unless given)."""
    body = {
        "base_model": "tiny-qwen2",
        "utility_adapters": [{"adapter_id": ids["utility"], "weight": 1.0}],
        "safety_adapter": {"adapter_id": ids["safety"], "weight": 1.0},
        "utility_dataset_id": ids["data:utility"],
        "safety_dataset_id": ids["data:safety"],
        "method": "sst",
        "params": {"alphas": [1.0], "max_samples": 4, "max_length": 32, "batch_size": 4, "continuation_tokens": 4},
    }
    body.update(overrides)
    return body


def error_of(response) -> dict:
    """The body of an error response, checked to be exactly the JSON error shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


def evaluation(inputs, **settings) -> dict:
    """The `evaluation` object of a job on tenant acme's uploaded evaluation sets (short generations)."""
    return {
        "harmful_dataset_id": inputs["data:harmful"],
        "benign_dataset_id": inputs["data:benign"],
        "utility_eval_dataset_id": inputs["data:utility_eval"],
        "max_new_tokens": 4,
        **settings,
    }


def repair_inputs(inputs) -> dict:
    """The repair's harmless and borderline dataset ids of tenant acme's uploads."""
    return {"harmless_dataset_id": inputs["data:harmless"], "borderline_dataset_id": inputs["data:borderline"]}
