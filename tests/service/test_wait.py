"""Waiting for a job with one request, over a real socket: the long-poll of `GET /merges/{id}?wait=` and the
server-sent events of `GET /merges/{id}/events?follow=true`. Jobs sent to a queue no worker reads stay queued
until the test cancels them, so every change happens when the test says; one test follows a real job on the
session's worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis
from live_server import free_port, live_server
from service_helpers import API_KEYS, auth, merge_body

from app.api import watch
from app.client import Client, SseEvent, parse_sse
from app.main import create_app

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def idle_url(settings, redis_url):
    """The API on a socket, sending jobs to a queue that no worker consumes."""
    idle = settings.model_copy(update={"queue": f"{settings.queue}-wait"})
    with live_server(create_app(idle)) as url:
        yield url
    redis.Redis.from_url(redis_url).delete(idle.queue)


@pytest.fixture
def http(idle_url):
    with httpx.Client(base_url=idle_url, headers=auth("acme"), timeout=60) as client:
        yield client


def queued_job(http: httpx.Client, inputs: dict) -> str:
    response = http.post("/merges", json=merge_body(inputs))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def cancel_later(url: str, job_id: str, seconds: float) -> threading.Timer:
    def cancel() -> None:
        httpx.post(f"{url}/merges/{job_id}/cancel", headers=auth("acme"), timeout=60).raise_for_status()

    timer = threading.Timer(seconds, cancel)
    timer.start()
    return timer


def stream(http: httpx.Client, job_id: str, **kwargs) -> list[SseEvent]:
    """The whole event stream of a finished job (the server closes it after `end`)."""
    response = http.get(f"/merges/{job_id}/events", params={"follow": "true", **kwargs.pop("params", {})}, **kwargs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return list(parse_sse(iter(response.text.splitlines())))


def test_long_poll_returns_as_soon_as_the_job_changes(idle_url, http, inputs):
    job_id = queued_job(http, inputs)
    etag = http.get(f"/merges/{job_id}").headers["etag"]
    timer = cancel_later(idle_url, job_id, 1.0)
    start = time.monotonic()
    answer = http.get(f"/merges/{job_id}", params={"wait": 60}, headers={"If-None-Match": etag})
    elapsed = time.monotonic() - start
    timer.join()
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
    assert answer.headers["etag"] not in (etag, None)
    assert elapsed < 30, elapsed  # answered at the change, not at the end of the 60 s


def test_long_poll_ends_with_its_wait_and_never_holds_a_finished_job(http, inputs):
    job_id = queued_job(http, inputs)
    url = f"/merges/{job_id}"
    etag = http.get(url).headers["etag"]

    unchanged = http.get(url, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == etag
    held = http.get(url, params={"wait": 1}, headers={"If-None-Match": f'W/"other", {etag}'})
    assert held.status_code == 304 and held.headers["etag"] == etag  # nothing changed during the wait
    plain = http.get(url, params={"wait": 1})  # no version named: waits from the job as it is now
    assert plain.status_code == 200 and plain.headers["etag"] == etag and plain.json()["status"] == "queued"
    stale = http.get(url, params={"wait": 60}, headers={"If-None-Match": '"an-old-version"'})
    assert stale.status_code == 200 and stale.json()["status"] == "queued"  # differs already: answered at once

    assert http.post(f"{url}/cancel").status_code == 200
    finished = http.get(url)
    start = time.monotonic()
    again = http.get(url, params={"wait": 60}, headers={"If-None-Match": finished.headers["etag"]})
    assert again.status_code == 304 and time.monotonic() - start < 30  # a finished job never changes

    for bad in ("-1", "61", "nan", "soon"):
        response = http.get(url, params={"wait": bad})
        assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error", bad


def test_waiting_is_per_tenant(idle_url, http, inputs):
    job_id = queued_job(http, inputs)
    with httpx.Client(base_url=idle_url, headers=auth("globex"), timeout=60) as other:
        for response in (
            other.get(f"/merges/{job_id}", params={"wait": 5}),
            other.get(f"/merges/{job_id}/events", params={"follow": "true"}),
        ):
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    anonymous = httpx.get(f"{idle_url}/merges/{job_id}/events", params={"follow": "true"}, timeout=60)
    assert anonymous.status_code == 401


def test_event_stream_sends_each_event_once_and_ends_when_the_job_finishes(idle_url, http, inputs):
    job_id = queued_job(http, inputs)
    seen: list[SseEvent] = []
    timer = None
    with http.stream("GET", f"/merges/{job_id}/events", params={"follow": "true"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        for event in parse_sse(response.iter_lines()):
            seen.append(event)
            if event.event == "progress" and timer is None:  # the stream is live: change the job now
                timer = cancel_later(idle_url, job_id, 0.5)
    timer.join()

    recorded = [e for e in seen if e.id is not None]
    page = http.get(f"/merges/{job_id}/events").json()["items"]
    assert [int(e.id) for e in recorded] == [e["id"] for e in page]  # every event once, in order
    assert [e.json() for e in recorded] == page and [e.event for e in recorded] == [e["kind"] for e in page]
    assert [e["message"] for e in page] == ["queued", "cancelled"]
    progress = [e.json() for e in seen if e.event == "progress"]
    assert progress[0]["status"] == "queued" and progress[-1]["status"] == "cancelled"
    assert seen[-1].event == "end" and seen[-1].json()["id"] == job_id
    assert seen[-1].json()["status"] == "cancelled"


def test_event_stream_resumes_after_a_cursor(http, inputs):
    job_id = queued_job(http, inputs)
    assert http.post(f"/merges/{job_id}/cancel").status_code == 200
    first, last = (e["id"] for e in http.get(f"/merges/{job_id}/events").json()["items"])

    def recorded(events: list[SseEvent]) -> list[int]:
        assert events[-1].event == "end"
        return [int(e.id) for e in events if e.id is not None]

    assert recorded(stream(http, job_id)) == [first, last]
    assert recorded(stream(http, job_id, params={"cursor": first})) == [last]
    assert recorded(stream(http, job_id, headers={"Last-Event-ID": str(first)})) == [last]
    # a reconnecting EventSource sends its URL again (with the first cursor) and the last id it saw
    assert recorded(stream(http, job_id, params={"cursor": 0}, headers={"Last-Event-ID": str(last)})) == []
    bad = http.get(f"/merges/{job_id}/events", params={"follow": "true"}, headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422


def test_event_stream_sends_heartbeats_while_nothing_happens(http, inputs, monkeypatch):
    monkeypatch.setattr(watch, "HEARTBEAT_SECONDS", 0.2)
    job_id = queued_job(http, inputs)
    pings = 0
    with http.stream("GET", f"/merges/{job_id}/events", params={"follow": "true"}, timeout=30) as response:
        for line in response.iter_lines():
            pings += line.startswith(":")
            if pings == 2:
                break
    assert pings == 2
    assert http.post(f"/merges/{job_id}/cancel").status_code == 200


def test_waiting_clients_leave_the_sync_endpoints_their_threads(idle_url, http, inputs):
    """More held long-polls than the thread pool has threads (40): a sync endpoint still answers while they wait."""
    job_id = queued_job(http, inputs)
    etag = http.get(f"/merges/{job_id}").headers["etag"]
    finished: list[float] = []

    def hold() -> None:
        with httpx.Client(base_url=idle_url, headers=auth("acme"), timeout=60) as client:
            response = client.get(f"/merges/{job_id}", params={"wait": 6}, headers={"If-None-Match": etag})
            assert response.status_code == 304
            finished.append(time.monotonic())

    holders = [threading.Thread(target=hold) for _ in range(48)]
    for thread in holders:
        thread.start()
    time.sleep(1.0)
    listed = http.get("/merges", params={"limit": 1})  # a sync endpoint: runs on the thread pool
    answered = time.monotonic()
    for thread in holders:
        thread.join()
    assert listed.status_code == 200 and listed.json()["items"]
    assert len(finished) == 48 and answered < min(finished)
    assert http.post(f"/merges/{job_id}/cancel").status_code == 200


def test_event_stream_follows_a_running_job(settings, worker, inputs):
    with live_server(create_app(settings)) as url, httpx.Client(base_url=url, headers=auth("acme"), timeout=60) as http:
        job_id = http.post("/merges", json=merge_body(inputs)).json()["id"]
        with http.stream("GET", f"/merges/{job_id}/events", params={"follow": "true"}) as response:
            events = list(parse_sse(response.iter_lines()))
        page = http.get(f"/merges/{job_id}/events").json()["items"]
    ids = [int(e.id) for e in events if e.id is not None]
    assert ids == [e["id"] for e in page] and len(set(ids)) == len(ids)
    stages = [e.json()["stage"] for e in events if e.event == "stage"]
    assert stages[:4] == ["loading", "fisher_utility", "fisher_safety", "merging"], stages
    statuses = [e.json()["message"] for e in events if e.event == "status"]
    assert statuses[0] == "queued" and statuses[1].startswith("running") and statuses[-1] == "succeeded"
    running = [e.json()["percent"] for e in events if e.event == "progress" and e.json()["status"] == "running"]
    assert running == sorted(running)
    assert events[-1].event == "end" and events[-1].json()["status"] == "succeeded"
    assert json.loads(events[-1].data)["progress"] == {"stage": "done", "percent": 100.0}


def test_several_api_processes_share_metrics_and_stop_without_waiting_for_waiters(assets, tmp_path):
    """`sstmerge serve --no-worker --workers 2`: the Prometheus counters are summed over the processes, and
    SIGTERM stops the server while a long-poll and an event stream are open (they end early) instead of holding
    it for the rest of their wait."""
    port, ops = free_port(), "ops-token-for-this-test"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSTMERGE_")}
    env.update(
        SSTMERGE_MODEL_DIRS=str(assets.models),
        SSTMERGE_API_KEYS=f"acme:{API_KEYS['acme']}",
        SSTMERGE_OPS_TOKEN=ops,
        SSTMERGE_LOG_LEVEL="WARNING",
    )
    command = [sys.executable, "-m", "sstmerge_core.cli", "serve", "--no-worker", "--workers", "2"]
    command += ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url, API_KEYS["acme"]) as client:
            deadline = time.monotonic() + 120
            while not client.ready():
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.3)
            ids = {name: client.upload_adapter(assets.archives[name])["id"] for name in ("utility", "safety")}
            ids |= {f"data:{n}": client.upload_dataset(assets.data[n])["id"] for n in ("utility", "safety")}
            job_id = client.submit(merge_body(ids, base_model="tiny-qwen2"))["id"]
        for _ in range(30):  # a connection each, so that both processes answer some
            assert httpx.get(f"{url}/merges/{job_id}", headers=auth("acme"), timeout=60).status_code == 200
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ops}"}, timeout=60).text
        assert 'sstmerge_http_requests_total{method="GET",route="/merges/{job_id}",status="200"} 30.0' in metrics

        answers: dict[str, object] = {}

        def long_poll() -> None:
            answers["poll"] = httpx.get(
                f"{url}/merges/{job_id}", params={"wait": 60}, headers=auth("acme"), timeout=90
            ).status_code

        def follow() -> None:
            with httpx.stream(
                "GET", f"{url}/merges/{job_id}/events", params={"follow": "true"}, headers=auth("acme"), timeout=90
            ) as response:
                answers["stream"] = [e.event for e in parse_sse(response.iter_lines())]

        waiters = [threading.Thread(target=long_poll), threading.Thread(target=follow)]
        for thread in waiters:
            thread.start()
        time.sleep(2.0)
        os.killpg(server.pid, signal.SIGTERM)
        start = time.monotonic()
        server.wait(45)
        stopped_after = time.monotonic() - start
        for thread in waiters:
            thread.join(30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert server.returncode == 0 and stopped_after < 30, (stopped_after, (tmp_path / "serve.log").read_text()[-2000:])
    assert answers["poll"] == 200 and "progress" in answers["stream"], answers
