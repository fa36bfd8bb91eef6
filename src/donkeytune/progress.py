"""Messages and progress on stderr: a spinner or bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager


def honour_sigint() -> None:
    """A SIGINT stops a stage cleanly from the process's start on (the page's Stop and a
    terminal's Ctrl-C send one; the training loop turns it into a checkpoint), also when the
    process inherited SIGINT ignored, as the background jobs of a shell script do: Python then
    leaves it ignored, and a stop sent before the training loop began was lost."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def quiet_worker() -> bool:
    """True in a torchrun worker other than the first. torchrun's own TORCHELASTIC_RUN_ID says
    that RANK is its: `make train RANK=16` exports the LoRA rank under the same name."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env or env.get("WORLD_SIZE", "1") in ("", "1"):
        return False
    return env.get("RANK", "0") != "0"


def say(msg: str) -> None:
    if quiet_worker():  # one of several training workers: the first speaks
        return
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    say(f"warning: {msg}")


@contextmanager
def status(msg: str):
    """Show `msg` while the block runs, then how long it took."""
    start = time.perf_counter()
    if sys.stderr.isatty():
        from rich.console import Console  # noqa: PLC0415

        with Console(stderr=True).status(msg):
            yield
    else:
        say(msg + " ...")
        yield
    say(f"{msg}: done in {time.perf_counter() - start:.1f}s")
