"""The page's long jobs: `donkeytune train | convert | test` as subprocesses, one at a time.

A subprocess of the CLI runs the same stage function as a terminal would, the page survives
its crash, and a stop is a real SIGINT (the stage's clean stop: checkpoint, then exit 130).
A job file in the run's folder also keeps a second page server on the same folder from
starting a job while another one runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DonkeyError
from ..files import folder_busy

KINDS = ("train", "convert", "test")
STOP_WAIT = 120  # seconds a stopping job gets before the page's server gives up on it


class Busy(DonkeyError):
    """A job is already running in this run's folder."""

    status = 409


@dataclass
class Job:
    kind: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    stopping: bool = False

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> dict:
        rc = self.proc.poll()
        if rc is None:
            state = "stopping" if self.stopping else "running"
        elif rc == 0:
            state = "finished"
        elif rc in (130, -signal.SIGINT):  # stopped in its loop, or before it began
            state = "stopped"
        else:
            state = "failed"
        return {"kind": self.kind, "state": state, "pid": self.proc.pid, "returncode": rc,
                "started": self.started, "command": "donkeytune " + " ".join(self.argv)}


class Jobs:
    """The job of one run folder: start, stop, wait; the log goes to OUT/ui/<kind>.log."""

    def __init__(self, out: Path, cwd: Path):
        self.out, self.cwd = Path(out), Path(cwd)
        self.folder = self.out / "ui"
        self.job_file = self.folder / "job.json"
        self.current: Job | None = None
        self.token = uuid.uuid4().hex  # who wrote the job file: this page's server or another
        self._lock = threading.Lock()

    def start(self, kind: str, args: list[str]) -> Job:
        assert kind in KINDS
        with self._lock:
            if self.current is not None and self.current.running:
                raise Busy(f"a {self.current.kind} job is already running (pid "
                           f"{self.current.proc.pid}); one job at a time",
                           "wait for it to finish, or stop it first")
            other = self._other_job()
            if other:
                raise Busy(f"another DonkeyTune page is running a {other['kind']} job in "
                           f"{self.out} (pid {other['pid']})", "wait for it, or stop it there")
            outside = self.elsewhere()
            if outside:
                raise Busy(f"a DonkeyTune run started outside this page is writing in {self.out} "
                           f"({outside})", "wait for it to finish, or stop it where it runs")
            self.folder.mkdir(parents=True, exist_ok=True)
            log = self.folder / f"{kind}.log"
            argv = [kind, *args]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with log.open("wb") as f:  # the child keeps its own handle
                proc = subprocess.Popen([sys.executable, "-m", "donkeytune", *argv], cwd=self.cwd,
                                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)  # Ctrl-C of the page: we stop it
            self.current = Job(kind, argv, log, proc)
            self.job_file.write_text(json.dumps({"pid": proc.pid, "kind": kind,
                                                 "server": self.token}))
            threading.Thread(target=self._reap, args=(self.current,), daemon=True).start()
            return self.current

    def stop(self) -> Job:
        """SIGINT, as Ctrl-C in a terminal: training saves a checkpoint and exits."""
        job = self.current
        if job is None or not job.running:
            raise DonkeyError("no job is running", "start one first")
        job.stopping = True
        os.kill(job.proc.pid, signal.SIGINT)
        return job

    def shutdown(self) -> None:
        """The page's server stops: stop the job cleanly and wait for it."""
        job = self.current
        if job is not None and job.running:
            job.stopping = True
            job.proc.send_signal(signal.SIGINT)
            try:
                job.proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                job.proc.kill()

    def describe(self) -> dict | None:
        return self.current.describe() if self.current else None

    def elsewhere(self) -> str | None:
        """Who holds the run folder's lock while this page runs no job there: a `donkeytune
        train` (or convert, ...) started from a terminal, say."""
        if self.current is not None and self.current.running:
            return None  # our own job holds it
        return folder_busy(self.out)

    def _reap(self, job: Job) -> None:
        job.proc.wait()
        with self._lock:
            if self.current is job:
                self.job_file.unlink(missing_ok=True)

    def _other_job(self) -> dict | None:
        """The job another page's server started here, if it still runs."""
        try:
            other = json.loads(self.job_file.read_text())
            os.kill(int(other["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return other if other.get("server") != self.token else None
