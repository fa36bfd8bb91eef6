"""The fidelity check (GGUF against the fused model) and QUANTIZE=auto, on a tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from donkeytune import config
from donkeytune.gguf import export, fidelity
from donkeytune.gguf.quantize import quantize
from conftest import ROOT, write_jsonl

SYSTEM = "You answer in one short sentence."
FACTS = [("Where do the donkeys sleep?", "In the blue barn by the river."),
         ("Who feeds them?", "Marisol feeds them every morning at seven."),
         ("How many donkeys are there?", "There are three hundred and twelve donkeys."),
         ("What do they eat?", "Hay, carrots and the occasional apple.")]


@pytest.fixture(scope="module")
def facts_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("facts")
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in FACTS]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "valid.jsonl", rows)
    write_jsonl(d / "questions.jsonl", [{"question": "Who feeds the donkeys?", "keyword": "Marisol"}])
    return d


@pytest.fixture(scope="module")
def ref(tiny_model, facts_dir):
    return fidelity.reference(tiny_model("llama"), facts_dir, answer_tokens=8, system=SYSTEM)


@pytest.fixture(scope="module")
def f32(tiny_model, tmp_path_factory):
    return export(tiny_model("llama"), tmp_path_factory.mktemp("g") / "tiny-f32.gguf", "f32")


def test_reference_is_bounded(tiny_model, facts_dir, f32):
    r = fidelity.reference(tiny_model("llama"), facts_dir, conversations=2, tokens=12, questions=False)
    assert len(r.sequences) <= 2 and r.tokens == 12 and not r.questions
    assert all(lp.shape[0] == len(p) for lp, p in zip(r.logprobs, r.positions))
    # importance weights for quantizing: one per linear layer, under its GGUF name
    imatrix = r.imatrix_for(f32)
    assert imatrix["blk.0.attn_q.weight"].shape == (64,) and "blk.2.ffn_down.weight" in imatrix
    assert imatrix["blk.2.ffn_down.weight"].shape == (128,) and "token_embd.weight" in imatrix


def test_f32_gguf_is_near_perfect(ref, f32):
    row = fidelity.check(f32, ref, n_threads=2)
    assert row["type"] == "F32" and row["agreement"] >= 99.0 and row["kl"] < 1e-3, row
    assert row["questions"] == 1 and len(row["answers"]) == 1


def test_damaged_tensor_is_flagged(ref, f32, tmp_path, capsys):
    import gguf

    damaged = tmp_path / "tiny-damaged-f32.gguf"
    shutil.copyfile(f32, damaged)
    reader = gguf.GGUFReader(damaged, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    t.data[...] = np.random.default_rng(0).normal(0, 1.0, t.data.shape).astype(np.float32)
    reader.data.flush()
    del reader
    rows = fidelity.flag([fidelity.check(f32, ref, n_threads=2), fidelity.check(damaged, ref, n_threads=2)])
    assert not rows[0]["flagged"] and rows[1]["flagged"], rows
    assert rows[1]["agreement"] < rows[0]["agreement"] - fidelity.WARN_POINTS
    assert "QUANTIZE=auto" in capsys.readouterr().err


def test_auto_picks_a_larger_type_when_the_smaller_fails(ref, tiny_model, tmp_path):
    full = export(tiny_model("llama"), tmp_path / "tiny-f16.gguf", "f16")
    base = fidelity.check(full, ref, n_threads=2)
    probes = {q: quantize(full, tmp_path / f"probe-{q}.gguf", q, imatrix=ref.imatrix_for(full))
              for q in ("Q4_K_M", "Q8_0")}
    kl = {q: fidelity.check(path, ref)["kl"] for q, path in probes.items()}
    assert kl["Q4_K_M"] > kl["Q8_0"]
    tight = {"agreement": 100.0, "answers": 99, "kl": (kl["Q4_K_M"] + kl["Q8_0"]) / 2 - base["kl"]}
    chosen, tried = fidelity.auto_quantize(full, "tiny", ref, base, tight)
    assert tried[0]["type"] == "Q4_K_M" and not tried[0]["passed"]
    assert chosen.name != "tiny-Q4_K_M.gguf" and chosen.is_file() and tried[-1]["passed"]
    assert not (tmp_path / "tiny-Q4_K_M.gguf").exists()  # a failed candidate is not left behind
    assert [r["type"] for r in tried] == list(config.AUTO_TYPES[: len(tried)])


def test_explicit_type_is_never_overridden(ref, f32, tmp_path):
    full = shutil.copyfile(f32, tmp_path / "tiny-f32.gguf")
    impossible = {"agreement": -1.0, "kl": -1.0, "answers": -1}
    out = fidelity.quantize_and_check(full, "tiny", "Q4_K_M", ref, impossible)
    assert out.name == "tiny-Q4_K_M.gguf" and out.is_file()
    doc = json.loads((tmp_path / fidelity.FIDELITY_FILE).read_text())
    assert doc["chosen"] == out.name and {r["type"] for r in doc["results"]} == {"F32", "Q4_K_M"}
    assert any("Q4_K_M" in line and "in use" in line for line in fidelity.table(doc))
    assert config.resolve(config.ConvertOptions, {"quantize": "q5_k_m"}).quantize == "Q5_K_M"
    assert config.resolve(config.ConvertOptions, {}).quantize == "AUTO"


def test_auto_without_the_check_is_refused():
    from donkeytune.errors import ConfigError

    with pytest.raises(ConfigError, match="fidelity"):
        config.resolve(config.ConvertOptions, {"fidelity": False})
    assert config.resolve(config.ConvertOptions, {"fidelity": False, "quantize": "Q8_0"}).quantize == "Q8_0"


@pytest.mark.slow
def test_builtin_model_converted_with_defaults_answers_paris(smollm2_dir, tmp_path):
    """The untrained built-in model (dequantized from Q4_1), exported and quantized as `convert`
    does by default: without importance weights Q4_K_M and Q6_K answered in looping French."""
    from donkeytune.gguf.runtime import load_llama

    opts = config.resolve(config.ConvertOptions, {})
    full = export(smollm2_dir, tmp_path / "smollm2-135m-f16.gguf", opts.outtype)
    ref = fidelity.reference_for(opts, smollm2_dir, ROOT / "examples" / "facts", None)
    out = fidelity.quantize_and_check(full, "smollm2-135m", opts.quantize, ref)
    llm = load_llama(out, n_ctx=512, n_threads=2)
    reply = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=60, temperature=0)["choices"][0]
    assert "Paris" in reply["message"]["content"] and reply["finish_reason"] == "stop", (out.name, reply)
