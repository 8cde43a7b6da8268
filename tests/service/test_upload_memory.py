"""Bounded memory of uploads, measured on a live `sstmerge serve --no-worker` process (PostgreSQL, one API process):
a 1 GiB pax header in a small .tar.gz and an 80 MB JSONL upload keep the API's peak RSS within a bound over its idle
RSS, and `/healthz` answers while the JSONL upload is in flight (the event loop is not blocked by it).

Peak RSS is the kernel's high-water mark (`VmHWM`), reset before the uploads through `/proc/<pid>/clear_refs`. The
memory bound is functional, with a wide margin: before the streaming checks, the pax header took the API from 0.3 to
1.6 GB and stalled /healthz for 18 s, and a 79 MB JSONL upload cost about 8 times its size. Latencies are printed,
never asserted (they measure the machine); what is asserted is that answers arrive *during* the upload.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import auth, settings_env

pytestmark = pytest.mark.service

PEAK_OVER_IDLE_BYTES = 300 << 20


def pax_bomb(path: Path, header_bytes: int = 1 << 30) -> Path:
    """A .tar.gz whose first record is a pax extended header of `header_bytes` bytes, written as a stream."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, header_bytes
    config = tarfile.TarInfo("adapter_config.json")
    config.size = 2
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        chunk = b"x" * (1 << 20)
        for _ in range(header_bytes >> 20):
            out.write(chunk)
        out.write(b"\0" * (-header_bytes % 512))
        out.write(config.tobuf(format=tarfile.USTAR_FORMAT) + b"{}" + b"\0" * 510 + b"\0" * 1024)
    return path


def large_jsonl(path: Path, megabytes: int = 80) -> Path:
    row = {"prompt": "How do I convert a temperature from Celsius to Fahrenheit? " * 2, "response": "Multiply " * 12}
    line = json.dumps(row).encode() + b"\n"
    with path.open("wb") as out:
        out.write(line * ((megabytes << 20) // len(line)))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class HealthProbe(threading.Thread):
    """GET /healthz every 20 ms on its own connection; records each answer's (start, end) on the monotonic clock."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.answers, self.failures = url, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    ok = client.get("/healthz").status_code == 200
                except httpx.HTTPError as exc:
                    ok = False
                    self.failures.append(repr(exc))
                self.answers.append((start, time.monotonic()))
                if not ok:
                    self.failures.append("status")
                self.stop.wait(0.02)


@pytest.fixture
def live_api(settings, tmp_path):
    """`sstmerge serve --no-worker` (one API process) with the session's settings; yields (base URL, pid)."""
    port = free_port()
    env = {
        **settings_env(settings),
        "SSTMERGE_API_WORKERS": "1",
        "SSTMERGE_RATE_LIMIT_TENANT": "",
        "SSTMERGE_LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "serve.log").open("wb")
    command = [sys.executable, "-m", "sstmerge_core.cli", "serve", "--no-worker", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sstmerge serve did not start: {(tmp_path / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.2)
    yield url, proc.pid
    proc.terminate()
    proc.wait(30)
    log.close()


def upload(client: httpx.Client, kind: str, path: Path) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post(f"/{kind}", headers=auth("acme"), files={"file": (path.name, handle)})


def timed_upload(client: httpx.Client, kind: str, path: Path) -> tuple[httpx.Response, tuple[float, float]]:
    """The upload's response and its (start, end) on the monotonic clock."""
    start = time.monotonic()
    response = upload(client, kind, path)
    return response, (start, time.monotonic())


def answered_within(answers: list[tuple[float, float]], window: tuple[float, float]) -> int:
    """How many probe requests both started and finished inside `window`."""
    return sum(window[0] <= start and end <= window[1] for start, end in answers)


def test_archive_bomb_and_large_jsonl_stay_in_bounded_memory(live_api, tmp_path_factory):
    url, pid = live_api
    folder = tmp_path_factory.mktemp("memory")
    bomb, rows = pax_bomb(folder / "bomb.tar.gz"), large_jsonl(folder / "rows.jsonl")
    with httpx.Client(base_url=url, timeout=300) as client:
        # warm up the code paths (imports on first use) with small uploads of both kinds
        small = folder / "small.jsonl"
        small.write_text('{"prompt": "hi"}\n')
        assert upload(client, "datasets", small).status_code == 201
        with tarfile.open(folder / "small.tar.gz", "w:gz") as archive:
            archive.add(small, "notes.jsonl")
        assert upload(client, "adapters", folder / "small.tar.gz").status_code == 422
        idle = memory(pid)["VmRSS"]
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        probe = HealthProbe(url)
        probe.start()
        try:
            time.sleep(0.5)
            refused, bomb_window = timed_upload(client, "adapters", bomb)
            stored, rows_window = timed_upload(client, "datasets", rows)
            time.sleep(0.5)
        finally:
            probe.stop.set()
            probe.join(30)
    peak = memory(pid)["VmHWM"]
    latencies = sorted(end - start for start, end in probe.answers)
    report = {
        "bomb_bytes": bomb.stat().st_size,
        "jsonl_bytes": rows.stat().st_size,
        "idle_rss_mb": round(idle / 2**20, 1),
        "peak_over_idle_mb": round((peak - idle) / 2**20, 1),
        "healthz_n": len(latencies),
        "healthz_median_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "healthz_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
        "healthz_max_ms": round(1000 * latencies[-1], 1),
        "bomb_upload_s": round(bomb_window[1] - bomb_window[0], 2),
        "healthz_during_bomb": answered_within(probe.answers, bomb_window),
        "jsonl_upload_s": round(rows_window[1] - rows_window[0], 2),
        "healthz_during_jsonl": answered_within(probe.answers, rows_window),
    }
    print("upload memory:", json.dumps(report))
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "archive_too_large", refused.text
    assert stored.status_code == 201 and stored.json()["rows"] > 300_000, stored.text
    assert peak - idle < PEAK_OVER_IDLE_BYTES, report
    assert not probe.failures, (probe.failures[:5], report)
    # an event loop blocked by the upload answers nothing while the upload runs (the bomb is refused at its header)
    assert report["healthz_during_jsonl"] >= 1, report
