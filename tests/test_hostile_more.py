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


# ---------------------------------------------------------------- a clear error for each input

@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model's weights from here on fails the test: each case is refused before."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def refused(capsys, args, *words) -> str:
    """The CLI (in this process: a traceback would fail the test) exits 2 naming `words`."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert str(w) in err, err
    return err


def model_copy(tiny_model, tmp_path, name="model") -> Path:
    import shutil

    return Path(shutil.copytree(tiny_model("llama"), tmp_path / name))


def fake_run(tiny_model, out: Path) -> Path:
    """A run folder as train leaves it (adapters/donkeytune.json), without training."""
    from donkeytune import runinfo

    model = tiny_model("llama")
    runinfo.write_json(out / "adapters" / files.RUN_FILE, {
        "base_model": str(model), "base_model_path": str(model),
        "base_fingerprint": runinfo.model_fingerprint(model), "options": {}})
    return out


def test_a_5000_digit_number_in_a_json_array_data_file(tmp_path, capsys, tiny_model, no_model_loads):
    rows = json.dumps(ROWS[:3])[:-1] + ', {"messages": ' + "9" * 5000 + "}]"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(rows)
    out = tmp_path / "out"
    assert main(["data", "check", str(tmp_path / "data")]) == 2
    assert "train.json:1: invalid JSON: a number of more than 4300 digits" in capsys.readouterr().out
    refused(capsys, ["train", "--model", tiny_model("llama"), "--data-dir", tmp_path / "data",
                     "--output-dir", out], "more than 4300 digits")
    assert not out.exists()


def _config_list(folder: Path):
    (folder / "config.json").write_text("[]")
    return "config.json is damaged: a JSON object {...} was expected, it holds a list"


def _truncated_weights(folder: Path):
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 3)
    return "model.safetensors is damaged: truncated"


def _remote_tokenizer(folder: Path):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, tokenizer_class="XTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return "needs remote code for its tokenizer"


@pytest.mark.parametrize("damage", [_config_list, _truncated_weights, _remote_tokenizer],
                         ids=["config-is-a-list", "truncated-safetensors", "tokenizer-auto-map"])
def test_a_damaged_or_remote_code_model_folder_is_refused_before_it_loads(
        damage, tiny_model, data_dir, tmp_path, capsys, no_model_loads):
    model = model_copy(tiny_model, tmp_path)
    words = damage(model)
    err = refused(capsys, ["train", "--model", model, "--data-dir", data_dir,
                           "--output-dir", tmp_path / "out", "--num-layers", 1], words)
    if damage is _remote_tokenizer:
        assert "--trust-remote-code" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "serve"])
def test_a_gguf_of_random_bytes(command, data_dir, tmp_path, capsys, no_model_loads):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(os.urandom(4096))
    args = (["train", "--model", fake, "--data-dir", data_dir, "--output-dir", tmp_path / "out"]
            if command == "train" else ["serve", "--gguf", fake, "--port", 1])
    refused(capsys, args, f"{fake} is not a GGUF model file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["read-only", "under-a-file", "sysfs"])
def test_an_unwritable_output_folder_is_refused_before_the_model_loads(
        where, tiny_model, data_dir, tmp_path, capsys, no_model_loads):
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "ro"
        out.mkdir(mode=0o555)
    elif where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs here")
        out = Path("/sys/donkeytune-out")
    refused(capsys, ["train", "--model", tiny_model("llama"), "--data-dir", data_dir,
                     "--output-dir", out], f"cannot write into the output folder {out}",
            "--output-dir")


def test_a_truncated_fused_model_is_fused_again_and_cannot_be_exported(
        tiny_model, tmp_path, capsys):
    from donkeytune import config
    from donkeytune.gguf import convert

    out = fake_run(tiny_model, tmp_path / "out")
    fused = model_copy(tiny_model, out, "fused")
    (fused / files.RUN_FILE).write_text(json.dumps({"options": {"dtype": "auto"}}))
    _truncated_weights(fused)
    opts = config.resolve(config.ConvertOptions, {"output_dir": str(out)}, environ={})
    assert not convert._fused_is_current(opts)  # convert makes it again
    assert "model.safetensors is damaged: truncated" in capsys.readouterr().err
    refused(capsys, ["export", fused, tmp_path / "x.gguf"], "model.safetensors is damaged: truncated")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("content", ["", "{\"base_model\": ", "[1, 2]"], ids=["empty", "cut", "list"])
@pytest.mark.parametrize("command", ["train", "convert", "chat", "summary", "test", "fuse"])
def test_an_empty_or_damaged_run_record(command, content, tiny_model, data_dir, tmp_path, capsys,
                                        no_model_loads, monkeypatch):
    out = fake_run(tiny_model, tmp_path / "out")
    record = out / ("gguf" if command == "chat" else "adapters") / files.RUN_FILE
    record.parent.mkdir(exist_ok=True)
    record.write_text(content)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    args = [command, "--output-dir", out]
    if command == "train":
        args += ["--model", tiny_model("llama"), "--data-dir", data_dir]
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    refused(capsys, args, f"{record} is damaged")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_export_or_quantize_to_a_folder(tiny_model, tmp_path, capsys):
    folder = tmp_path / "gguf"
    folder.mkdir()
    refused(capsys, ["export", tiny_model("llama"), folder], f"the GGUF file {folder} is a folder",
            "give a file path")
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    refused(capsys, ["quantize", fake, folder], "is a folder")
    assert not any(folder.iterdir())


def test_a_test_prompt_longer_than_the_context(tiny_model, tmp_path, capsys, no_model_loads):
    out = fake_run(tiny_model, tmp_path / "out")
    refused(capsys, ["test", "--output-dir", out, "--prompt", "hello " * 3000],
            "tokens: longer than the model's context of 2048 tokens", "shorten the prompt")
    assert not (out / "report").exists()


# ---------------------------------------------------------------- the smaller ones

@pytest.fixture
def tiny_gguf(tiny_model, tmp_path_factory):
    from donkeytune import gguf

    return gguf.export(tiny_model("llama"), tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16")


def test_scripted_chat_exits_2_after_an_error_an_interactive_one_goes_on(tiny_gguf, capsys, monkeypatch):
    import io

    from donkeytune.use import chat

    monkeypatch.setattr("sys.stdin", io.StringIO("hello " * 200 + "\nnot read\n"))
    refused(capsys, ["chat", "--gguf", tiny_gguf, "--n-ctx", 64, "--max-tokens", 2],
            "does not fit the model's context of", "--n-ctx")

    class Full:
        def n_ctx(self):
            return 32

        def create_chat_completion(self, **kw):
            raise ValueError("Requested tokens (300) exceed context window of 32")

    lines = iter(["too long", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.converse(Full(), None, 2, 0.0, prompt=">>> ") == []  # the turn dropped, chat goes on
    assert "does not fit the model's context of 32 tokens" in capsys.readouterr().err


def test_export_removes_the_partial_files_of_killed_writers(tiny_model, tmp_path):
    from donkeytune import gguf

    out = tmp_path / "m.gguf"
    dead = tmp_path / f".m.gguf.{4194304 + 7}.partial"  # above any pid: no such process
    alive = tmp_path / f".m.gguf.{os.getppid()}.partial"  # a writer still at work
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    gguf.export(tiny_model("llama"), out, "f16")
    assert out.is_file() and not dead.exists() and alive.exists()


def test_the_same_model_named_two_ways_is_the_same_model(tiny_model, tmp_path, monkeypatch):
    from donkeytune import config, models, train

    model = tiny_model("llama")
    out = fake_run(tiny_model, tmp_path / "out")  # recorded with its absolute path
    monkeypatch.chdir(model.parent)
    for name in (model.name, f"./{model.name}", f"../{model.parent.name}/{model.name}"):
        opts = config.resolve(config.TrainOptions, {"model": name, "output_dir": str(out)}, environ={})
        train._check_output_dir(opts, None)  # not "another model"
    other = model_copy(tiny_model, tmp_path, "other")
    opts = config.resolve(config.TrainOptions, {"model": str(other), "output_dir": str(out)}, environ={})
    with pytest.raises(ConfigError, match="holds an adapter trained on"):
        train._check_output_dir(opts, None)
    assert models.same_model("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not models.same_model("smollm2-135m", "qwen2.5-0.5b")


def test_num_layers_larger_than_the_model_before_it_loads(tiny_model, data_dir, tmp_path, capsys,
                                                          no_model_loads):
    refused(capsys, ["train", "--model", tiny_model("llama"), "--data-dir", data_dir,
                     "--output-dir", tmp_path / "out", "--num-layers", 5],
            "NUM_LAYERS=5 but the model has only 3 blocks", "NUM_LAYERS=3")


TOOL_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]}
TOOL_RESULT = {"role": "tool", "tool_call_id": "1", "content": "2"}


def test_tool_calls_in_data_and_requests_are_said_unsupported(tmp_path, capsys):
    from donkeytune.use import serve

    user = {"role": "user", "content": "What is 1 + 1?"}
    write_jsonl(tmp_path / "data" / "train.jsonl", [
        {"messages": [user, TOOL_CALL, TOOL_RESULT, {"role": "assistant", "content": "2"}]}])
    assert main(["data", "check", str(tmp_path / "data")]) == 2
    assert "message 2: tool calls are not supported" in capsys.readouterr().out
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    for body in ({"messages": [user], "tools": tools}, {"messages": [user, TOOL_CALL, TOOL_RESULT]}):
        assert "tool calls are not supported" in serve.check_chat(body)
    assert serve.check_chat({"messages": [user], "tools": []}) is None
