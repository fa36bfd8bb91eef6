"""Our exporter: Hugging Face folder -> GGUF, streaming (numpy and the `gguf` package).

Every tensor is announced first (name, shape, type, size), then header, metadata and the
tensor table are written, then tensor data one tensor at a time: peak memory is about the
largest tensor, not the model. The file appears under its final name only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ..errors import ConfigError, ModelError
from ..files import OUT_TYPES, atomic
from . import tensors as T
from ..models import read_config, text_config
from .archs import Arch, arch_for, write_hparams
from .vocab import add_vocab

Progress = Callable[[int, int], None]  # (tensors written, tensors in total)


@dataclass
class Planned:
    """One output tensor: its GGUF name, logical shape, type, and how to produce its data."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: Callable[[], np.ndarray]  # float32, already transformed


def export(hf_dir: Path, out_path: Path, outtype: str = "f16", progress: Progress | None = None) -> Path:
    """Write the model in `hf_dir` as a GGUF file at `out_path` (f32, f16, bf16 or q8_0)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype.lower() not in OUT_TYPES:
        raise ConfigError(f"unknown GGUF export type {outtype!r}", "use one of: " + ", ".join(OUT_TYPES))
    qtype = T.GGML_TYPES[outtype.lower()]
    cfg = text_config(read_config(hf_dir))
    arch = arch_for(cfg, hf_dir)
    plan = plan_model(T.index(hf_dir), cfg, arch, qtype)

    w = gguf.GGUFWriter(None, arch.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(T.FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(w, arch, cfg)
    vocab = add_vocab(w, hf_dir, cfg, arch)
    name = str(cfg.get("_name_or_path") or hf_dir.name)
    # llama.cpp looks up "</s>" when the name says phi3 and fails to load if it is missing
    if "</s>" in vocab or not any(k in name.lower() for k in ("phi3", "phi-3")):
        w.add_name(name)
    return write(w, plan, out_path, progress)


def plan_model(refs: dict[str, T.TensorRef], cfg: dict, arch: Arch, qtype) -> list[Planned]:
    """Map every checkpoint tensor to its GGUF name, transform and type; refuse unknown ones."""
    names = gguf.get_tensor_name_map(arch.gguf_arch, cfg["num_hidden_layers"])
    tied = cfg.get("tie_word_embeddings", True)
    plan, unknown = [], []
    for hf_name, ref in refs.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / shared with token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf_name)
            continue
        load = transform(ref.load, hf_name, cfg, arch)
        plan.append(Planned(name, ref.shape, T.gguf_type(name, ref.shape, qtype), load))
    if unknown:
        raise ModelError(f"{len(unknown)} tensors have no GGUF name for {arch.name}: "
                         + ", ".join(unknown[:5]), "export a plain causal LM checkpoint")
    for name, arr in (arch.extra_tensors(cfg) if arch.extra_tensors else []):
        plan.append(Planned(name, arr.shape, gguf.GGMLQuantizationType.F32, lambda a=arr: a))
    return plan


def transform(load: Callable[[], np.ndarray], hf_name: str, cfg: dict, arch: Arch):
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    heads = _qk_heads(hf_name, n_head, n_kv) if arch.permute_qk else None
    shift = arch.norm_shift if hf_name.endswith("norm.weight") else 0.0
    if heads is None and not shift:
        return load

    def data() -> np.ndarray:
        arr = load()
        if heads:
            arr = T.permute_rows(arr, heads)
        return arr + shift if shift else arr

    return data


def _qk_heads(hf_name: str, n_head: int, n_kv: int) -> int | None:
    """Head count to permute q/k projections (weights, biases or LoRA B) with, else None."""
    if ".q_proj." in hf_name:
        return n_head
    if ".k_proj." in hf_name:
        return n_kv
    return None


def write(w: gguf.GGUFWriter, plan: list[Planned], out_path: Path, progress: Progress | None) -> Path:
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), T.nbytes(p.shape, p.qtype),
                          raw_dtype=p.qtype)
    with atomic(out_path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plan, 1):
            w.write_tensor_data(T.encode(p.data(), p.qtype))
            if progress:
                progress(i, len(plan))
        w.close()
    return out_path


