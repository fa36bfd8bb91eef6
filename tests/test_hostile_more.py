"""Hostile and careless input, continued (issue 20): one lock per output folder, and a clear
error (exit 2, no traceback) for each input that gave a traceback, with nothing written or lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from donkeytune import files
from donkeytune.cli import main
from donkeytune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                      {"role": "assistant", "content": f"Word {i}: Zanzibar."}]} for i in range(8)]


@pytest.fixture
def data_dir(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)  # no valid.jsonl: no evaluation to wait for
    return tmp_path / "data"


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "donkeytune", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def train_args(model, data, out, iters):
    return ["train", "--model", model, "--data-dir", data, "--output-dir", out, "--iters", iters,
            "--num-layers", 1, "--batch-size", 1, "--steps-per-eval", 100000, "--dtype", "float32",
            "--steps-per-report", 1, "--no-export-check", "--recipe", "seed"]


def clear_error(p, *words):
    """Exit 2, the message names each of `words`, and no traceback."""
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for w in words:
        assert str(w) in p.stderr, p.stderr[-3000:]


# ---------------------------------------------------------------- one lock per output folder

def test_second_train_into_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(
        tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "donkeytune",
                              *map(str, train_args(tiny_model("llama"), data_dir, out, 100000))],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # it holds the folder and trains
            if line.startswith("Iter 1: Train loss"):
                break
        else:
            pytest.fail(f"the first run stopped with status {first.wait()}")
        second = cli(*train_args(tiny_model("llama"), data_dir, out, 2))
        clear_error(second, f"{out} is in use", f"pid {first.pid}", "--output-dir")
        assert not (out / "adapters" / "checkpoints").exists()  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    print(second.stderr)
    # the kernel let go of the killed run's lock: a new run (in this process: quicker) starts
    assert main([*map(str, train_args(tiny_model("llama"), data_dir, out, 1)), "--force"]) == 0
    assert (out / "adapters" / files.ADAPTER_FILE).is_file()
    assert not (out / files.LOCK_FILE).exists()  # held only while a stage runs


def test_folder_lock_is_reentrant_names_its_holder_and_the_page_sees_it(tmp_path):
    from donkeytune.ui.jobs import Busy, Jobs

    out = tmp_path / "out"
    assert files.folder_busy(out) is None
    script = (f"import time; from donkeytune import files\n"
              f"with files.folder_lock({str(out)!r}, 'train'):\n"
              f"    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert f"pid {holder.pid}" in files.folder_busy(out)
        with pytest.raises(ConfigError, match="is in use"):
            with files.folder_lock(out, "convert"):
                pass
        jobs = Jobs(out, ROOT)
        assert f"pid {holder.pid}" in jobs.elsewhere()
        with pytest.raises(Busy, match="started outside this page"):
            jobs.start("convert", ["--output-dir", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert files.folder_busy(out) is None
    with files.folder_lock(out, "convert"), files.folder_lock(out, "fuse"):  # convert calls fuse
        assert files.folder_busy(out)
    assert files.folder_busy(out) is None and not (out / files.LOCK_FILE).exists()
