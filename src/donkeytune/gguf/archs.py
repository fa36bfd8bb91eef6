"""What each supported Hugging Face architecture becomes in GGUF: one table row per architecture.

A row names the llama.cpp architecture and the few ways it differs from the common case
(q/k row order, Gemma's norm offset, extra metadata, extra tensors). Everything else
(hyperparameter keys, tensor names via `gguf.TensorNameMap`) is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from ..errors import ModelError
from ..progress import warn

KvHook = Callable[[gguf.GGUFWriter, dict], None]
TensorHook = Callable[[dict], "list[tuple[str, np.ndarray]]"]


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's "normal" rope wants q/k rows interleaved, HF stores halves
    norm_shift: float = 0.0  # Gemma stores RMSNorm weights as (w - 1)
    rope_dim_key: bool = False  # llama/smollm3 refuse to load without rope.dimension_count
    extra_kv: KvHook | None = None
    extra_tensors: TensorHook | None = None
    template_fix: Callable[[str], str] | None = None

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# ---- configuration helpers (transformers 4 and 5 spell rope settings differently) ----


def rope_params(cfg: dict, kind: str = "full_attention") -> dict:
    """Rope settings (rope_theta, rope_type, factors) of the `kind` attention layers.

    transformers 5 writes `rope_parameters` (Gemma3: one dict per attention type);
    older configs have top-level `rope_theta` and `rope_scaling`.
    """
    nested = cfg.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        params = dict(nested.get(kind) or {})
    elif kind == "full_attention":
        params = {**(cfg.get("rope_scaling") or {}), **nested}
    else:
        return {}
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if kind == "full_attention" and "rope_theta" not in params and cfg.get("rope_theta"):
        params["rope_theta"] = cfg["rope_theta"]
    return params


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# ---- per-architecture hooks ----

def _gemma3_kv(w: gguf.GGUFWriter, cfg: dict) -> None:
    if not cfg.get("head_dim"):
        w.add_key_length(256)
        w.add_value_length(256)
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    types = cfg.get("layer_types")
    if cfg.get("sliding_window") and (types is None or "sliding_attention" in types):
        w.add_sliding_window(cfg["sliding_window"])
        if types:  # per-layer pattern; without it llama.cpp assumes 5 sliding : 1 full
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        local = rope_params(cfg, "sliding_attention").get("rope_theta") or cfg.get("rope_local_base_freq")
        w.add_rope_freq_base_swa(float(local or 10000.0))
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar and scalar not in (head_dim(cfg), cfg["hidden_size"] // cfg["num_attention_heads"]):
        warn(f"query_pre_attn_scalar={scalar} differs from head_dim: llama.cpp scales by head_dim")


def _phi3_kv(w: gguf.GGUFWriter, cfg: dict) -> None:
    rope = rope_params(cfg)
    rot = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count(int(rot * cfg["hidden_size"]) // cfg["num_attention_heads"])
    orig = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    w.add_rope_scaling_orig_ctx_len(orig or cfg["max_position_embeddings"])
    w.add_sliding_window(cfg.get("sliding_window") or 0)  # 0 tells llama.cpp: no sliding window
    if rope.get("long_factor"):
        scale = cfg["max_position_embeddings"] / orig
        w.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)


def _phi3_tensors(cfg: dict) -> list[tuple[str, np.ndarray]]:
    rope = rope_params(cfg)
    if not rope.get("long_factor"):
        return []
    return [("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32)),
            ("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))]


def _llama3_rope_freqs(cfg: dict) -> list[tuple[str, np.ndarray]]:
    """Llama 3.1+ rope scaling: llama.cpp reads per-frequency factors from rope_freqs.weight."""
    rope = rope_params(cfg)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return []
    dim = head_dim(cfg)
    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.asarray(factors, np.float32))]


A = gguf.MODEL_ARCH
ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": Arch(A.LLAMA, permute_qk=True, rope_dim_key=True,
                             extra_tensors=_llama3_rope_freqs),
    "MistralForCausalLM": Arch(A.LLAMA, permute_qk=True, rope_dim_key=True),
    "Qwen2ForCausalLM": Arch(A.QWEN2),
    "Qwen3ForCausalLM": Arch(A.QWEN3),
    "Gemma3ForCausalLM": Arch(A.GEMMA3, norm_shift=1.0, extra_kv=_gemma3_kv),
    # SmolLM3's template slices with [:], which llama.cpp's template engine rejects
    "SmolLM3ForCausalLM": Arch(A.SMOLLM3, permute_qk=True, rope_dim_key=True,
                               extra_tensors=_llama3_rope_freqs,
                               template_fix=lambda t: t.replace("[:]", "")),
    "Phi3ForCausalLM": Arch(A.PHI3, extra_kv=_phi3_kv, extra_tensors=_phi3_tensors),
}


def arch_for(cfg: dict, where: object = "the model") -> Arch:
    """The table row for a config.json, or a ModelError naming the supported architectures."""
    names = cfg.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    raise ModelError(
        f"{where}: GGUF export does not support architecture {', '.join(names) or '(none given)'}",
        "supported: " + ", ".join(ARCHS))


def write_hparams(w: gguf.GGUFWriter, arch: Arch, cfg: dict) -> None:
    """The hyperparameter keys llama.cpp reads for every architecture, then the row's extras."""
    n_head = cfg["num_attention_heads"]
    w.add_context_length(cfg.get("max_position_embeddings") or 2048)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps") or 1e-6)
    w.add_vocab_size(cfg["vocab_size"])
    rope = rope_params(cfg)
    default_theta = 1_000_000.0 if arch.gguf_arch == A.GEMMA3 else 10000.0
    w.add_rope_freq_base(float(rope.get("rope_theta") or default_theta))
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if arch.rope_dim_key:
        w.add_rope_dimension_count(head_dim(cfg))
    _write_rope_scaling(w, rope, cfg)
    if arch.extra_kv:
        arch.extra_kv(w, cfg)


def _write_rope_scaling(w: gguf.GGUFWriter, rope: dict, cfg: dict) -> None:
    kind = str(rope.get("rope_type") or "default").lower()
    if kind in ("default", "llama3", "longrope", "su"):  # llama3/longrope travel as tensors
        return
    if kind == "dynamic":  # llama.cpp has no dynamic NTK; equal to the base rope within its context
        warn("rope scaling 'dynamic' is exported as the plain rope (llama.cpp has no dynamic NTK): "
             "the same model up to the original context length")
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        # transformers 5 may keep it beside the rope dict (SmolLM3-128K, ...), as llama.cpp reads it
        orig = (rope.get("original_max_position_embeddings")
                or cfg.get("original_max_position_embeddings")
                or int(cfg["max_position_embeddings"] / rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(orig))
    else:
        raise ModelError(f"rope scaling type {kind!r} cannot be exported to GGUF",
                         "supported rope types: default, linear, yarn, llama3, longrope")
