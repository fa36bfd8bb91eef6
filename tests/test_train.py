"""Training, saving, fusing and resuming on tiny random models of several architectures."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import write_jsonl
from donkeytune import config, fuse, runinfo, train
from donkeytune.cli import main
from donkeytune.errors import ConfigError, ModelError
from donkeytune.train import adapter
from donkeytune.train import torch as torch_engine

FACTS = [("What is the code word?", "The code word is Zanzibar."),
         ("Who guards the gate?", "The gate is guarded by Pimbleton."),
         ("How many moons does Vessa have?", "Vessa has seven moons."),
         ("What colour is the door?", "The door is teal.")]


def chat(q, a):
    return {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    write_jsonl(d / "train.jsonl", [chat(q, a) for q, a in FACTS * 3])
    write_jsonl(d / "valid.jsonl", [chat(q, a) for q, a in FACTS])
    return d


def options(model, data_dir, out, **kw):
    flags = dict(model=str(model), data_dir=str(data_dir), output_dir=str(out), iters=24,
                 batch_size=4, num_layers=2, lr=3e-3, scale=10.0, steps_per_eval=12,
                 steps_per_report=6, save_every=12, dropout=0.0, dtype="float32")
    flags.update(kw)
    return config.resolve(config.TrainOptions, flags, environ={})


def val_losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"Val loss ([\d.]+)", text)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_loss_falls_and_files_are_written(arch, tiny_model, data_dir, tmp_path, capsys):
    out = train.run(options(tiny_model(arch), data_dir, tmp_path / "out"))
    text = capsys.readouterr().out
    losses = val_losses(text)
    assert len(losses) == 3  # start, every 12 steps, end
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.8 * losses[0]
    assert re.search(r"Iter 6: Train loss [\d.]+, Learning Rate 3.000e-03, It/sec [\d.]+, "
                     r"Tokens/sec [\d.]+, Trained Tokens \d+, Peak mem [\d.]+ GB", text)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "adapters.safetensors",
            "donkeytune.json", "checkpoints"} <= names
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0000012"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 80 and cfg["layers_to_transform"] == [1, 2]
    run = runinfo.read_run(out)
    assert run["complete"] and run["iteration"] == 24 and run["options"]["lr"] == 3e-3
    assert run["data_fingerprint"] and run["base_fingerprint"]


def trained_model_and_logits(model_dir, data_dir, out):
    """Train briefly, keep the in-memory model's logits, and return them with a probe input."""
    opts = options(model_dir, data_dir, out, iters=6, steps_per_eval=100, save_every=100)
    train.run(opts)
    return opts


def base_plus_adapter(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


PROBE = torch.tensor([[1, 50, 300, 7, 999, 42, 17, 5]])


def test_saved_adapter_gives_the_training_logits(tiny_model, tmp_path):
    """The adapter PEFT loads from disk computes what the model in training computed."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("llama")
    opts = options(model_dir, tmp_path, tmp_path / "out")
    model = torch_engine.add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), opts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained-looking adapter: lora_B starts at zero
    model.eval()
    with torch.no_grad():
        expected = model(PROBE).logits
    adapter.save_adapter(model, opts.adapter_dir, {"stage": "train"})
    with torch.no_grad():
        got = base_plus_adapter(model_dir, opts.adapter_dir)(PROBE).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(PROBE).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapter does change the output


def test_fused_logits_equal_base_plus_adapter(tiny_model, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("qwen2")
    opts = trained_model_and_logits(model_dir, data_dir, tmp_path / "out")
    fused = fuse.run(config.resolve(config.FuseOptions, {"output_dir": opts.output_dir}, environ={}))
    with torch.no_grad():
        want = base_plus_adapter(model_dir, opts.adapter_dir)(PROBE).logits
        got = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32)(PROBE).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(PROBE).logits
    assert (got - want).abs().max() <= 1e-3
    assert (got - base).abs().max() > 1e-3
    assert {"config.json", "model.safetensors", "tokenizer.json", "donkeytune.json"} <= {
        p.name for p in fused.iterdir()}


def test_fused_in_the_base_dtype_gives_the_same_gguf_logits(tiny_model, data_dir, tmp_path):
    """A bf16 base is fused (in fp32) and written in bf16: half the disk, same GGUF logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from donkeytune import gguf
    from test_gguf import assert_close, cpp_logits, prompt_ids

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model("llama")).save_pretrained(base)
    opts = trained_model_and_logits(base, data_dir, tmp_path / "out")
    logits, sizes = {}, {}
    for dtype in ("auto", "float32"):
        fused = fuse.run(config.resolve(config.FuseOptions, {"output_dir": opts.output_dir,
                                                             "dtype": dtype}, environ={}))
        sizes[dtype] = (fused / "model.safetensors").stat().st_size
        assert json.loads((fused / "donkeytune.json").read_text())["dtype"] == \
            ("bfloat16" if dtype == "auto" else "float32")
        out = gguf.export(fused, tmp_path / f"{dtype}.gguf", "f16")
        logits[dtype] = cpp_logits(out, prompt_ids(fused))
    assert sizes["auto"] < 0.6 * sizes["float32"]
    assert_close(logits["auto"], logits["float32"], rel=2e-2)


def test_model_that_is_not_the_adapters_base_is_refused(tiny_model, data_dir, tmp_path, capsys):
    opts = trained_model_and_logits(tiny_model("llama"), data_dir, tmp_path / "out")
    other = tiny_model("qwen2")
    status = main(["test", "--output-dir", opts.output_dir, "--model", str(other), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"the adapter was trained on {str(tiny_model('llama'))!r}, but MODEL is {str(other)!r}" in err
    with pytest.raises(ModelError, match="trained on"):
        fuse.run(config.resolve(config.FuseOptions, {"output_dir": opts.output_dir,
                                                     "model": str(other)}, environ={}))


def test_resume_from_adapter(tiny_model, data_dir, tmp_path, capsys):
    model_dir = tiny_model("llama")
    first = trained_model_and_logits(model_dir, data_dir, tmp_path / "a")
    capsys.readouterr()
    resumed = options(model_dir, data_dir, tmp_path / "b", iters=6, steps_per_eval=100,
                      resume_from=str(first.adapter_dir / "adapters.safetensors"))
    train.run(resumed)
    text = capsys.readouterr()
    fresh = options(model_dir, data_dir, tmp_path / "c", iters=6, steps_per_eval=100)
    train.run(fresh)
    fresh_text = capsys.readouterr().out
    # Starting from the trained adapter, the first validation loss is the first run's last one.
    assert "Resuming from the adapter weights" in text.err
    assert val_losses(text.out)[0] < val_losses(fresh_text)[0]
    assert runinfo.read_run(resumed.adapter_dir)["resumed_from"].endswith("adapters.safetensors")


def test_resume_with_other_rank_or_model_is_refused(tiny_model, data_dir, tmp_path):
    first = trained_model_and_logits(tiny_model("llama"), data_dir, tmp_path / "a")
    src = str(first.adapter_dir / "adapters.safetensors")
    with pytest.raises(ConfigError, match="adapter has rank 8, but RANK=4"):
        train.run(options(tiny_model("llama"), data_dir, tmp_path / "b", rank=4, resume_from=src))
    with pytest.raises(ModelError, match="RESUME_FROM adapter was trained on"):
        train.run(options(tiny_model("qwen2"), data_dir, tmp_path / "c", resume_from=src))


def test_output_of_another_model_is_not_overwritten(tiny_model, data_dir, tmp_path):
    trained_model_and_logits(tiny_model("llama"), data_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match="holds an adapter trained on"):
        train.run(options(tiny_model("qwen2"), data_dir, tmp_path / "out", iters=2))
