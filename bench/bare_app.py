"""The two reference servers of `bench/load_service.py`, run by uvicorn exactly like `sstmerge serve`:

- `bench.bare_app:bare` — a bare FastAPI app with one sync endpoint that reads one row of the `jobs` table
  (id, status, percent) with SQLAlchemy Core from BENCH_DATABASE_URL: the floor of what any FastAPI endpoint
  reading one row costs here (no auth, no middleware, no logging);
- `bench.bare_app:static` — a plain ASGI app that answers `ok`: the ceiling of uvicorn and the load generator
  together on this machine.
"""

from __future__ import annotations

import os
from functools import lru_cache

from fastapi import FastAPI
from sqlalchemy import Engine, create_engine, text

bare = FastAPI()


@lru_cache
def engine() -> Engine:
    return create_engine(os.environ["BENCH_DATABASE_URL"], pool_size=40, max_overflow=0)


@bare.get("/jobs/{job_id}")
def read_job(job_id: str) -> dict:
    with engine().connect() as connection:
        row = connection.execute(text("SELECT id, status, percent FROM jobs WHERE id = :id"), {"id": job_id}).one()
    return {"id": row.id, "status": row.status, "percent": row.percent}


async def static(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
