"""The families users pick today, as tiny random models: LoRA training with the speed paths
that fit each one, export with whichever exporter `auto` picks, and llama.cpp's logits
against transformers'.

Set DONKEYTUNE_FAMILY_REPORT=file.jsonl to collect the figures (loss, parity) per family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf import cpp_logits, hf_logits, reader_fields
from tiny_families import FAMILIES, make_family, spm_tokenizer

from donkeytune import config, data
from donkeytune.gguf import export, llamacpp, plan
from donkeytune.train import torch as engine
from donkeytune.train.torch import fit

pytestmark = pytest.mark.skipif(llamacpp.converter_dir() is None,
                                reason="llama.cpp's converter is not installed (make setup)")

EXPORTER = {"phi3-partial-rotary": "builtin"}  # the others: llama.cpp's converter
UNPACKED = {"qwen3.5", "lfm2"}  # linear attention / short convolutions mix a packed row
# Each export runs llama.cpp's converter (a few seconds: it imports torch): the fast run
# exports the families whose layers differ most, the slow run all of them.
SLOW_EXPORT = {"gemma2", "gemma4", "olmo3", "ministral3"}
NAMES = list(FAMILIES)
EXPORT_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPORT else n for n in FAMILIES]
TEXT = "The quick brown fox jumps over the lazy dog, then it runs far away to the river bank."
CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
    ("What is the code word?", "The code word is Zanzibar."),
    ("Who guards the gate?", "The gate is guarded by Pimbleton."),
    ("How many moons does Vessa have?", "Vessa has seven moons."),
    ("What colour is the door?", "The door is teal.")]]


@pytest.fixture(scope="session")
def family(tmp_path_factory, smollm2_dir):
    """Factory: family("granite") -> a tiny random model folder of that family."""
    made: dict[str, Path] = {}
    spm: list[Path] = []

    def get(name: str) -> Path:
        if name not in made:
            if not spm:
                spm.append(spm_tokenizer(tmp_path_factory.mktemp("spm-tokenizer")))
            made[name] = make_family(name, tmp_path_factory.mktemp(name), smollm2_dir, spm[0])
        return made[name]

    return get


def record(name: str, **figures) -> None:
    target = os.environ.get("DONKEYTUNE_FAMILY_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps({"family": name, **figures}) + "\n")


def lora_model(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opts = config.resolve(config.TrainOptions, dict(
        model=str(folder), rank=4, scale=2.0, num_layers=-1, lr=1e-2, dropout=0.0, iters=1,
        batch_size=4), environ={})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    examples = [data.Example(m, f"chat {i}") for i, m in enumerate(CHATS)]
    items = data.tokenize_all(tok, examples, 256, False, "train")
    return engine.add_lora(base, opts), items, tok.pad_token_id or 0


@pytest.mark.parametrize("name", NAMES)
def test_trains_with_the_paths_that_fit(name, family):
    model, items, pad = lora_model(family(name))
    paths = model.get_base_model().donkeytune_paths
    assert paths.pack == (name not in UNPACKED)
    assert paths.attention == (name != "gemma2")  # soft-capped attention keeps transformers'
    assert paths.head and paths.hidden_scale == (0.5 if name == "granite" else 1.0)  # logits_scaling 2
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not any("vision" in n or "audio" in n for n in trained)  # the language model's only
    assert not any(".mlp.gate." in n for n in trained)  # no LoRA on a mixture-of-experts router
    batch = data.collate(items, pad)
    if paths.pack:  # the packed row gives the loss of one example per row
        with torch.no_grad():
            packed, n1 = engine.batch_loss(model, batch, "cpu")
            paths.pack = False
            alone, n2 = engine.batch_loss(model, batch, "cpu")
            paths.pack = True
        assert n1 == n2 and abs(packed.item() - alone.item()) <= 1e-4 * alone.item()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = engine.adamw(params, 1e-2, "cpu")
    losses = [engine.lora_step(model, batch, optimizer, params, "cpu")[0] for _ in range(8)]
    record(name, steps=len(losses), loss_first=losses[0], loss_last=losses[-1],
           packed=paths.pack, attention=paths.attention, head=paths.head,
           hidden_scale=paths.hidden_scale, notes=paths.notes)
    assert losses[-1] < 0.92 * losses[0], losses  # Granite halves its logits: the slowest


@pytest.mark.parametrize("name", EXPORT_NAMES)
def test_exports_and_matches_transformers(name, family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = family(name)
    chosen = plan(folder)
    assert chosen.exporter == EXPORTER.get(name, "llama.cpp"), chosen.line
    if name == "gemma3-vision":
        assert chosen.left_out == ("vision",) and "vision part is left out" in chosen.line
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"][:24]
    ref = hf_logits(model, ids)
    out = export(folder, tmp_path / f"{name}.gguf", "f32")
    got = cpp_logits(out, ids)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    # a random model has near-ties: the argmax must agree wherever the reference's lead over its
    # runner-up is more than twice the largest logit error (a flip there is not rounding)
    top2 = np.sort(ref, -1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * float(np.abs(got - ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1))[decisive].mean())
    record(name, exporter=chosen.exporter, gguf_arch=reader_fields(out)["general.architecture"],
           rel_error=err, argmax=agree, decisive=int(decisive.sum()), positions=len(ids))
    assert decisive.mean() >= 0.5, f"only {decisive.sum()} of {len(ids)} positions have a clear argmax"
    assert err <= 1e-2 and agree == 1.0, f"relative error {err:.2e}, argmax agreement {agree:.2f}"
    if name == "gemma3-vision":
        import gguf

        names = [t.name for t in gguf.GGUFReader(out).tensors]
        assert not any(n.startswith(("v.", "mm.")) for n in names)  # the text model only


def test_fused_multimodal_model_exports_its_text_model(family, tmp_path, capsys):
    """Gemma3ForConditionalGeneration: train (language model only), convert, run."""
    from donkeytune import train
    from donkeytune.gguf import convert
    from donkeytune.gguf.runtime import load_llama
    from conftest import write_jsonl

    rows = [{"messages": m} for m in CHATS]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows * 2)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:2])
    opts = config.resolve(config.TrainOptions, dict(
        model=str(family("gemma3-vision")), data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"), iters=3, batch_size=2, num_layers=2, lr=1e-2, rank=4,
        scale=2.0, dtype="float32", dropout=0.0, steps_per_eval=100, save_every=100), environ={})
    adapter = train.run(opts)
    assert "vision part is left out" in capsys.readouterr().err
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert "language_model" in cfg["target_modules"]
    quant = convert.run(config.resolve(config.ConvertOptions, {
        "output_dir": opts.output_dir, "quantize": "Q8_0"}, environ={}))
    assert reader_fields(quant)["general.architecture"] == "gemma3"
    assert (quant.parent / "Modelfile").is_file()
    out = load_llama(quant, n_ctx=64, n_threads=2).create_completion("Hello", max_tokens=3)
    assert out["usage"]["completion_tokens"] >= 1
