"""The real Makefile: every Make variable an option declares reaches the CLI, and the
seed's set-up and clean targets do what the README says.

`make` runs with DT pointing at a probe: the real CLI parser and option resolution, whose
stage functions only record the options they were given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from donkeytune import config

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make") or "make"
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

PROBE = """#!{python}
import dataclasses, json, os, sys
from donkeytune import cli

def recorder(command):
    def run(opts):
        with open(os.environ["PROBE_LOG"], "a") as f:
            f.write(json.dumps(dict(command=command, argv=sys.argv[1:],
                                    opts=dataclasses.asdict(opts) if opts else None)) + "\\n")
    return run

for name, (cls, fn, help_) in list(cli.COMMANDS.items()):
    if isinstance(fn, dict):
        for sub, (c, _f, h) in list(fn.items()):
            fn[sub] = (c, recorder(name + " " + sub), h)
    else:
        cli.COMMANDS[name] = (cls, recorder(name), help_)
sys.exit(cli.main())
"""

# make target -> (CLI command it runs, that command's options)
TARGETS = {
    "train": ("train", config.TrainOptions),
    "fuse": ("fuse", config.FuseOptions),
    "test": ("test", config.TestOptions),
    "convert": ("convert", config.ConvertOptions),
    "chat": ("chat", config.ChatOptions),
    "serve": ("serve", config.ServeOptions),
    "merge-data": ("data merge", config.DataMergeOptions),
    "ui": ("ui", config.UiOptions),
}
# values that pass validation together (the others are derived from the field's type)
VALUES = dict(ENGINE="torch", DEVICE="cpu", DTYPE="float32", RECIPE="seed", QUANTIZE="Q8_0",
              OUTTYPE="bf16", FUSE_DTYPE="bfloat16", DEVICES="2", BATCH_SIZE="6", PORT="8123",
              HOST="0.0.0.0", INPUTS="probe/a probe/b", PROMPT="What is the capital of France?",
              N_CTX="512", TEMPERATURE="0.25", DROPOUT="0.1", LR="0.003", SCALE="3.5",
              NNODES="2", NODE_RANK="1")
# given alone: they contradict another name, or need a package this machine may lack
ALONE = {"RESUME": "1", "ALPHA": "24", "QUANTIZE_BASE": "4"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A fake VENV that counts as set up, and DT = the probe."""
    tmp = tmp_path_factory.mktemp("make")
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    for stamp in (".installed", ".installed-converter", ".installed-serve", ".installed-test", ".installed-ui"):
        (venv / stamp).touch()
    dt = tmp / "dt"
    dt.write_text(PROBE.format(python=sys.executable))
    dt.chmod(0o755)
    return tmp, venv, dt


def run_make(probe, target, variables, env_extra=None):
    tmp, venv, dt = probe
    log = tmp / "log.jsonl"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env.update(PROBE_LOG=str(log), **(env_extra or {}))
    args = [MAKE, "-s", "-C", str(ROOT), target, f"VENV={venv}", f"DT={dt}",
            *(f"{k}={v}" for k, v in variables.items())]
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp, timeout=60)
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return p, runs


def sample(f: dataclasses.Field, tp) -> str:
    """A value for the field that is not its default."""
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != f.default)
    if tp is bool:
        return "0" if f.default else "1"
    if tp in (int, float):
        return str((f.default or 0) + 3)
    return f"probe-{f.name}"


def expected(cls, name: str, value: str):
    f = next(f for f in dataclasses.fields(cls) if f.metadata.get("env") == name)
    return f.name, config.convert(value, config.field_types(cls)[f.name], f.name)


def test_makefile_reads_the_declared_names():
    p = subprocess.run([MAKE, "-s", "-C", str(ROOT), "vars"], capture_output=True, text=True)
    assert set(p.stdout.split()) == config.make_names()


def test_every_declared_make_name_reaches_the_cli(probe, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps_per_report: 3\n")
    reached: set[str] = set()
    for target, (command, cls) in TARGETS.items():
        types_ = config.field_types(cls)
        names = {f.metadata["env"]: sample(f, types_[f.name])
                 for f in dataclasses.fields(cls) if f.metadata.get("env")}
        names = {k: VALUES.get(k, v) for k, v in names.items() if k not in ALONE and k != "REPORT_TO"}
        batches = [names] + [{k: v} for k, v in ALONE.items() if k in config.make_names([cls])]
        for variables in batches:
            p, runs = run_make(probe, target, {**variables, "CONFIG": str(yaml_file)})
            assert p.returncode == 0, (target, variables, p.stderr)
            assert [r["command"] for r in runs] == [command], (target, p.stdout, p.stderr)
            opts = runs[0]["opts"]
            for name, value in variables.items():
                field, want = expected(cls, name, value)
                default = next(f.default for f in dataclasses.fields(cls) if f.name == field)
                assert want != default, (name, "the sample must differ from the default")
                assert opts[field] == want, (target, name, opts[field], want)
                reached.add(name)
            if "steps_per_report" in opts:
                assert opts["steps_per_report"] == 3  # CONFIG reached it
                reached.add("CONFIG")
    # REPORT_TO: the CLI checks its package first, so its error shows it arrived
    p, _ = run_make(probe, "train", {"REPORT_TO": "tensorboard"})
    if "tensorboard" not in sys.modules and p.returncode != 0:
        assert "--report-to tensorboard" in p.stderr
    reached.add("REPORT_TO")
    assert reached == config.make_names(), config.make_names() - reached


def test_environment_variables_reach_the_cli_too(probe):
    p, runs = run_make(probe, "train", {}, env_extra={"ITERS": "77", "RESUME": "1"})
    assert p.returncode == 0, p.stderr
    assert runs[0]["opts"]["iters"] == 77 and runs[0]["opts"]["resume"] is True
    p, runs = run_make(probe, "train", {})
    assert runs[0]["opts"]["iters"] is None and runs[0]["opts"]["resume"] is False


def test_seed_targets_pass_their_values(probe):
    p, runs = run_make(probe, "train-resume", {"RESUME_FROM": "out/adapters/adapters.safetensors"})
    assert p.returncode == 0 and runs[0]["opts"]["resume_from"] == "out/adapters/adapters.safetensors"
    p, runs = run_make(probe, "test-prompt", {"PROMPT": "Hi there"})
    assert runs[0]["command"] == "test" and runs[0]["opts"]["prompt"] == "Hi there"
    p, runs = run_make(probe, "train-merged", {"INPUTS": "a b", "RESUME_FROM": "x", "OUTPUT_DIR": "o"})
    assert [r["command"] for r in runs] == ["data merge", "train"]
    assert runs[0]["opts"]["out"] == "o/merged-data" and runs[1]["opts"]["data_dir"] == "o/merged-data"
    p, runs = run_make(probe, "all", {"ITERS": "5"})
    assert [r["command"] for r in runs] == ["train", "convert", "test", "summary"]


def test_clean_output_honours_output_dir(probe, tmp_path):
    out = tmp_path / "runs"
    for sub in ("adapters", "fused", "gguf", "report"):
        (out / sub).mkdir(parents=True)
        (out / sub / "f").write_text("x")
    keep = tmp_path / "output"
    keep.mkdir()
    p, _ = run_make(probe, "clean-output", {"OUTPUT_DIR": str(out)})
    assert p.returncode == 0, p.stderr
    assert not out.exists() and keep.exists()


def test_clean_cache_says_its_size_then_removes_it(probe, tmp_path):
    cache = tmp_path / "cache"
    (cache / "imported").mkdir(parents=True)
    (cache / "imported" / "model.safetensors").write_bytes(b"0" * 100_000)
    p, _ = run_make(probe, "clean-cache", {}, env_extra={"DONKEYTUNE_CACHE": str(cache)})
    assert p.returncode == 0 and f"removing {cache}" in p.stdout and "K" in p.stdout
    assert not cache.exists()
    p, _ = run_make(probe, "clean-cache", {}, env_extra={"DONKEYTUNE_CACHE": str(cache)})
    assert "nothing to remove" in p.stdout


def _fake_bin(tmp_path, versions: dict[str, tuple]) -> Path:
    """A PATH folder with pythons that report the given versions."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, version in versions.items():
        exe = bin_ / name
        exe.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo Python {'.'.join(map(str, version))}"
                       f" && exit 0\nexit {0 if version >= (3, 10) else 1}\n")
        exe.chmod(0o755)
    return bin_


def test_setup_takes_the_newest_python_3_10_or_later(tmp_path):
    bin_ = _fake_bin(tmp_path, {"python3": (3, 9, 6), "python3.11": (3, 11, 2), "python3.12": (3, 12, 1)})
    venv = tmp_path / "v"
    p = subprocess.run([MAKE, "-n", "-C", str(ROOT), f"VENV={venv}", f"{venv}/bin/python"],
                       capture_output=True, text=True, env={"PATH": str(bin_), "HOME": str(tmp_path)})
    assert f"python3.12 -m venv {venv}" in p.stdout, p.stdout + p.stderr


def test_setup_stops_with_the_install_command_when_python_is_too_old(tmp_path):
    bin_ = _fake_bin(tmp_path, {"python3": (3, 9, 6)})
    venv = tmp_path / "v"
    p = subprocess.run([MAKE, "-C", str(ROOT), f"VENV={venv}", "setup"],
                       capture_output=True, text=True, env={"PATH": str(bin_), "HOME": str(tmp_path)})
    assert p.returncode != 0 and not venv.exists()
    assert "Python 3.10 or newer" in p.stdout and "Python 3.9.6" in p.stdout
    assert "brew install python@3.12" in p.stdout
