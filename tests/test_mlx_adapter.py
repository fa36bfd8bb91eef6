"""The seed's own adapters (issue 18 part 6): an adapter folder that mlx-lm writes is read by
fuse and RESUME_FROM, and the fused model gives mlx-lm's logits with that adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from donkeytune import config, fuse, runinfo  # noqa: E402
from donkeytune.train import mlxadapter  # noqa: E402

TOKENS = [[1, 17, 42, 99, 7, 3, 250, 11]]


def mlx_adapter(model_dir: Path, folder: Path, num_layers=2, rank=4, scale=3.0):
    """An adapter folder as mlx-lm's trainer writes it: linear_to_lora_layers, random
    non-zero weights, the trainable parameters saved, its adapter_config.json; and the
    logits mlx-lm gives with it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0,
              "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps(dict(
        model=str(model_dir), fine_tune_type="lora", num_layers=num_layers,
        lora_parameters=params, iters=10, data="data"), indent=4))
    logits = model(mx.array(TOKENS))
    return np.array(logits.astype(mx.float32))


def test_mlx_lm_adapter_fuses_to_mlx_lm_logits(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama")
    out = tmp_path / "output"
    want = mlx_adapter(base, out / "adapters")
    assert mlxadapter.mlx_config(out / "adapters") is not None
    fused = fuse.run(config.resolve(config.FuseOptions, {"output_dir": str(out)}, environ={}))
    model = AutoModelForCausalLM.from_pretrained(fused, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor(TOKENS)).logits.numpy()
    plain = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        before = plain(torch.tensor(TOKENS)).logits.numpy()
    err = np.abs(got - want).max()
    print(f"max |logit diff| {err:.3g} of max |logit| {np.abs(want).max():.3g}")
    assert err < 2e-3 * max(1.0, np.abs(want).max()), err
    assert np.abs(before - want).max() > 20 * err  # the adapter did change the logits
    peft_cfg = json.loads((out / "adapters" / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 12.0
    assert sorted(peft_cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]


def test_mlx_lm_adapter_as_resume_from(tmp_path, tiny_model):
    from donkeytune import train

    from conftest import write_jsonl
    from test_train import chat as chat_row

    base = tiny_model("llama")
    mlx = tmp_path / "seed" / "adapters"
    mlx_adapter(base, mlx)
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat_row("q", "a")] * 4)
    opts = config.resolve(config.TrainOptions, dict(data_dir=str(data), output_dir=str(tmp_path / "n"),
                          rank=4, resume_from=str(mlx / "adapters.safetensors")), environ={})
    checked = train._checked(opts)[0]
    assert checked.model == str(base)  # the base from its adapter_config's `model`
    source = train._resume_source(checked)
    assert source == mlx / "peft" / "adapter_model.safetensors"
    assert runinfo.read_run(mlxadapter.peft_folder(mlx))["base_fingerprint"] == runinfo.model_fingerprint(base)


def test_mlx_lm_adapter_without_model_needs_model(tmp_path, tiny_model):
    from donkeytune.errors import ConfigError

    base = tiny_model("llama")
    folder = tmp_path / "adapters"
    mlx_adapter(base, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["model"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="MODEL"):
        mlxadapter.peft_folder(folder)
    assert runinfo.read_run(mlxadapter.peft_folder(folder, str(base)))["base_model"] == str(base)


def test_mlx_lm_adapter_converts_and_tests_to_mlx_lm_logits(tmp_path, tiny_model):
    """`convert` then `test` on the seed's adapter folder: the GGUF llama.cpp runs gives the
    logits mlx-lm gives with that adapter, and `test` answers with it (not refused as stale)."""
    from test_gguf import cpp_logits

    from donkeytune.gguf import convert
    from donkeytune.use import test as use_test

    base = tiny_model("llama")
    out = tmp_path / "output"
    want = mlx_adapter(base, out / "adapters")[0]
    quant = convert.run(config.resolve(config.ConvertOptions, {
        "output_dir": str(out), "quantize": "F16", "fidelity": False}, environ={}))
    got = cpp_logits(quant, TOKENS[0])
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"llama.cpp (F16) against mlx-lm: relative logit error {err:.3g}")
    assert err < 1e-2, err
    assert (got.argmax(-1) == want.argmax(-1)).all()
    rows = use_test.run(config.resolve(config.TestOptions, {
        "output_dir": str(out), "prompt": "Hello there", "max_tokens": 4}, environ={}))
    assert len(rows) == 1 and isinstance(rows[0]["finetuned"], str) and "base" in rows[0]


def test_mlx_lm_adapter_exports_as_a_gguf_adapter(tmp_path, tiny_model):
    """export-adapter on the seed's folder: llama.cpp with base + that LoRA gives mlx-lm's logits."""
    from test_gguf import cpp_logits

    from donkeytune.gguf import adapter as gguf_adapter
    from donkeytune.gguf import export

    base = tiny_model("llama")
    folder = tmp_path / "adapters"
    want = mlx_adapter(base, folder)[0]
    out = gguf_adapter.run(config.resolve(config.ExportAdapterOptions, {
        "adapter_dir": str(folder), "out": str(tmp_path / "lora.gguf")}, environ={}))
    got = cpp_logits(export(base, tmp_path / "base.gguf", "f32"), TOKENS[0], lora=out)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"llama.cpp base + GGUF adapter against mlx-lm: relative logit error {err:.3g}")
    assert err < 1e-3 and (got.argmax(-1) == want.argmax(-1)).all(), err
