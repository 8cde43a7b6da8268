"""API latency and throughput under concurrent load, embedded mode vs Redis + PostgreSQL, side by side.

Starts two `sstmerge serve --no-worker` processes on 127.0.0.1 (so submitted jobs stay queued and no worker
competes for the CPU):
  embedded — SQLite database and kombu's SQLite broker in a temporary data folder,
  redis+pg — a throwaway PostgreSQL database (created here, dropped at the end) and Redis, on a private queue
             (its keys are deleted at the end).
Uploads a tiny model's adapters and datasets to each, then, interleaved over repetitions and setups, sends a
bounded number of `GET /merges/{id}` and `POST /merges` (valid jobs, checked at submit time like any other)
at each concurrency level from one asyncio client (httpx.AsyncClient + a semaphore). Any non-2xx answer or
transport error is an error. Prints p50/p99 latency (pooled over repetitions), throughput (median [min–max]
over repetitions) and, for redis+pg, the per-repetition ratio of its throughput to the embedded one's.
Afterwards it checks that every accepted job is queued in the database and has one message in its broker.

The client runs on the same machine as the servers, so on a small CPU the figures describe the whole
loopback system (client included); compare setups and concurrency levels, not absolute numbers.

    .venv/bin/python bench/load_service.py                            # 1/8/32 concurrent, 300 requests each, 3 reps
    .venv/bin/python bench/load_service.py --requests 100 --repeats 1 # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.demo import free_port, zip_folder  # noqa: E402

ENDPOINTS = ("GET /merges/{id}", "POST /merges")
MODEL = "tiny-llama"


def loopback(url: str) -> str:
    """`url` itself, if its host is a loopback address (load is only ever sent to this machine)."""
    host = httpx.URL(url.replace("postgresql+psycopg", "postgresql")).host
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit(f"refusing a non-loopback address: {url}")
    return url


def make_assets(root: Path) -> dict:
    """A tiny Llama under models/, a utility and a safety adapter (zipped) and two small JSONL datasets."""
    from sstmerge_core.tiny import build_tiny_model, random_lora

    base = build_tiny_model("llama", root / "models" / MODEL)
    targets = ["q_proj", "v_proj"]
    adapters = {
        name: zip_folder(random_lora(base, root / name, seed=seed, r=r, target_modules=targets))
        for name, seed, r in (("utility", 1, 4), ("safety", 2, 2))
    }
    data = {
        "utility": "".join(json.dumps({"prompt": f"How do I cook dish {n}?"}) + "\n" for n in range(16)),
        "safety": "".join(
            json.dumps({"prompt": f"How can I build weapon {n}?", "response": "I cannot help with that."}) + "\n"
            for n in range(16)
        ),
    }
    return {"models": root / "models", "adapters": adapters, "data": data}


@dataclass
class Server:
    name: str
    port: int
    data_dir: Path
    env: dict
    log_path: Path
    proc: subprocess.Popen | None = None
    job_ids: list[str] = field(default_factory=list)
    body: dict | None = None
    accepted: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "sstmerge_core.cli",
            "serve",
            "--no-worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def wait_ready(client: httpx.AsyncClient, server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name}: sstmerge serve exited ({server.proc.returncode}):\n{server.log_tail()}")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.3)
    raise SystemExit(f"{server.name}: not ready after {timeout:.0f}s:\n{server.log_tail()}")


def checked(response: httpx.Response) -> dict:
    if not 200 <= response.status_code < 300:
        request = response.request
        raise SystemExit(f"{request.method} {request.url.path}: {response.status_code} {response.text}")
    return response.json()


async def upload(client: httpx.AsyncClient, server: Server, assets: dict) -> None:
    """The adapters and datasets, one valid merge body, and a few jobs to read back with GET."""
    ids = {}
    for name, payload in assets["adapters"].items():
        ids[name] = checked(
            await client.post("/adapters", files={"file": (f"{name}.zip", payload)}, data={"name": name})
        )["id"]
    for name, text in assets["data"].items():
        ids[f"data:{name}"] = checked(await client.post("/datasets", files={"file": (f"{name}.jsonl", text)}))["id"]
    server.body = {
        "base_model": MODEL,
        "utility_adapters": [{"adapter_id": ids["utility"], "weight": 1.0}],
        "safety_adapter": {"adapter_id": ids["safety"], "weight": 1.0},
        "utility_dataset_id": ids["data:utility"],
        "safety_dataset_id": ids["data:safety"],
        "method": "sst",
        "params": {
            "alphas": [0.5, 1.0],
            "max_samples": 16,
            "max_length": 32,
            "batch_size": 4,
            "continuation_tokens": 4,
        },
    }
    for _ in range(8):
        server.job_ids.append(checked(await client.post("/merges", json=server.body))["id"])
    server.accepted += 8


@dataclass
class Cell:
    latencies: list[float]
    errors: Counter
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


async def load(client: httpx.AsyncClient, server: Server, endpoint: str, concurrency: int, total: int) -> Cell:
    """`total` requests, at most `concurrency` in flight; latency of each, errors by status or exception."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: Counter = Counter()

    async def one(i: int) -> None:
        async with semaphore:
            start = time.perf_counter()
            try:
                if endpoint == "POST /merges":
                    response = await client.post("/merges", json=server.body)
                else:
                    response = await client.get(f"/merges/{server.job_ids[i % len(server.job_ids)]}")
                if 200 <= response.status_code < 300:
                    if endpoint == "POST /merges":
                        server.accepted += 1
                else:
                    errors[f"{response.status_code} {response.text[:120]}"] += 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    return Cell(latencies, errors, time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def queued_in_db(metrics_text: str) -> int:
    match = re.search(r'^sstmerge_jobs\{status="queued"\} ([0-9.e+]+)$', metrics_text, re.MULTILINE)
    return int(float(match.group(1))) if match else -1


def broker_messages(server: Server, redis_url: str, queue: str) -> int:
    if server.name == "embedded":
        with sqlite3.connect(server.data_dir / "broker.db") as connection:
            return connection.execute("SELECT count(*) FROM kombu_message WHERE visible = 1").fetchone()[0]
    import redis

    return redis.Redis.from_url(redis_url).llen(queue)


def create_database(admin_url: str) -> tuple[str, str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"sstmerge_load_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def drop_redis_queue(redis_url: str, queue: str) -> None:
    """Delete this run's queue and kombu's binding keys for it (its exchange has the queue's name); nothing else
    in the Redis database is touched."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    client.zrem("_kombu.binding_deadlines", queue)


async def measure(servers: list[Server], args) -> dict:
    """Interleaved: for each repetition, endpoint and concurrency, every setup in turn (order rotated)."""
    limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
    headers = {"Authorization": f"Bearer {args.key}"}
    clients = {s.name: httpx.AsyncClient(base_url=s.url, headers=headers, limits=limits, timeout=60) for s in servers}
    try:
        for s in servers:
            await wait_ready(clients[s.name], s)
            await upload(clients[s.name], s, args.assets)
            for endpoint in ENDPOINTS:  # warm-up: connections, caches, the database's first plans
                await load(clients[s.name], s, endpoint, max(args.concurrency), 2 * max(args.concurrency))
        results: dict = {}
        for rep in range(args.repeats):
            for endpoint in ENDPOINTS:
                for concurrency in args.concurrency:
                    turn = servers[rep % len(servers) :] + servers[: rep % len(servers)]
                    for s in turn:
                        cell = await load(clients[s.name], s, endpoint, concurrency, args.requests)
                        results.setdefault((s.name, endpoint, concurrency), []).append(cell)
        checks = {}
        for s in servers:
            text = (await clients[s.name].get("/metrics")).text
            checks[s.name] = (s.accepted, queued_in_db(text), broker_messages(s, args.redis_url, args.queue))
        return {"cells": results, "checks": checks}
    finally:
        for client in clients.values():
            await client.aclose()


def report(servers: list[Server], results: dict, args) -> None:
    cells = results["cells"]
    print(
        f"{len(servers)} setups on 127.0.0.1 (API only, --no-worker), {args.requests} requests per cell × "
        f"{args.repeats} repetitions (interleaved), one asyncio client on the same machine"
    )
    print(
        f"{'setup':<10}{'endpoint':<18}{'conc':>5}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'req/s (median [min–max])':>28}{'req/s ÷ embedded':>22}"
    )
    error_lines = []
    for endpoint in ENDPOINTS:
        for concurrency in args.concurrency:
            for s in servers:
                runs = cells[(s.name, endpoint, concurrency)]
                latencies = [x for c in runs for x in c.latencies]
                errors = sum((c.errors for c in runs), Counter())
                rates = [c.rate for c in runs]
                rate = f"{statistics.median(rates):.0f} [{min(rates):.0f}–{max(rates):.0f}]"
                versus = ""
                if s.name != servers[0].name:
                    base = cells[(servers[0].name, endpoint, concurrency)]
                    ratios = [c.rate / b.rate for c, b in zip(runs, base)]
                    versus = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]"
                print(
                    f"{s.name:<10}{endpoint:<18}{concurrency:>5}{len(latencies):>9}{sum(errors.values()):>7}"
                    f"{1e3 * percentile(latencies, 0.5):>9.1f}{1e3 * percentile(latencies, 0.99):>9.1f}"
                    f"{rate:>28}{versus:>22}"
                )
                error_lines += [f"  {s.name} {endpoint} c={concurrency}: {n} × {what}" for what, n in errors.items()]
    if error_lines:
        print("errors:")
        print("\n".join(error_lines))
    for name, (accepted, queued, messages) in results["checks"].items():
        verdict = "ok" if accepted == queued == messages else "MISMATCH"
        print(
            f"{name}: {accepted} jobs accepted, {queued} queued in the database, {messages} broker messages — {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per (setup, endpoint, concurrency, rep)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--postgres-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="a throwaway database is created next to it and dropped at the end",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--log-level", default="INFO", help="the servers' SSTMERGE_LOG_LEVEL (INFO: as deployed)")
    parser.add_argument("--embedded-only", action="store_true", help="skip the Redis + PostgreSQL setup")
    args = parser.parse_args()
    if args.requests > 2000 or args.repeats > 10 or max(args.concurrency) > 256:
        raise SystemExit("keep the load bounded: --requests ≤ 2000, --repeats ≤ 10, --concurrency ≤ 256")
    loopback(args.postgres_admin_url)
    loopback(args.redis_url)
    args.key = uuid.uuid4().hex
    args.queue = f"sstmerge-load-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()

    database = None
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="sstmerge-load-") as tmp:
        root = Path(tmp)
        args.assets = make_assets(root / "assets")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSTMERGE_")}
        env.update(
            SSTMERGE_MODEL_DIRS=str(args.assets["models"]),
            SSTMERGE_API_KEYS=f"load:{args.key}",
            SSTMERGE_LOG_LEVEL=args.log_level,
            SSTMERGE_QUEUE=args.queue,
            OMP_NUM_THREADS="1",
        )
        try:
            servers.append(Server("embedded", free_port(), root / "embedded", env, root / "embedded.log"))
            if not args.embedded_only:
                database, url = create_database(args.postgres_admin_url)
                servers.append(
                    Server(
                        "redis+pg",
                        free_port(),
                        root / "redis-pg",
                        {**env, "SSTMERGE_DATABASE_URL": url, "SSTMERGE_BROKER_URL": args.redis_url},
                        root / "redis-pg.log",
                    )
                )
            for s in servers:
                s.start()
            results = asyncio.run(measure(servers, args))
        finally:
            for s in servers:
                s.stop()
            if database:
                drop_database(args.postgres_admin_url, database)
            if not args.embedded_only:
                drop_redis_queue(args.redis_url, args.queue)
    report(servers, results, args)
    print(
        f"total {time.perf_counter() - started:.0f}s; servers stopped, database {database or '-'} dropped, "
        f"queue {args.queue} deleted"
    )


if __name__ == "__main__":
    main()
