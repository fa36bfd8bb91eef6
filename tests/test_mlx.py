"""The MLX engine (mlx[cpu] on Linux: slow, functional): it trains, and it writes the torch
engine's adapter, so fuse, GGUF and llama.cpp give what mlx-lm computes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_jsonl
from donkeytune import config, fuse, runinfo, train
from donkeytune.train import engines
from donkeytune.errors import ConfigError
from donkeytune.train import loop as train_loop
from donkeytune.train import torch as torch_engine
from test_train import FACTS, chat

PROBE = [[1, 50, 300, 7, 999, 42, 17, 5]]
# PEFT (torch, float32) against mlx-lm (float32) on the same base and adapter, measured here:
# 1.1e-5 with a random adapter (logits up to 3), 1.7e-6 with the trained one. The fused f32 GGUF
# in llama.cpp: relative error 3.7e-4 against mlx-lm.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def mlx():
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed: pip install 'donkeytune[mlx]'")
    return pytest.importorskip("mlx.core", reason="mlx is not installed: pip install 'mlx[cpu]'")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlx-data")
    write_jsonl(d / "train.jsonl", [chat(q, a) for q, a in FACTS * 3])
    write_jsonl(d / "valid.jsonl", [chat(q, a) for q, a in FACTS])
    return d


def options(model, data_dir, out, **kw):
    flags = dict(model=str(model), data_dir=str(data_dir), output_dir=str(out), iters=12,
                 batch_size=4, num_layers=2, lr=3e-3, rank=8, scale=10.0, steps_per_eval=6,
                 steps_per_report=6, save_every=6, dropout=0.0, dtype="float32", engine="mlx")
    flags.update(kw)
    return config.resolve(config.TrainOptions, flags, environ={})


def metrics(opts, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in train_loop.metrics_file(opts).read_text().splitlines()]
    return {r["iter"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def mlx_run(mlx, tiny_model, data_dir, tmp_path_factory):
    """One short MLX run on the tiny Llama, shared by the tests below."""
    opts = options(tiny_model("llama"), data_dir, tmp_path_factory.mktemp("mlx-run"))
    train.run(opts)
    return opts


def mlx_logits(model_dir, adapter_dir, opts) -> np.ndarray:
    """mlx-lm's own logits for base + the saved adapter, loaded back into its LoRA layers."""
    import mlx.core as mx

    from donkeytune.train import mlx as mlx_engine

    model = mlx_engine.lora_model(model_dir, opts)
    mlx_engine.load_adapter_weights(model, adapter_dir / train.ADAPTER_FILE)
    model.eval()
    return np.array(model(mx.array(PROBE)).astype(mx.float32))


def peft_logits(model_dir, adapter_dir) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(torch.tensor(PROBE)).logits.numpy()


def test_loss_falls_and_the_torch_engines_files_are_written(mlx_run, tiny_model):
    from peft import get_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    losses = metrics(mlx_run, "val_loss")
    assert list(losses) == [0, 6, 12]
    assert losses[0] > losses[6] > losses[12] and losses[12] < 0.9 * losses[0]
    out = mlx_run.adapter_dir
    assert {"adapter_model.safetensors", "adapter_config.json", "adapters.safetensors",
            "donkeytune.json", "checkpoints"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["0000006"]
    assert (out / "checkpoints" / "0000006" / engines.MLX_STATE_FILE).is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["layers_to_transform"]) == (8, 80, [1, 2])
    assert (cfg["peft_type"], cfg["task_type"], cfg["lora_dropout"]) == ("LORA", "CAUSAL_LM", 0.0)
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                             "q_proj", "up_proj", "v_proj"]
    run = runinfo.read_run(out)
    assert run["engine"] == "mlx" and run["options"]["engine"] == "mlx" and run["complete"]
    assert run["iteration"] == 12 and run["versions"]["mlx_lm"]
    # The same tensor names and shapes as the torch engine's PEFT adapter for these options
    torch_model = torch_engine.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model("llama")), mlx_run)
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(torch_model).items()}
    got = {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert got == want and "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in got
    assert got["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] == (8, 128)
    assert got["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] == (64, 8)


# smollm3 has rope_theta only under rope_parameters (transformers 5), as the built-in SmolLM2
# has, and gemma3 one per attention type and layer_types: mlx-lm alone would use its defaults.
@pytest.mark.parametrize("arch", ["llama", "smollm3", "gemma3"])
def test_peft_gives_mlx_lms_logits(arch, mlx, tiny_model, data_dir, tmp_path):
    """mlx-lm's lora_a/lora_b/scale, written as PEFT's lora_A/lora_B/lora_alpha: PEFT on the same
    base weights computes what mlx-lm computes with its own LoRA layers."""
    from mlx.utils import tree_flatten

    from donkeytune.train import mlx as mlx_engine

    model_dir = tiny_model(arch)
    opts = options(model_dir, data_dir, tmp_path / "out", rank=4, scale=3.0)
    model = mlx_engine.lora_model(model_dir, opts)
    mx = mlx  # mlx.core
    mx.random.seed(1)
    model.load_weights([(k, mx.random.normal(v.shape) * 0.2)  # lora_b starts at zero: randomise
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    model.eval()
    want = np.array(model(mx.array(PROBE)))
    mlx_engine.PeftAdapter(model, mlx_engine.peft_config(model, opts, model_dir)).save_pretrained(
        tmp_path / "adapter")
    got = peft_logits(model_dir, tmp_path / "adapter")
    plain = mlx_engine.load_model(model_dir, model_config=mlx_engine.mlx_config(model_dir))[0]
    assert np.abs(got - want).max() <= LOGITS_ATOL, np.abs(got - want).max()
    assert np.abs(got - np.array(plain(mx.array(PROBE)))).max() > 0.1  # the adapter changes it
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 12


def test_trained_adapter_round_trips_and_fuses_to_the_same_gguf(mlx_run, tiny_model, tmp_path):
    from donkeytune.gguf import export
    from test_gguf import assert_close, cpp_logits

    model_dir = tiny_model("llama")
    want = mlx_logits(model_dir, mlx_run.adapter_dir, mlx_run)[0]
    assert np.abs(peft_logits(model_dir, mlx_run.adapter_dir)[0] - want).max() <= LOGITS_ATOL
    fused = fuse.run(config.resolve(config.FuseOptions, {"output_dir": mlx_run.output_dir}, environ={}))
    gguf = export(fused, tmp_path / "fused-f32.gguf", "f32")
    assert_close(cpp_logits(gguf, PROBE[0]), want, rel=1e-3)


def test_mlx_resume_continues_exactly(mlx, tiny_model, data_dir, tmp_path):
    """A checkpoint of the MLX engine (adapter, Adam state, step, data position, dropout draws)
    continues as if never stopped: here, from step 3 of 6 of a finished run."""
    from safetensors.numpy import load_file

    opts = options(tiny_model("llama"), data_dir, tmp_path / "out", iters=6, save_every=3,
                   steps_per_eval=100, steps_per_report=1, dropout=0.1)
    train.run(opts)
    first = load_file(opts.adapter_dir / train.ADAPTER_FILE)
    first_steps = metrics(opts, "step_loss")
    train.run(config.resolve(config.TrainOptions, {"output_dir": opts.output_dir, "resume": True,
                                                   "data_dir": opts.data_dir}, environ={}))
    again = load_file(opts.adapter_dir / train.ADAPTER_FILE)
    assert metrics(opts, "step_loss") == pytest.approx(first_steps, abs=1e-5)
    assert all(np.allclose(again[k], first[k], atol=1e-6) for k in first)
    assert not all(np.allclose(load_file(opts.adapter_dir / "checkpoints" / "0000003" /
                                         train.ADAPTER_FILE)[k], first[k]) for k in first)


def test_torch_run_refused_by_mlx_resume_but_its_adapter_continues(mlx, tiny_model, data_dir, tmp_path):
    model = tiny_model("llama")
    torch_opts = options(model, data_dir, tmp_path / "torch", engine="torch", iters=2, save_every=1,
                         steps_per_eval=2)
    train.run(torch_opts)
    assert runinfo.read_run(torch_opts.adapter_dir)["options"]["engine"] == "torch"
    with pytest.raises(ConfigError, match="trained by the torch engine") as err:
        train.run(config.resolve(config.TrainOptions, {"output_dir": torch_opts.output_dir,
                                                       "data_dir": torch_opts.data_dir,
                                                       "resume": True, "engine": "mlx"}, environ={}))
    assert "RESUME_FROM=" in str(err.value)
    # A new MLX run from the torch adapter starts where torch stopped: same validation loss.
    mlx_opts = options(model, data_dir, tmp_path / "mlx", iters=1, steps_per_eval=100,
                       resume_from=str(torch_opts.adapter_dir / "adapters.safetensors"))
    train.run(mlx_opts)
    assert metrics(mlx_opts, "val_loss")[0] == pytest.approx(metrics(torch_opts, "val_loss")[2], abs=1e-3)


def test_engine_choice(monkeypatch):
    assert config.resolve(config.TrainOptions, {}, environ={}).engine == "auto"
    monkeypatch.setattr(engines, "mlx_installed", lambda: True)
    assert config.resolve(config.TrainOptions, {}, environ={"DONKEYTUNE_ENGINE": "mlx"}).engine == "mlx"
    monkeypatch.setattr(engines.platform, "system", lambda: "Linux")
    assert engines.pick("auto") == "torch"
    monkeypatch.setattr(engines.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(engines.platform, "machine", lambda: "arm64")
    assert engines.pick("auto") == "mlx" and engines.pick("torch") == "torch"
    with pytest.raises(ConfigError, match="DEVICE=cuda is a torch device"):
        config.resolve(config.TrainOptions, {"engine": "mlx", "device": "cuda"}, environ={})
    monkeypatch.setattr(engines, "mlx_installed", lambda: False)
    assert engines.pick("auto") == "torch"
    with pytest.raises(ConfigError, match=r"pip install 'donkeytune\[mlx\]'"):
        config.resolve(config.TrainOptions, {"engine": "mlx"}, environ={})


def test_importing_donkeytune_does_not_import_mlx():
    code = ("import donkeytune.cli, donkeytune.train, donkeytune.train.engines, sys; "
            "assert not [m for m, mod in sys.modules.items() "
            "if mod and m.split('.')[0] in ('mlx', 'mlx_lm')], 'mlx imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_length_batches_are_seeded_resumable_and_similar(mlx):
    from donkeytune.data import Tokenized
    from donkeytune.train import mlx as engine

    items = [Tokenized(list(range(n)), list(range(n))) for n in [5, 40, 7, 33, 12, 60, 9, 51] * 8]
    first = engine.length_batches(items, 4, seed=3)
    run = [[len(t.input_ids) for t in next(first)] for _ in range(40)]
    again = engine.length_batches(items, 4, seed=3, start_step=25)
    assert [[len(t.input_ids) for t in next(again)] for _ in range(15)] == run[25:]
    epoch = sorted(n for b in run[:16] for n in b)
    assert epoch == sorted(len(t.input_ids) for t in items)  # every example once an epoch
    padded = sum(4 * max(b) - sum(b) for b in run[:16])
    engine.LENGTH_GROUPED = False
    try:
        plain = engine.length_batches(items, 4, seed=3)
        shuffled = [[len(t.input_ids) for t in next(plain)] for _ in range(16)]
    finally:
        engine.LENGTH_GROUPED = True
    assert padded < sum(4 * max(b) - sum(b) for b in shuffled) / 3


def test_head_on_labelled_positions_and_compiled_step_equal_the_plain_ones(mlx, tiny_model, data_dir,
                                                                           tmp_path):
    """The loss with the LM head on the labelled positions only equals the full-logits loss; one
    compiled step (with GRAD_CHECKPOINT too) moves the adapter as the plain step does."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from donkeytune import data, device
    from donkeytune.train import mlx as engine

    model_dir = tiny_model("llama")
    opts = options(model_dir, data_dir, tmp_path / "out")
    tok = device.load_tokenizer(model_dir)
    items = data.tokenize_all(tok, data.load_dir(data_dir).train, 2048, False, "train")[:4]
    batch = engine.arrays(items, tok.pad_token_id, compiled=True)
    ids = batch.inputs[0]
    labels = np.full(ids.shape, data.IGNORE)
    for r, t in enumerate(items):
        labels[r, 1:len(t.labels)] = t.labels[1:]
    results = []
    for compiled, checkpoint in ((False, False), (True, False), (True, True)):
        mx.random.seed(0)
        model = engine.lora_model(model_dir, opts)
        model.load_weights([(k, mx.random.normal(v.shape) * 0.1)
                            for k, v in tree_flatten(model.trainable_parameters())], strict=False)
        if not results:
            logits = model(ids[:, :-1]).astype(mx.float32)
            keep = mx.array(labels[:, 1:] != data.IGNORE)
            ce = nn.losses.cross_entropy(logits, mx.where(keep, mx.array(labels[:, 1:]), 0)) * keep
            want = (ce.sum() / keep.sum()).item()
            assert engine.loss_fn(model, *batch.inputs)[0].item() == pytest.approx(want, rel=1e-5)
        optimizer = optim.Adam(learning_rate=1e-2, bias_correction=True)
        optimizer.init(model.trainable_parameters())
        model.train()
        with engine.checkpointed(model, checkpoint):
            loss = engine.train_step(model, optimizer, compiled=compiled)(*batch.inputs)
            mx.eval(loss, model.trainable_parameters())
        results.append((loss.item(), dict(tree_flatten(model.trainable_parameters()))))
    (loss0, w0), *others = results
    for loss, w in others:
        assert loss == pytest.approx(loss0, rel=1e-5)
        assert max(np.abs(np.array(w[k]) - np.array(w0[k])).max() for k in w0) < 1e-5


def test_qlora_trains_and_fuses_into_the_full_precision_base(mlx, tiny_model, data_dir, tmp_path):
    """QUANTIZE_BASE=4: the base trains 4-bit, the loss falls, and fuse merges the adapter into
    the original float weights: the fused model's logits are base + adapter at full precision."""
    import dataclasses

    from donkeytune.train import mlx as engine

    model_dir = tiny_model("llama")
    opts = options(model_dir, data_dir, tmp_path / "out", iters=8, steps_per_eval=8, save_every=100,
                   quantize_base=4)
    train.run(opts)
    losses = metrics(opts, "val_loss")
    assert losses[8] < 0.9 * losses[0]
    quantized = engine.lora_model(model_dir, opts)
    assert "scales" in dict(tree_flatten_names(quantized.layers[0].self_attn.q_proj.parameters()))
    full = dataclasses.replace(opts, quantize_base=None)
    want = mlx_logits(model_dir, opts.adapter_dir, full)[0]
    fused = fuse.run(config.resolve(config.FuseOptions, {"output_dir": opts.output_dir}, environ={}))
    got = fused_logits(fused)[0]
    assert np.abs(got - want).max() <= LOGITS_ATOL
    on_4bit = mlx_logits(model_dir, opts.adapter_dir, opts)[0]
    assert np.abs(on_4bit - want).max() > 10 * LOGITS_ATOL  # the 4-bit copy is another model


def tree_flatten_names(params):
    from mlx.utils import tree_flatten

    return tree_flatten(params)


def fused_logits(fused_dir) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(PROBE)).logits.numpy()
