"""Units of the service that need no server: settings parsing, safe archive extraction, key hashing,
cursors, safetensors headers."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from app.domain import archives
from app.domain.adapter_files import read_safetensors_header
from app.domain.errors import DomainError
from app.domain.pagination import decode_cursor, encode_cursor
from app.domain.settings import Settings
from app.domain.storage.base import check_key
from app.domain.storage.local import LocalStorage


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SSTMERGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SSTMERGE_MODEL_DIRS", "/a:/b")
    monkeypatch.setenv("SSTMERGE_API_KEYS", "acme:k1,globex:k2,acme:k3")
    monkeypatch.setenv("SSTMERGE_HUB_MODELS", "org/a, org/b")
    settings = Settings()
    assert settings.model_dirs == [Path("/a"), Path("/b")]
    assert [(k.tenant, k.key.get_secret_value()) for k in settings.api_keys] == [
        ("acme", "k1"),
        ("globex", "k2"),
        ("acme", "k3"),
    ]
    assert "k1" not in repr(settings)
    assert settings.hub_models == ["org/a", "org/b"]
    assert settings.resolved_database_url == f"sqlite:///{tmp_path}/sstmerge.db"
    assert settings.resolved_broker_url.startswith("sqla+sqlite:///") and settings.embedded_broker
    monkeypatch.setenv("SSTMERGE_API_KEYS", "no-colon")
    with pytest.raises(ValueError):
        Settings()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/abs", "C:evil", "a\\b"])
def test_extract_refuses_escaping_paths(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(archives.ArchiveError) as error:
        archives.extract(_zip(tmp_path / "a.zip", {"ok.txt": b"1", name: b"x"}), out, max_members=10, max_bytes=100)
    assert error.value.code == "unsafe_archive"
    assert list(out.iterdir()) == []  # nothing left behind, not even the first member


def test_extract_refuses_zip_symlink(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as archive:
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(archives.ArchiveError, match="links"):
        archives.extract(tmp_path / "l.zip", tmp_path, max_members=10, max_bytes=100)


def test_extract_limits_size_even_when_headers_lie(tmp_path):
    path = tmp_path / "t.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for n in range(3):
            info = tarfile.TarInfo(f"f{n}")
            info.size = 60
            archive.addfile(info, io.BytesIO(b"x" * 60))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(archives.ArchiveError) as error:
        archives.extract(path, out, max_members=10, max_bytes=100)
    assert error.value.code == "archive_too_large" and list(out.iterdir()) == []
    assert archives.extract(path, out, max_members=10, max_bytes=1000) == [Path("f0"), Path("f1"), Path("f2")]


def test_safetensors_header_checks_offsets(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    good = tmp_path / "good.safetensors"
    good.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert read_safetensors_header(good)["w"]["shape"] == [2, 2]
    short = tmp_path / "short.safetensors"
    short.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(DomainError, match="truncated"):
        read_safetensors_header(short)


def test_cursor_round_trip_and_garbage():
    from datetime import datetime, timezone

    when = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=timezone.utc)
    assert decode_cursor(encode_cursor(when, "mj_1")) == (when, "mj_1")
    with pytest.raises(DomainError):
        decode_cursor("not-a-cursor")


def test_local_storage_is_confined_and_atomic(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    source = tmp_path / "f"
    source.write_bytes(b"data")
    storage.put_file("a/b/c.bin", source)
    assert storage.size("a/b/c.bin") == 4 and b"".join(storage.iter_bytes("a/b/c.bin")) == b"data"
    assert storage.list("a") == ["a/b/c.bin"]
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]
    for key in ("../x", "/abs", "a/../../x", ""):
        with pytest.raises(ValueError):
            check_key(key)
    storage.delete_prefix("a")
    assert storage.list("a") == [] and storage.size("a/b/c.bin") is None


HUB_CODE = """
import sys
from fastapi.testclient import TestClient
from app.domain.settings import Settings
from app.main import create_app
settings = Settings(data_dir=sys.argv[1], hub_enabled=True, api_keys="acme:k")
with TestClient(create_app(settings)) as client:
    response = client.post("/adapters", headers={"Authorization": "Bearer k"}, json={"source": "hf://org/lora@v1"})
    print(response.status_code, response.json()["error"]["code"])
    print(client.get("/adapters", headers={"Authorization": "Bearer k"}).json()["items"])
"""


def test_hub_adapter_unreachable_is_502(tmp_path):
    """The Hub path is kept even though the Hub is unreachable here: offline, it is a clean 502."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", HUB_CODE, str(tmp_path)], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["502 hub_unavailable", "[]"]


def test_postgres_pool_serves_every_api_thread(postgres_url):
    """FastAPI runs sync endpoints on anyio's 40 worker threads; all 40 can hold a connection at once.
    (With SQLAlchemy's default pool of 5 + 10 the other 25 would wait for a connection and break the barrier.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import text

    from app.domain.db.session import session_scope

    api_threads = 40
    barrier = threading.Barrier(api_threads, timeout=20)

    def hold_connection(_: int) -> int:
        with session_scope(postgres_url) as session:
            value = session.execute(text("SELECT 1")).scalar_one()
            barrier.wait()
        return value

    with ThreadPoolExecutor(api_threads) as pool:
        assert sum(pool.map(hold_connection, range(api_threads))) == api_threads


def test_build_spec_carries_every_evaluation_setting():
    """Each setting of an API evaluation request reaches the worker's EvaluationSpec, ids turned into paths."""
    from app.domain.job_spec import build_spec
    from app.domain.requests import MergeRequest

    settings = {
        "utility_metric": "contains",
        "judge": "keyword",
        "max_new_tokens": 7,
        "limit": 3,
        "batch_size": 5,
        "utility_tolerance": 0.04,
        "over_refusal_tolerance": 0.2,
    }
    body = MergeRequest(
        base_model="tiny",
        utility_adapters=[{"adapter_id": "ad_u"}],
        safety_adapter={"adapter_id": "ad_s", "weight": 0.5},
        utility_dataset_id="ds_u",
        safety_dataset_id="ds_s",
        evaluation={
            "harmful_dataset_id": "ds_h",
            "benign_dataset_id": "ds_b",
            "utility_eval_dataset_id": "ds_e",
            **settings,
        },
    )
    spec = build_spec(body, "/models/tiny", lambda i: f"/adapters/{i}", lambda i: f"/data/{i}.jsonl")
    evaluation = spec.evaluation.model_dump()
    assert {key: evaluation[key] for key in settings} == settings
    assert (spec.evaluation.harmful, spec.evaluation.benign, spec.evaluation.utility_eval) == (
        "/data/ds_h.jsonl",
        "/data/ds_b.jsonl",
        "/data/ds_e.jsonl",
    )
    assert [(a.path, a.weight) for a in spec.safety] == [("/adapters/ad_s", 0.5)]
