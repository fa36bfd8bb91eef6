"""Each CLI stage through the real console script, on a tiny model, checking what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import write_jsonl
from donkeytune import runinfo

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None, cwd=ROOT):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "donkeytune", *args], capture_output=True,
                          text=True, timeout=600, env=full_env, cwd=cwd)


def test_train_fuse_test_through_the_cli(tiny_model, tmp_path):
    data = tmp_path / "data"
    rows = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                          {"role": "assistant", "content": f"Word {i}: Zanzibar."}]} for i in range(8)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "valid.jsonl", rows[:2])
    (tmp_path / "run.yaml").write_text("iters: 50\nsteps_per_report: 2\nlr: 1.0e-3\n")
    out = tmp_path / "out"
    # Make-variable style environment beats the YAML; the flag beats both.
    env = {"DONKEYTUNE_ITERS": "40", "DONKEYTUNE_DATA_DIR": str(data), "DONKEYTUNE_MODEL": str(tiny_model("llama"))}
    p = run("train", "--config", str(tmp_path / "run.yaml"), "--iters", "4", "--output-dir", str(out),
            "--num-layers", "-1", "--save-every", "2", env=env)
    assert p.returncode == 0, p.stderr
    assert "Iter 4: Train loss" in p.stdout and "Iter 5:" not in p.stdout  # flag won: 4 iterations
    assert "Iter 2: Train loss" in p.stdout and "Learning Rate 1.000e-03" in p.stdout  # YAML values
    assert "8 train / 2 valid examples" in p.stderr and "4 iterations x 4 examples = 2.0 epochs" in p.stderr
    adapters = out / "adapters"
    assert sorted(p.name for p in (adapters / "checkpoints").iterdir()) == ["0000002"]
    assert (adapters / "adapters.safetensors").read_bytes() == (adapters / "adapter_model.safetensors").read_bytes()

    p = run("fuse", "--output-dir", str(out))  # MODEL comes from the run's metadata
    assert p.returncode == 0, p.stderr
    assert (out / "fused" / "model.safetensors").is_file()

    p = run("test", "--output-dir", str(out), "--max-tokens", "5")  # prompts from the run's data
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Q: ") == 2 and p.stdout.count("base:") == 2
    assert "Q: Say the word number 0." in p.stdout

    p = run("test", "--output-dir", str(out), "--max-tokens", "3", "--prompt", "Hello?", "--no-base")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Q: Hello?") == 1 and "base:" not in p.stdout

    # convert: the fused model is current, so it is reused; f16 + quantized GGUF are written
    p = run("convert", "--output-dir", str(out), env={"DONKEYTUNE_QUANTIZE": "Q8_0"})
    assert p.returncode == 0, p.stderr
    assert "Fusing" not in p.stderr
    name = tiny_model("llama").name
    gguf_dir = out / "gguf"
    assert {p.name for p in gguf_dir.iterdir()} == {
        f"{name}-finetuned-f16.gguf", f"{name}-finetuned-Q8_0.gguf", "donkeytune.json", "Modelfile",
        "fidelity.json"}
    assert f"ollama create {name}-finetuned -f {gguf_dir / 'Modelfile'}" in p.stderr
    # every GGUF written was checked against the fused model; the explicit type was kept
    doc = json.loads((gguf_dir / "fidelity.json").read_text())
    assert doc["chosen"] == f"{name}-finetuned-Q8_0.gguf"
    assert [r["type"] for r in doc["results"]] == ["F16", "Q8_0"]
    assert all(r["kl"] < 0.01 for r in doc["results"]), doc["results"]
    assert "Fidelity of the GGUF files against the fused model" in p.stderr
    assert "## GGUF fidelity" in (out / "report" / "summary.md").read_text()

    # after convert, `test` runs the quantized GGUF in llama.cpp, beside the base model's GGUF
    p = run("test", "--output-dir", str(out), "--max-tokens", "4", "--num-prompts", "1")
    assert p.returncode == 0, p.stderr
    assert f"Testing the GGUF {gguf_dir / (name + '-finetuned-Q8_0.gguf')} in llama.cpp" in p.stderr
    assert p.stdout.count("Q: ") == 1 and p.stdout.count("base:") == 1

    # the summary that ends `make demo` / `make all`: what, where, how to run it, the answers
    p = run("summary", "--output-dir", str(out))
    assert p.returncode == 0, p.stderr
    for text in (f"Trained   {tiny_model('llama')} on {data} (8 examples): 4 iterations x 4",
                 f"GGUF      {gguf_dir / (name + '-finetuned-Q8_0.gguf')}",
                 f"ollama create {name}-finetuned -f {gguf_dir / 'Modelfile'}",
                 f"Answers (llama.cpp, {name}-finetuned-Q8_0.gguf):", "Q: Say the word number 0.",
                 "next-token agreement"):
        assert text in p.stdout, text

    p = run("export-adapter", str(out / "adapters"), str(tmp_path / "lora.gguf"))
    assert p.returncode == 0, p.stderr

    # each GGUF records the adapter and base it came from
    record = json.loads((gguf_dir / "donkeytune.json").read_text())
    assert set(record["files"]) == {f"{name}-finetuned-f16.gguf", f"{name}-finetuned-Q8_0.gguf"}
    assert record["files"][f"{name}-finetuned-Q8_0.gguf"]["adapter_fingerprint"] == \
        runinfo.adapter_fingerprint(adapters)
    # trained again (the adapter changed): test and chat refuse the old GGUF and say the fix
    from safetensors.torch import load_file, save_file
    # (a new training rewrites the last adapter and the best one, adapters/best, alike)
    for weights_file in [adapters / "adapter_model.safetensors", *adapters.glob("best/adapter_model.safetensors")]:
        weights = load_file(weights_file)
        save_file({k: v + 0.01 for k, v in weights.items()}, weights_file)
    for command in ("test", "chat"):
        p = run(command, "--output-dir", str(out), "--max-tokens", "2")
        assert p.returncode != 0 and "converted from an earlier adapter" in p.stderr, p.stderr
        assert "make convert" in p.stderr
    # convert redoes the stale conversion (fuse included), then test runs it
    p = run("convert", "--output-dir", str(out), env={"DONKEYTUNE_QUANTIZE": "Q8_0"})
    assert p.returncode == 0 and "Fusing" in p.stderr, p.stderr
    p = run("test", "--output-dir", str(out), "--max-tokens", "2", "--num-prompts", "1", "--no-base")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "lora.gguf").stat().st_size > 0


def test_export_and_quantize_commands(tiny_model, tmp_path):
    f16 = tmp_path / "m-f16.gguf"
    p = run("export", str(tiny_model("qwen2")), str(f16), "--outtype", "f16")
    assert p.returncode == 0, p.stderr
    p = run("quantize", str(f16), str(tmp_path / "m-q4.gguf"), "--type", "Q4_K_M")
    assert p.returncode == 0, p.stderr
    assert 0 < (tmp_path / "m-q4.gguf").stat().st_size < f16.stat().st_size
    p = run("quantize", str(f16), str(tmp_path / "x.gguf"), "--type", "Q3_XL")
    assert p.returncode == 2
    assert "unknown quantization type 'Q3_XL'" in p.stderr and "Q4_K_M" in p.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_help_explains_options():
    p = run("train", "--help")
    assert p.returncode == 0
    for text in ("--iters", "[ITERS]", "--batch-size", "examples per optimizer step", "--resume-from",
                 "--train-on-prompt"):
        assert text in p.stdout
    p = run("--help")
    assert all(c in p.stdout for c in ("train", "fuse", "test", "models"))


def test_test_without_a_run_says_what_to_do(tmp_path):
    p = run("test", "--output-dir", str(tmp_path))
    assert p.returncode == 2
    assert "holds no trained adapter" in p.stderr and "make train" in p.stderr
