"""The page's server on a free port in a thread, and a small HTTP client (the standard library's)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def running(root: Path, model: str | None = None, out: str = "output"):
    """Yields the page's base URL; the server and any job it started stop at the end."""
    import uvicorn

    from donkeytune.ui.app import build_app

    app = build_app(out, root, model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.jobs.shutdown()
        sock.close()


def request(url: str, method: str = "GET", path: str = "/", body=None, raw: bytes | None = None,
            timeout: float = 120):
    """(status, decoded JSON or bytes) of one request."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=timeout)
    headers = {}
    if body is not None:
        raw = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=raw, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def wait_job(url: str, states=("finished", "stopped", "failed"), timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, st = request(url, path="/api/state")
        if st["job"] and st["job"]["state"] in states:
            return st
        time.sleep(0.3)
    raise AssertionError(f"job still not in {states} after {timeout}s: {st['job']}")
