"""The page's server through HTTP: bad input gets a clear message and changes nothing outside the
run's folder (broken JSONL, a 200 MB upload, paths that climb out, two trainings at once)."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from uiserver import request, running, wait_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "examples" / "facts"


def snapshot(root: Path, out: Path) -> dict:
    """Every file under root outside the run's folder, with its size and time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and out not in p.parents}


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "notes.txt").write_text("the user's own file\n")
    return root


def upload(url, name, raw):
    return request(url, "PUT", f"/api/data/{name}", raw=raw)


def test_broken_jsonl_is_located_and_not_saved(project):
    out = project / "output"
    before = snapshot(project, out)
    good = (FACTS / "train.jsonl").read_bytes()
    with running(project) as (url, _app):
        status, got = upload(url, "train.jsonl", good)
        assert status == 200 and got["saved"] and got["examples"] == {"train": 160}
        broken = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n' \
                 b'{"messages": [{"role": "bot", "content": "Hi"}]}\n{not json\n'
        status, got = upload(url, "train.jsonl", broken)
        assert status == 200 and got["saved"] is False
        wheres = [p["where"] for p in got["upload_errors"]]
        assert wheres == ["train.jsonl:2", "train.jsonl:3"]
        assert "unknown role 'bot'" in got["upload_errors"][0]["message"]
        assert got["examples"] == {"train": 160}  # the data as they were
        status, got = upload(url, "valid.jsonl", (FACTS / "valid.jsonl").read_bytes())
        assert status == 200 and got["saved"] and got["status"] in (0, 1)
    assert (out / "data" / "train.jsonl").read_bytes() == good
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train.jsonl", "valid.jsonl"]
    assert snapshot(project, out) == before


def test_a_200_mb_upload_is_refused(project):
    out = project / "output"
    before = snapshot(project, out)
    with running(project) as (url, _app):
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
        size, chunk = 200 << 20, b"x" * (1 << 20)
        conn.putrequest("PUT", "/api/data/train.jsonl")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        for _ in range(size // len(chunk)):
            conn.send(chunk)
        resp = conn.getresponse()
        import json

        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 413
        assert "larger than 100 MB" in body["error"] and "nothing was saved" in body["error"]
        assert "--data-dir" in body["fix"]
        status, got = request(url, path="/api/data")
        assert got["examples"] == {}
    assert not (out / "data" / "train.jsonl").exists()
    assert snapshot(project, out) == before


@pytest.mark.parametrize("name", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd"])
def test_paths_from_the_page_stay_inside(project, name):
    out = project / "output"
    before = snapshot(project, out)
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").is_file() else None
    with running(project) as (url, _app):
        status, got = upload(url, name, b"root:x:0:0::/root:/bin/sh\n")
        assert status in (400, 404), got
        if status == 400:
            assert "not a data file name" in got["error"] and "train.jsonl" in got["fix"]
        status, got = request(url, path=f"/api/download/{name}")
        assert status in (400, 404) and got != passwd
        if status == 400:
            assert "no file" in got["error"]
        upload(url, "train.jsonl", (FACTS / "train.jsonl").read_bytes())
        status, got = request(url, "POST", "/api/train", body={"model": name, "iters": 1})
        if "%" not in name:
            assert status == 400 and "outside the project folder" in got["error"], got
            assert "MODEL=PATH" in got["fix"]
        else:  # an encoded name is no path: a would-be repo id nobody can fetch offline
            assert status in (200, 400)
            if status == 200:
                wait_job(url, timeout=60)
        status, got = request(url, path=f"/api/stats?model={name}")
        assert status == 400
    if passwd is not None:
        assert Path("/etc/passwd").read_bytes() == passwd
    assert snapshot(project, out) == before


def test_two_trainings_at_once(project, tiny_model):
    out = project / "output"
    before = snapshot(project, out)
    with running(project, model=str(tiny_model("llama"))) as (url, _app):
        upload(url, "train.jsonl", (FACTS / "train.jsonl").read_bytes())
        upload(url, "valid.jsonl", (FACTS / "valid.jsonl").read_bytes())
        status, first = request(url, "POST", "/api/train", body={"iters": 5000, "batch_size": 1})
        assert status == 200 and first["state"] == "running", first
        status, got = request(url, "POST", "/api/train", body={"iters": 3})
        assert status == 409 and "already running" in got["error"], got
        status, got = request(url, "POST", "/api/convert", body={"quantize": "Q8_0"})
        assert status == 409 and "one job at a time" in got["error"]
        # a second page's server on the same folder refuses too
        with running(project, model=str(tiny_model("llama"))) as (url2, _app2):
            status, got = request(url2, "POST", "/api/train", body={"iters": 3})
            assert status == 409 and "another DonkeyTune page" in got["error"], got
        status, got = request(url, "POST", "/api/stop", body={})
        assert status == 200
        st = wait_job(url, timeout=90)
        assert st["job"]["state"] == "stopped" and st["job"]["returncode"] in (130, -signal.SIGINT)
        status, got = request(url, "POST", "/api/train", body={"iters": 0})
        assert status == 400 and "ITERS must be positive" in got["error"]
    assert snapshot(project, out) == before


def test_ui_command_warns_for_another_host(tmp_path):
    env = dict(os.environ, DONKEYTUNE_PORT="0")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "donkeytune", "ui", "--no-browser", "--host", "0.0.0.0",
                          "--port", str(port)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = p.stderr.readline()
        lines.append(line)
        if "DonkeyTune page" in line or not line:
            break
    time.sleep(0.5)
    status, page = request(f"http://127.0.0.1:{port}", path="/")
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=30)[1]
    text = "".join(lines) + rest
    assert "warning: listening on 0.0.0.0: the page has no login" in text, text
    assert f"at http://127.0.0.1:{port}/" in text and "Page stopped" in text
    assert status == 200 and b"DonkeyTune" in page
    assert p.returncode == 0
