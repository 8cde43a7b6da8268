"""What the service keeps and for how long: DELETE /merges, retention of finished jobs, the start-up sweep of
leftovers, and the size caps (LRU) of the worker's input and Fisher caches."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from service_helpers import auth, merge_body, upload_adapter, wait_for
from sqlalchemy import func, select, update

from app.domain import scratch
from app.domain.db.models import Adapter, Job, JobEvent, utcnow
from app.domain.db.session import session_scope
from app.domain.retention import expire_jobs, sweep_leftovers
from app.domain.storage import get_storage
from app.main import create_app
from sstmerge_core.cache import FisherCache
from sstmerge_core.fisher import KFACFactors

pytestmark = pytest.mark.service


def event_count(settings, job_id: str) -> int:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id))


def test_delete_finished_job(api, worker, inputs, settings):
    job_id = api.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"]
    assert wait_for(api, "acme", job_id)["status"] == "succeeded"
    root = settings.resolved_storage_dir / "tenants" / "acme" / "jobs" / job_id
    assert any(root.rglob("*.zip")) and event_count(settings, job_id) > 0
    assert api.delete(f"/merges/{job_id}", headers=auth("globex")).status_code == 404  # another tenant's
    assert api.delete(f"/merges/{job_id}", headers=auth("acme")).status_code == 204
    assert api.get(f"/merges/{job_id}", headers=auth("acme")).status_code == 404
    assert api.get(f"/merges/{job_id}/events", headers=auth("acme")).status_code == 404
    assert api.get(f"/merges/{job_id}/adapter", headers=auth("acme")).status_code == 404
    assert not root.exists() and event_count(settings, job_id) == 0
    assert api.delete(f"/merges/{job_id}", headers=auth("acme")).status_code == 404


def test_delete_unfinished_job_is_refused(api, inputs, settings):
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle"})
    with TestClient(create_app(idle)) as client:
        job_id = client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"]
        refused = client.delete(f"/merges/{job_id}", headers=auth("acme"))
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_active"
        assert client.get(f"/merges/{job_id}", headers=auth("acme")).json()["status"] == "queued"
        assert client.post(f"/merges/{job_id}/cancel", headers=auth("acme")).json()["status"] == "cancelled"
        assert client.delete(f"/merges/{job_id}", headers=auth("acme")).status_code == 204


def _cancelled_job(client, inputs) -> str:
    job_id = client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"]
    client.post(f"/merges/{job_id}/cancel", headers=auth("acme"))
    return job_id


def test_retention_deletes_old_finished_jobs(api, inputs, settings):
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle", "job_retention_seconds": 3600})
    storage = get_storage(idle)
    with TestClient(create_app(idle)) as client:
        old, recent = _cancelled_job(client, inputs), _cancelled_job(client, inputs)
        waiting = client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"]
    for job_id in (old, recent):
        (settings.resolved_storage_dir / "tenants" / "acme" / "jobs" / job_id / "t0").mkdir(parents=True)
        (settings.resolved_storage_dir / "tenants" / "acme" / "jobs" / job_id / "t0" / "metrics.json").write_text("{}")
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == old).values(finished_at=utcnow() - timedelta(hours=2)))
        session.execute(update(Job).where(Job.id == waiting).values(created_at=utcnow() - timedelta(hours=2)))
    expired = expire_jobs(idle, storage)
    assert old in expired and recent not in expired and waiting not in expired
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(Job, old) is None and session.get(Job, recent) is not None
        assert session.get(Job, waiting).status == "queued"
        session.execute(update(Job).where(Job.id == waiting).values(status="cancelled"))
    assert not (settings.resolved_storage_dir / "tenants" / "acme" / "jobs" / old).exists()
    assert (settings.resolved_storage_dir / "tenants" / "acme" / "jobs" / recent).exists()


def _age(path: Path, seconds: float) -> None:
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        stamp = time.time() - seconds
        os.utime(item, (stamp, stamp))


def test_startup_sweep_removes_only_leftovers(api, inputs, settings, tmp_path):
    """Orphaned stored adapters (old enough), files of deleted jobs, attempt folders a finished job does not use,
    staging folders and temporary files nobody holds go; what a live process holds or a row names stays."""
    swept = settings.model_copy(
        update={"data_dir": tmp_path / "data", "leftover_grace_seconds": 60, "queue": f"{settings.queue}-idle"}
    )
    storage_dir, uploads = swept.resolved_storage_dir, swept.resolved_work_dir / "uploads"
    with TestClient(create_app(swept)) as client:
        kept_adapter = client.get(f"/adapters/{inputs['utility']}", headers=auth("acme")).json()["id"]
        finished = _cancelled_job(client, inputs)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Job).where(Job.id == finished).values(artifact_prefix=f"tenants/acme/jobs/{finished}/good")
        )
        prefix = session.get(Adapter, kept_adapter).storage_prefix

    def put(relative: str, age: float = 0.0) -> Path:
        path = storage_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        _age(path, age)
        return path

    put(f"{prefix}/adapter_config.json", 3600)  # has a row: stays
    put("tenants/acme/adapters/ad_orphan_old/adapter_config.json", 3600)  # no row, old: goes
    put("tenants/acme/adapters/ad_orphan_new/adapter_config.json")  # no row, but a live upload may own it: stays
    put("tenants/acme/jobs/mj_deleted/t1/metrics.json")  # its job is gone: goes
    put(f"tenants/acme/jobs/{finished}/good/metrics.json")  # the folder the finished job points at: stays
    put(f"tenants/acme/jobs/{finished}/dead/metrics.json")  # another attempt's: goes
    dead_temp = put("tenants/acme/adapters/x/.adapter_model.safetensors.abc.tmp", 60)
    live_temp = put("tenants/acme/adapters/y/.adapter_model.safetensors.def.tmp", 60)
    uploads.mkdir(parents=True, exist_ok=True)
    (dead_staging := uploads / "tmpdead").mkdir()
    (live_staging := uploads / "tmplive").mkdir()
    _age(dead_staging, 60)
    _age(live_staging, 60)
    with scratch.owned(live_staging), scratch.owned(live_temp):
        counts = sweep_leftovers(swept, get_storage(swept))
    # inputs: ad_orphan_old, and x, emptied by its dead temporary file
    assert counts == {"staging": 1, "temp_files": 1, "inputs": 2, "job_folders": 2}, counts
    assert (storage_dir / prefix / "adapter_config.json").exists()
    assert not (storage_dir / "tenants/acme/adapters/ad_orphan_old").exists()
    assert (storage_dir / "tenants/acme/adapters/ad_orphan_new").exists()
    assert not (storage_dir / "tenants/acme/jobs/mj_deleted").exists()
    assert (storage_dir / f"tenants/acme/jobs/{finished}/good/metrics.json").exists()
    assert not (storage_dir / f"tenants/acme/jobs/{finished}/dead").exists()
    assert not dead_temp.parent.exists() and live_temp.exists()
    assert not dead_staging.exists() and live_staging.exists()


def test_input_cache_is_capped_lru_and_drops_deleted_inputs(api, inputs, settings, assets, tmp_path):
    from workers.inputs import InputCache, folder_bytes

    storage = get_storage(settings)
    fresh = upload_adapter(api, "acme", assets.archives["safety"]).json()["id"]
    cache = InputCache(storage, tmp_path / "inputs")
    with session_scope(settings.resolved_database_url) as session:
        first = cache.adapter(session, "acme", inputs["utility"])
        time.sleep(0.02)
        second = cache.adapter(session, "acme", inputs["safety"])
        time.sleep(0.02)
        cache.adapter(session, "acme", inputs["utility"])  # used again: now the most recent
        time.sleep(0.02)
        third = cache.adapter(session, "acme", fresh)
    sizes = {path.name: folder_bytes(path) for path in (first, second, third)}
    cache.max_bytes = sizes[first.name] + sizes[third.name]
    with cache.in_use():  # a running job holds the cache: nothing is evicted under it
        assert cache.trim() == []
    assert cache.trim() == [second.name]  # the least recently used
    assert first.is_dir() and third.is_dir() and not second.exists()

    assert api.delete(f"/adapters/{fresh}", headers=auth("acme")).status_code == 204
    with session_scope(settings.resolved_database_url) as session:
        assert cache.prune_deleted(session) == [fresh]
    assert not third.exists() and first.is_dir()


def _factors(n: int) -> dict[str, KFACFactors]:
    return {"layer.q_proj": KFACFactors(torch.eye(n), torch.eye(n), 1, 1)}


def test_fisher_cache_is_capped_lru(tmp_path):
    cache = FisherCache(tmp_path / "fisher")
    for key in ("a", "b", "c"):
        cache.save(key, _factors(16))
        _age(cache.path(key), {"a": 30, "b": 20, "c": 10}[key])
    assert cache.load("a") is not None  # a hit: "a" becomes the most recently used
    entry = cache.path("a").stat().st_size
    assert cache.trim(2 * entry) == ["b"]
    assert [p.stem for p in cache.entries()] == ["c", "a"]
    assert cache.load("b") is None
    assert cache.trim(0) == ["c", "a"] and cache.entries() == []


def test_worker_startup_sweep(api, inputs, settings, tmp_path):
    """A worker starting removes the job folders of attempts that no longer run (not the folder of a running
    attempt of another worker on this machine), half-fetched inputs and half-written Fisher cache entries."""
    from app.domain.job_state import JobStore
    from workers.tasks import sweep_worker_leftovers

    local = settings.model_copy(
        update={"data_dir": tmp_path / "data", "leftover_grace_seconds": 60, "queue": f"{settings.queue}-idle"}
    )
    with TestClient(create_app(local)) as client:
        running, dead = (
            client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"] for _ in "ab"
        )
    claim = JobStore.from_settings(local).claim(running)
    assert claim is not None
    work = local.resolved_work_dir
    live_folder, dead_folder = work / "jobs" / f"{running}-{claim.token}", work / "jobs" / f"{dead}-0123abcd"
    half_fetched = work / "inputs" / "adapters" / ".ad_x.k2j3"
    half_written = local.resolved_cache_dir / "fisher" / "tmpq1w2.tmp"
    for folder in (live_folder, dead_folder, half_fetched):
        folder.mkdir(parents=True)
        (folder / "file").write_text("x")
    half_written.parent.mkdir(parents=True)
    half_written.write_text("x")
    for path in (live_folder, dead_folder, half_fetched, half_written):
        _age(path, 120)
    sweep_worker_leftovers(local)
    assert live_folder.is_dir() and not dead_folder.exists()
    assert not half_fetched.exists() and not half_written.exists()
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id.in_([running, dead])).values(status="cancelled"))


def _gone_within(paths: list[Path], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(path.exists() for path in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_leftovers_are_swept_while_the_api_runs(settings, tmp_path):
    """Leftovers that appear after start-up (an API process killed mid-upload, its neighbour still running) are
    removed by the running API once the grace has passed, without a restart; a staging folder a live upload
    holds is kept."""
    periodic = settings.model_copy(
        update={
            "data_dir": tmp_path / "data",
            "leftover_sweep_seconds": 0.5,
            "leftover_grace_seconds": 2.0,
            "queue": f"{settings.queue}-idle",
        }
    )
    with TestClient(create_app(periodic)):
        source = tmp_path / "weights"
        source.write_bytes(b"x" * 100)
        get_storage(periodic).put_file("tenants/acme/adapters/ad_killed/adapter_model.safetensors", source)
        stored = periodic.resolved_storage_dir / "tenants" / "acme" / "adapters" / "ad_killed"
        dead = periodic.resolved_work_dir / "uploads" / "tmp-dead"
        live = periodic.resolved_work_dir / "uploads" / "tmp-live"
        for folder in (dead, live):
            folder.mkdir(parents=True)
            (folder / "upload").write_bytes(b"partial")
        with scratch.owned(live):
            assert stored.exists() and dead.exists()
            assert _gone_within([stored, dead], 15), "the running API did not sweep the leftovers"
            assert live.exists()
