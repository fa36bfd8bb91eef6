"""Rope scalings (linear, yarn, dynamic, llama3, longrope) exported the way llama.cpp reads them:
tiny models whose config carries each scaling give transformers' logits in llama.cpp."""

from __future__ import annotations

import json
import shutil

import pytest

from donkeytune.gguf import export
from test_gguf import assert_close, cpp_logits, hf_logits, prompt_ids


def _longrope(original: int, longest: int) -> dict:
    return {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + 0.15 * i for i in range(8)],
                             "long_factor": [2.0 + 0.5 * i for i in range(8)],
                             "original_max_position_embeddings": original},
            "original_max_position_embeddings": original, "max_position_embeddings": longest}


CASES = {
    "linear": ("qwen3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # original_max_position_embeddings beside the rope dict: the KeyError of issue 18
    "yarn-outside": ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                               "original_max_position_embeddings": 64, "max_position_embeddings": 256}),
    "yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 64},
                       "max_position_embeddings": 256}),
    "dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64},
                         "max_position_embeddings": 512}),
    # Phi-3/Phi-4-mini's: per-dimension factors as rope_factors_short/long tensors, and the
    # attention factor of the longer context. llama.cpp picks the long factors when its context
    # (n_ctx, padded to 256) exceeds the original one, transformers when the sequence does:
    # both give the short factors within 512 and the long ones past 32 (a 40-token prompt)
    "longrope-short": ("phi3", _longrope(512, 2048)),
    "longrope-long": ("phi3", _longrope(32, 128)),
}


@pytest.mark.parametrize("case", CASES)
def test_rope_scaling_logits_match_transformers(case, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, extra = CASES[case]
    folder = tmp_path / case
    shutil.copytree(tiny_model(arch), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(extra, rope_theta=cfg.get("rope_theta") or 10000.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    kind = extra["rope_scaling"]["rope_type"]
    assert kind in json.dumps(model.config.to_dict())  # transformers did read the scaling
    ids = prompt_ids(folder)
    if case == "longrope-long":  # longer than its original context
        ids = (ids * 3)[:40]
    out = export(folder, tmp_path / f"{case}.gguf", "f32")
    assert_close(cpp_logits(out, ids), hf_logits(model, ids))
