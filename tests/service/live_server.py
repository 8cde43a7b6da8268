"""The API on a real socket, in a thread of the test process: uvicorn serving `create_app(settings)`, so that
streaming answers and held requests behave as over the network (the in-process TestClient buffers whole
bodies), while the test can still reach into the same process (monkeypatching module constants)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from app.api.server import server_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(app: FastAPI, timeout: float = 60.0, served: bool = False) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 until the block ends; yields its base URL. `served`: with the options of
    `sstmerge serve` (its guarded protocol, no proxy headers: `app.api.server.server_config`), else uvicorn's
    defaults."""
    port = free_port()
    if served:
        config = server_config(app, app.state.settings, "127.0.0.1", port)
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
