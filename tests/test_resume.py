"""Long runs that survive: exact resume after SIGTERM, bounded checkpoints, divergence, no mix-ups."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from donkeytune import config, train
from donkeytune.errors import ConfigError

ROWS = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(10)]


@pytest.fixture
def data_dir(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "valid.jsonl", ROWS[:3])
    return tmp_path / "data"


def train_args(model, data_dir, out, iters=30, dtype="float32"):
    # dropout on: a resumed run must restore the random state too, not only the weights
    return ["train", "--model", str(model), "--data-dir", str(data_dir), "--output-dir", str(out),
            "--iters", str(iters), "--batch-size", "2", "--num-layers", "2", "--lr", "1e-3",
            "--dropout", "0.1", "--steps-per-report", "1", "--steps-per-eval", "10",
            "--save-every", "100", "--dtype", dtype]


def cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "donkeytune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "report" / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["step_loss"] for r in rows if "step_loss" in r}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 on CPU: packed weights
def test_sigterm_then_resume_matches_the_uninterrupted_run(dtype, tiny_model, data_dir, tmp_path):
    model = tiny_model("llama")
    reference = cli(train_args(model, data_dir, tmp_path / "ref", dtype=dtype))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()

    stop_after = random.Random().randint(3, 15)
    proc = cli(train_args(model, data_dir, tmp_path / "run", dtype=dtype))
    for line in proc.stdout:
        if line.startswith(f"Iter {stop_after}: Train loss"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err
    adapters = tmp_path / "run" / "adapters"
    stopped = json.loads((adapters / "donkeytune.json").read_text())
    assert not stopped["complete"] and stop_after <= stopped["iteration"] < 30

    # a plain new run would overwrite the interrupted one: refused, with the way out
    blocked = cli(train_args(model, data_dir, tmp_path / "run", dtype=dtype), stdin=subprocess.DEVNULL)
    _, err = blocked.communicate(timeout=600)
    assert blocked.returncode == 2 and "holds an interrupted run" in err and "--resume" in err

    # --resume alone: the run's own options come from its checkpoint
    resumed = cli(["train", "--resume", "--output-dir", str(tmp_path / "run")], cwd=tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"Resuming at iteration {stopped['iteration']}" in err

    want, got = step_losses(tmp_path / "ref"), step_losses(tmp_path / "run")
    assert sorted(got) == sorted(want) == list(range(1, 31))
    for it in want:
        assert abs(got[it] - want[it]) <= 1e-6, (it, got[it], want[it])
    assert json.loads((adapters / "donkeytune.json").read_text())["complete"]


def options(model, data_dir, out, **kw):
    flags = dict(model=str(model), data_dir=str(data_dir), output_dir=str(out), iters=10,
                 batch_size=2, num_layers=1, steps_per_eval=100, dtype="float32")
    return config.resolve(config.TrainOptions, flags | kw, environ={})


def test_keep_bounds_the_checkpoints(tiny_model, data_dir, tmp_path):
    train.run(options(tiny_model("llama"), data_dir, tmp_path, save_every=2, keep=2))
    names = sorted(p.name for p in (tmp_path / "adapters" / "checkpoints").iterdir())
    assert names == ["0000006", "0000008"]
    assert (tmp_path / "adapters" / "checkpoints" / "0000008" / "trainer_state.safetensors").is_file()
    assert not (tmp_path / "adapters" / "trainer_state.safetensors").exists()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_model, data_dir, tmp_path, capsys):
    from donkeytune.cli import main

    args = train_args(tiny_model("llama"), data_dir, tmp_path, iters=60)
    args[args.index("--lr") + 1] = "1e30"  # overflows float32 within a few steps
    args[args.index("--save-every") + 1] = "1"
    status = main(args)
    err = capsys.readouterr().err
    assert status == 1
    assert "the loss became nan" in err or "the loss became inf" in err
    assert "lower LR" in err
    run = json.loads((tmp_path / "adapters" / "donkeytune.json").read_text())
    assert not run["complete"] and run["iteration"] >= 1  # the last finite step's adapter is kept


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        train.run(config.resolve(config.TrainOptions, {"resume": True, "output_dir": str(tmp_path),
                                                       "data_dir": str(data_dir)}, environ={}))


def test_resume_and_resume_from_together_are_refused():
    with pytest.raises(ConfigError, match="give one of them"):
        config.resolve(config.TrainOptions, {"resume": True, "resume_from": "x"}, environ={})


def test_hf_token_never_reaches_output(tiny_model, data_dir, tmp_path):
    secret = "hf_DonkeyTuneSecret0123456789"
    env = dict(os.environ, HF_TOKEN=secret)
    out = tmp_path / "out"
    for args in (train_args(tiny_model("llama"), data_dir, out, iters=2), ["fuse", "--output-dir", str(out)]):
        p = subprocess.run([sys.executable, "-m", "donkeytune", *args], capture_output=True,
                           text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr
        assert secret not in p.stdout + p.stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_a_stop_before_the_loop_counts_when_sigint_was_inherited_ignored(tiny_model, data_dir, tmp_path):
    """A shell script's background job (and so the page's server started from one) passes SIGINT
    on ignored; Python then leaves it ignored, and the page's Stop, sent before the training loop
    began, was lost: the run went on to its last iteration."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "donkeytune", "train", "--model", str(tiny_model("llama")),
         "--data-dir", str(data_dir), "--output-dir", str(out), "--iters", "100000",
         "--batch-size", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(1.5)  # importing, before the training loop
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(120) in (130, -signal.SIGINT)
    finally:
        proc.kill()
