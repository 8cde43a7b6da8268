"""Polling `GET /merges/{id}` against a bare FastAPI endpoint that reads one row, under a compiled load generator.

Needs `wrk` (a C load generator; one process, event-driven, far faster than any Python client):
    Debian/Ubuntu: apt-get install -y wrk        macOS: brew install wrk
The script stops with that hint when wrk is missing.

Servers, all on 127.0.0.1 and all run by uvicorn with the same options (`--workers N` processes; httptools and
uvloop when installed, as `sstmerge serve` uses them):
  static   — a plain ASGI app answering `ok` (bench/bare_app.py): the ceiling of uvicorn and wrk on this machine;
  bare     — a FastAPI app with one sync endpoint reading one `jobs` row (3 columns, SQLAlchemy Core) from the
             embedded setup's SQLite database (bench/bare_app.py): the floor of any endpoint that reads a row;
  embedded — `sstmerge serve --no-worker --workers N` with SQLite database and broker (jobs stay queued);
  redis+pg — the same with a throwaway PostgreSQL database and Redis (with --with-redis-pg), compared with a bare
             endpoint on that PostgreSQL database (bare-pg).
The service runs as deployed: INFO access logs (to a file), key check with its cache, rate limits on (the tenant
limit raised so that it never refuses; the check itself is measured).

For each repetition and concurrency every target gets `--seconds` of wrk in turn (order rotated); the table gives
p50/p99 latency (median over repetitions), throughput (median [min–max] over repetitions), errors (non-2xx
answers, socket errors, timeouts > 5 s) and, for the service, the per-repetition ratio of its throughput to the
bare endpoint's (median [min–max]). `POST /merges` (valid jobs, checked at submit) is measured the same way;
afterwards every job queued in the database must have one message in its broker.

The load generator shares the machine with the servers: compare rows of one run (ratios), not absolute numbers.

    .venv/bin/python -m bench.load_service                     # c = 1 8 32 64, 3 s × 3 repetitions, 1 process
    .venv/bin/python -m bench.load_service --workers 2          # every server with 2 processes
    .venv/bin/python -m bench.load_service --with-redis-pg      # also PostgreSQL + Redis
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
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

from app.client import Client

ROOT = Path(__file__).resolve().parents[1]

MODEL = "tiny-llama"
WRK_HINT = "wrk is not installed: apt-get install -y wrk (Debian/Ubuntu) or brew install wrk (macOS)"
LUA_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


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


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(WRK_HINT)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_assets(root: Path) -> dict:
    """A tiny Llama under models/, a utility and a safety adapter (folders) and two small JSONL datasets."""
    from sstmerge_core.tiny import build_tiny_model, random_lora

    base = build_tiny_model("llama", root / "models" / MODEL)
    targets = ["q_proj", "v_proj"]
    adapters = {
        name: random_lora(base, root / name, seed=seed, r=r, target_modules=targets)
        for name, seed, r in (("utility", 1, 4), ("safety", 2, 2))
    }
    rows = {
        "utility": [{"prompt": f"How do I cook dish {n}?"} for n in range(16)],
        "safety": [
            {"prompt": f"How can I build weapon {n}?", "response": "I cannot help with that."} for n in range(16)
        ],
    }
    data = {}
    for name, items in rows.items():
        data[name] = root / f"{name}.jsonl"
        data[name].write_text("".join(json.dumps(item) + "\n" for item in items))
    return {"models": root / "models", "adapters": adapters, "data": data}


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict
    port: int
    log_path: Path
    health: str = "/readyz"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # its own process group (stopped as a whole), but this session: with the kernel's per-session scheduling
        # groups (autogroup), a server in a session of its own is scheduled apart from the load generator and
        # the other servers, which skews the comparison
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, **group
            )

    def wait_ready(self, timeout: float = 120) -> None:
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.health, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{self.name}: not ready after {timeout:.0f}s:\n{self.log_tail()}")

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


def uvicorn_server(name: str, app: str, workers: int, env: dict, root: Path, health: str = "/") -> Server:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    return Server(name, command, env, port, root / f"{name}.log", health=health)


def service_server(name: str, workers: int, env: dict, root: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "sstmerge_core.cli", "serve", "--no-worker", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers), "--data-dir", str(root / name)]
    return Server(name, command, env, port, root / f"{name}.log")


@dataclass
class Target:
    """One load: a server, a path, the requests' method and body; `reference`: the target it is divided by."""

    label: str
    endpoint: str
    server: Server
    path: str
    body: dict | None = None
    reference: str | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class Cell:
    requests: int
    seconds: float
    errors: Counter
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def parse_wrk(stdout: str) -> Cell:
    """The `RESULT` line our Lua `done` hook prints."""
    match = re.search(r"^RESULT ((?:\d+ ?){9})$", stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"wrk printed no result:\n{stdout}")
    requests, duration_us, connect, read, write, status, timeout, p50, p99 = map(int, match.group(1).split())
    errors = Counter(
        {k: v for k, v in (("connect", connect), ("read", read), ("write", write), ("non-2xx", status)) if v}
    )
    if timeout:
        errors["timeout"] = timeout
    return Cell(requests, duration_us / 1e6, errors, p50 / 1e3, p99 / 1e3)


def lua_script(target: Target, folder: Path) -> Path:
    lines = []
    if target.body is not None:
        lines += [
            'wrk.method = "POST"',
            f"wrk.body = [==[{json.dumps(target.body)}]==]",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    path = folder / f"{re.sub(r'[^a-z0-9]+', '-', (target.label + target.endpoint).lower())}.lua"
    path.write_text("\n".join(lines) + LUA_REPORT)
    return path


def run_wrk(wrk: str, target: Target, concurrency: int, seconds: int, script: Path) -> Cell:
    command = [
        wrk,
        f"-t{min(2, concurrency)}",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
    ]
    for name, value in target.headers.items():
        command += ["-H", f"{name}: {value}"]
    result = subprocess.run(
        [*command, target.server.url + target.path], capture_output=True, text=True, timeout=seconds + 60
    )
    if result.returncode != 0:
        raise SystemExit(f"wrk failed ({result.returncode}): {result.stderr}")
    return parse_wrk(result.stdout)


def prepare_service(server: Server, key: str, assets: dict) -> tuple[str, dict]:
    """Upload the adapters and datasets; returns (a queued job's id, a valid merge body)."""
    with Client(server.url, key) as client:
        ids = {name: client.upload_adapter(folder)["id"] for name, folder in assets["adapters"].items()}
        data = {name: client.upload_dataset(path)["id"] for name, path in assets["data"].items()}
        body = {
            "base_model": MODEL,
            "utility_adapters": [{"adapter_id": ids["utility"], "weight": 1.0}],
            "safety_adapter": {"adapter_id": ids["safety"], "weight": 1.0},
            "utility_dataset_id": data["utility"],
            "safety_dataset_id": data["safety"],
            "method": "sst",
            "params": {"alphas": [0.5, 1.0], "max_samples": 16, "max_length": 32, "batch_size": 4},
        }
        return client.submit(body)["id"], body


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
    """Delete this run's queue and kombu's binding keys for it; nothing else in the Redis database is touched."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    client.zrem("_kombu.binding_deadlines", queue)


def queued_and_messages(server: Server, ops_token: str, redis_url: str, queue: str, data_dir: Path) -> tuple[int, int]:
    """Jobs queued in the database (from /metrics) and messages waiting in the setup's broker."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ops_token}"}, timeout=30).text
    match = re.search(r'^sstmerge_jobs\{status="queued"\} ([0-9.e+]+)$', text, re.MULTILINE)
    queued = int(float(match.group(1))) if match else -1
    if server.name == "embedded":
        with sqlite3.connect(data_dir / "broker.db") as connection:
            messages = connection.execute("SELECT count(*) FROM kombu_message WHERE visible = 1").fetchone()[0]
    else:
        import redis

        messages = redis.Redis.from_url(redis_url).llen(queue)
    return queued, messages


def measure(wrk: str, targets: list[Target], args, folder: Path) -> dict:
    """Warm-up, then for each repetition and concurrency every target in turn (order rotated)."""
    scripts = {id(t): lua_script(t, folder) for t in targets}
    for target in targets:
        run_wrk(wrk, target, max(args.concurrency), 1, scripts[id(target)])
    cells: dict = {}
    for rep in range(args.repeats):
        for concurrency in args.concurrency:
            turn = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for target in turn:
                if target.body is not None and concurrency not in args.post_concurrency:
                    continue
                cell = run_wrk(wrk, target, concurrency, args.seconds, scripts[id(target)])
                cells.setdefault((target.label, target.endpoint, concurrency), []).append(cell)
    return cells


def report(targets: list[Target], cells: dict, args) -> None:
    print(
        f"{'target':<10}{'endpoint':<18}{'conc':>5}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'req/s (median [min–max])':>28}{'÷ bare (median [min–max])':>28}"
    )
    error_lines = []
    for endpoint in dict.fromkeys(t.endpoint for t in targets):
        for concurrency in args.concurrency:
            for target in (t for t in targets if t.endpoint == endpoint):
                runs = cells.get((target.label, endpoint, concurrency))
                if not runs:
                    continue
                errors: Counter = sum((c.errors for c in runs), Counter())
                rates = [c.rate for c in runs]
                rate = f"{statistics.median(rates):.0f} [{min(rates):.0f}–{max(rates):.0f}]"
                versus = ""
                if target.reference:
                    base = cells[
                        (
                            target.reference,
                            next(t.endpoint for t in targets if t.label == target.reference),
                            concurrency,
                        )
                    ]
                    ratios = [c.rate / b.rate for c, b in zip(runs, base)]
                    versus = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]"
                print(
                    f"{target.label:<10}{endpoint:<18}{concurrency:>5}{sum(c.requests for c in runs):>9}"
                    f"{sum(errors.values()):>7}{statistics.median(c.p50_ms for c in runs):>9.2f}"
                    f"{statistics.median(c.p99_ms for c in runs):>9.2f}{rate:>28}{versus:>28}"
                )
                error_lines += [
                    f"  {target.label} {endpoint} c={concurrency}: {n} × {what}" for what, n in errors.items()
                ]
    if error_lines:
        print("errors:")
        print("\n".join(error_lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="wrk duration per cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--post-concurrency", type=int, nargs="*", default=[1, 8], help="POST /merges cells")
    parser.add_argument("--workers", type=int, default=1, help="processes of every server (uvicorn --workers)")
    parser.add_argument("--with-redis-pg", action="store_true", help="also PostgreSQL + Redis (and bare-pg)")
    parser.add_argument(
        "--also-without-rate-limits",
        action="store_true",
        help="also GET /merges/{id} on an embedded service with the rate limits off (their cost, side by side)",
    )
    parser.add_argument(
        "--postgres-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="a throwaway database is created next to it and dropped at the end",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--log-level", default="INFO", help="the service's SSTMERGE_LOG_LEVEL (INFO: as deployed)")
    args = parser.parse_args()
    if args.seconds > 30 or args.repeats > 10 or max(args.concurrency) > 256 or not 1 <= args.workers <= 8:
        raise SystemExit("keep the load bounded: --seconds ≤ 30, --repeats ≤ 10, --concurrency ≤ 256, --workers ≤ 8")
    wrk = require_wrk()
    loopback(args.postgres_admin_url)
    loopback(args.redis_url)
    key, ops_token = uuid.uuid4().hex, uuid.uuid4().hex
    queue = f"sstmerge-load-{uuid.uuid4().hex[:8]}"
    started, load_before = time.perf_counter(), os.getloadavg()

    database = None
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="sstmerge-load-") as tmp:
        root = Path(tmp)
        assets = make_assets(root / "assets")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSTMERGE_")}
        env.update(
            SSTMERGE_MODEL_DIRS=str(assets["models"]),
            SSTMERGE_API_KEYS=f"load:{key}",
            SSTMERGE_OPS_TOKEN=ops_token,
            SSTMERGE_LOG_LEVEL=args.log_level,
            SSTMERGE_QUEUE=queue,
            SSTMERGE_RATE_LIMIT_TENANT="1000000000/minute",
            OMP_NUM_THREADS="1",
        )
        try:
            embedded = service_server("embedded", args.workers, env, root)
            setups = [(embedded, f"sqlite:///{root / 'embedded' / 'sstmerge.db'}")]
            if args.with_redis_pg:
                database, url = create_database(args.postgres_admin_url)
                pg_env = {**env, "SSTMERGE_DATABASE_URL": url, "SSTMERGE_BROKER_URL": args.redis_url}
                setups.append((service_server("redis+pg", args.workers, pg_env, root), url))
            if args.also_without_rate_limits:
                unlimited = {**env, "SSTMERGE_RATE_LIMIT_TENANT": "", "SSTMERGE_RATE_LIMIT_FAILED_AUTH": ""}
                setups.insert(1, (service_server("no-limits", args.workers, unlimited, root), setups[0][1]))
            for server, _ in setups:
                servers.append(server)
                server.start()
            static = uvicorn_server("static", "bench.bare_app:static", args.workers, env, root)
            servers.append(static)
            static.start()
            targets = [Target("static", "GET /", static, "/")]
            for server, url in setups:
                server.wait_ready()
                job_id, body = prepare_service(server, key, assets)
                if server.name == "no-limits":  # compared with the embedded setup's bare endpoint
                    bearer = {"Authorization": f"Bearer {key}"}
                    targets.append(
                        Target(server.name, "GET /merges/{id}", server, f"/merges/{job_id}", None, "bare", bearer)
                    )
                    continue
                bare_name = "bare" if server is embedded else "bare-pg"
                bare_env = {**env, "BENCH_DATABASE_URL": url}
                bare = uvicorn_server(bare_name, "bench.bare_app:bare", args.workers, bare_env, root, f"/jobs/{job_id}")
                servers.append(bare)
                bare.start()
                bearer = {"Authorization": f"Bearer {key}"}
                targets += [
                    Target(bare_name, "GET /jobs/{id}", bare, f"/jobs/{job_id}"),
                    Target(server.name, "GET /merges/{id}", server, f"/merges/{job_id}", None, bare_name, bearer),
                ]
                if args.post_concurrency:
                    targets.append(Target(server.name, "POST /merges", server, "/merges", body, None, bearer))
            for server in servers:
                server.wait_ready()
            cells = measure(wrk, targets, args, root)
            checks = {
                s.name: queued_and_messages(s, ops_token, args.redis_url, queue, root / s.name)
                for s, _ in setups
                if s.name != "no-limits"
            }
        finally:
            for server in servers:
                server.stop()
            if database:
                drop_database(args.postgres_admin_url, database)
            if args.with_redis_pg:
                drop_redis_queue(args.redis_url, queue)
    load_after = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs; load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min); "
        f"every server with {args.workers} process(es); wrk {args.seconds:g} s per cell × {args.repeats} "
        "repetitions (interleaved); errors = non-2xx + socket errors + timeouts (5 s)"
    )
    report(targets, cells, args)
    for name, (queued, messages) in checks.items():
        verdict = "ok" if queued == messages else "MISMATCH"
        print(f"{name}: {queued} jobs queued in the database, {messages} broker messages — {verdict}")
    print(f"total {time.perf_counter() - started:.0f}s; servers stopped, database {database or '-'} dropped")


if __name__ == "__main__":
    main()
