"""Issue 18's list, run as written: the real Makefile calling the real CLI on a tiny model.

Each test is one bullet of the issue: `make train ITERS=...` keeps the recipe's other values,
`make test` after training again refuses the old GGUF, `make train-resume RESUME_FROM=...`
trains on the adapter's own base, `make merge-data` into a filled folder backs it up first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from donkeytune import config, files

from conftest import write_jsonl
from test_train import chat as chat_row

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
# small, quick runs; the values the recipe chooses are what the tests look at
TINY_RUN = dict(BATCH_SIZE="2", NUM_LAYERS="1", SAVE_EVERY="100")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A VENV that counts as set up, whose donkeytune is this interpreter's."""
    folder = tmp_path_factory.mktemp("venv")
    (folder / "bin").mkdir()
    (folder / "bin" / "python").symlink_to(sys.executable)
    dt = folder / "bin" / "donkeytune"
    dt.write_text(f"#!{sys.executable}\nimport sys\nfrom donkeytune.cli import main\nsys.exit(main())\n")
    dt.chmod(0o755)
    for stamp in (".installed", ".installed-converter", ".installed-test"):
        (folder / stamp).touch()
    return folder


def make(venv: Path, project: Path, target: str, **variables) -> subprocess.CompletedProcess:
    """`make TARGET NAME=value ...` in the repository, with the project's data and output
    folders (DATA_DIR, OUTPUT_DIR and INPUTS relative to `project`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    variables.setdefault("DATA_DIR", "data")
    for name in ("DATA_DIR", "OUTPUT_DIR", "INPUTS"):
        if name in variables:
            variables[name] = " ".join(str(project / p) for p in variables[name].split())
    args = ["make", "-s", "-C", str(ROOT), target, f"VENV={venv}",
            *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600,
                          stdin=subprocess.DEVNULL)


def recipe_rows(output: str) -> dict[str, tuple[str, str]]:
    """The plan table's rows: NAME -> (value, source)."""
    rows = {}
    for line in output.splitlines():
        m = re.match(r"\s+([A-Z_]+)\s+(\S+)\s+(you|auto|seed)\b", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model):
    """A project folder with a small chat data set."""
    folder = tmp_path_factory.mktemp("project")
    rows = [chat_row(f"What is fact {i}?", f"Fact {i} is {i * 7}.") for i in range(12)]
    write_jsonl(folder / "data" / "train.jsonl", rows[:10])
    write_jsonl(folder / "data" / "valid.jsonl", rows[10:])
    return folder


def test_one_value_changed_keeps_the_recipes_others_and_a_retrained_gguf_is_refused(
        venv, project, tiny_model):
    model = tiny_model("llama")
    p = make(venv, project, "train", MODEL=model, ITERS="2", OUTPUT_DIR="out", **TINY_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = recipe_rows(p.stdout + p.stderr)
    assert rows["ITERS"] == ("2", "you") and rows["BATCH_SIZE"] == ("2", "you")
    assert rows["LR"][1] == "auto" and rows["RANK"][1] == "auto"  # RECIPE=auto fills the rest
    assert float(rows["LR"][0]) != 1e-5  # not the seed's, as before issue 18
    p = make(venv, project, "convert", OUTPUT_DIR="out", QUANTIZE="Q8_0", FIDELITY="0")
    assert p.returncode == 0, p.stderr[-3000:]
    p = make(venv, project, "test-prompt", OUTPUT_DIR="out", PROMPT="What is fact 3?", MAX_TOKENS="4")
    assert p.returncode == 0, p.stderr[-3000:]
    # trained again into the same folder: the GGUF in out/gguf is of the earlier adapter
    p = make(venv, project, "train", MODEL=model, ITERS="3", OUTPUT_DIR="out", FORCE="1", **TINY_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    p = make(venv, project, "test-prompt", OUTPUT_DIR="out", PROMPT="What is fact 3?", MAX_TOKENS="4")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "earlier adapter" in p.stderr and "make convert" in p.stderr
    p = make(venv, project, "convert", OUTPUT_DIR="out", QUANTIZE="Q8_0", FIDELITY="0")
    assert p.returncode == 0, p.stderr[-3000:]
    p = make(venv, project, "test-prompt", OUTPUT_DIR="out", PROMPT="What is fact 3?", MAX_TOKENS="4")
    assert p.returncode == 0, p.stderr[-3000:]


def test_train_resume_without_model_trains_the_adapters_own_base(venv, project, tiny_model):
    model = tiny_model("llama")
    p = make(venv, project, "train", MODEL=model, ITERS="1", OUTPUT_DIR="first", **TINY_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    p = make(venv, project, "train-resume", RESUME_FROM=str(project / "first" / "adapters" / "adapters.safetensors"),
             ITERS="1", OUTPUT_DIR="second", **TINY_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    run = json.loads((project / "second" / "adapters" / files.RUN_FILE).read_text())
    assert Path(run["base_model_path"]).resolve() == Path(model).resolve(), run.get("base_model")


def test_merge_data_into_a_filled_data_folder_backs_it_up_first(venv, tmp_path):
    """The seed's Method A, as its README writes it, into a ./data that already holds data."""
    write_jsonl(tmp_path / "datasets" / "a" / "train.jsonl", [chat_row(f"a{i}", "x") for i in range(6)])
    write_jsonl(tmp_path / "datasets" / "b" / "train.jsonl", [chat_row(f"b{i}", "y") for i in range(6)])
    old = write_jsonl(tmp_path / "data" / "train.jsonl", [chat_row("mine", "keep me")]).read_text()
    p = make(venv, tmp_path, "merge-data", INPUTS="datasets/a datasets/b")
    assert p.returncode == 0, p.stderr[-3000:]
    backups = sorted((tmp_path / "data").glob("backup-*"))
    assert len(backups) == 1 and (backups[0] / "train.jsonl").read_text() == old
    assert str(backups[0].name) in p.stdout + p.stderr  # it says where
    merged = (tmp_path / "data" / "train.jsonl").read_text()
    assert "a0" in merged and "b5" in merged and "keep me" not in merged
