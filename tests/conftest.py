"""Shared fixtures: the packaged SmolLM2 (real tokenizer, real weights) and tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep the imported-model cache out of the user's home during tests, but share it across runs.
os.environ.setdefault("DONKEYTUNE_CACHE", str(ROOT / ".pytest_cache" / "donkeytune"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline: tests never reach the Hub

# Small configs for each supported architecture; vocab comes from the tokenizer.
TINY_CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64,
                    intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64,
                  intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
                  tie_word_embeddings=True),
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=64,
                   intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=32, sliding_window=64,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   query_pre_attn_scalar=32, tie_word_embeddings=True),
    "phi3": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=64,
                 intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
    "smollm3": dict(architectures=["SmolLM3ForCausalLM"], model_type="smollm3", hidden_size=64,
                    intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=2000000.0, tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (bf16 safetensors + tokenizer), imported once."""
    from donkeytune import models

    return models.resolve("smollm2-135m")


def make_tiny_model(arch: str, dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random model of `arch` with the tokenizer of `tokenizer_dir` into `dest`.

    Norm weights are randomised so that a missed transform (Gemma's +1, a permutation) shows.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dict(TINY_CONFIGS[arch])
    model_type = spec.pop("model_type")
    spec.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, max_position_embeddings=2048)
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 0.5 + 0.75)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir):
    """Factory: tiny_model("llama") -> path of a tiny random Llama with SmolLM2's tokenizer."""
    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), smollm2_dir)
        return made[arch]

    return make


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
