"""Hugging Face folder -> GGUF, and PEFT LoRA adapter -> GGUF adapter, streaming.

Every tensor is announced first (name, shape, type, size), then header, metadata and the
tensor table are written, then tensor data one tensor at a time: peak memory is about the
largest tensor, not the model. The file appears under its final name only when complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ..errors import ConfigError, ModelError
from ..files import ADAPTER_CONFIG, atomic
from . import tensors as T
from .archs import Arch, arch_for, text_config, write_hparams
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
    if outtype.lower() not in T.OUTTYPES:
        raise ConfigError(f"unknown GGUF export type {outtype!r}",
                          "use one of: " + ", ".join(T.OUTTYPES))
    qtype = T.OUTTYPES[outtype.lower()]
    cfg = text_config(_read_config(hf_dir))
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
    return _write(w, plan, out_path, progress)


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
        load = _transform(ref.load, hf_name, cfg, arch)
        plan.append(Planned(name, ref.shape, T.gguf_type(name, ref.shape, qtype), load))
    if unknown:
        raise ModelError(f"{len(unknown)} tensors have no GGUF name for {arch.name}: "
                         + ", ".join(unknown[:5]), "export a plain causal LM checkpoint")
    for name, arr in (arch.extra_tensors(cfg) if arch.extra_tensors else []):
        plan.append(Planned(name, arr.shape, gguf.GGMLQuantizationType.F32, lambda a=arr: a))
    return plan


def _transform(load: Callable[[], np.ndarray], hf_name: str, cfg: dict, arch: Arch):
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


def _write(w: gguf.GGUFWriter, plan: list[Planned], out_path: Path, progress: Progress | None) -> Path:
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


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return json.loads(path.read_text())


# ---- LoRA adapters ----

def export_adapter(adapter_dir: Path, base_hf_dir: Path, out_path: Path) -> Path:
    """Write a PEFT LoRA adapter as a GGUF adapter for the GGUF export of `base_hf_dir`.

    llama.cpp applies it at load time (`--lora`, Ollama's ADAPTER) with scale alpha / r.
    """
    adapter_dir, base_hf_dir, out_path = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    acfg = _adapter_config(adapter_dir)
    cfg = text_config(_read_config(base_hf_dir))
    arch = arch_for(cfg, base_hf_dir)
    base = T.index(base_hf_dir)
    pairs = _lora_pairs(T.index(adapter_dir, "adapter_model"), adapter_dir)
    names = gguf.get_tensor_name_map(arch.gguf_arch, cfg["num_hidden_layers"])

    plan = []
    for base_name, (a, b) in sorted(pairs.items()):
        gguf_name = names.get_name(base_name, try_suffixes=(".weight",))
        _check_lora_shapes(base_name, base.get(base_name), a, b, gguf_name, cfg)
        load_b = _transform(b.load, base_name, cfg, arch)  # q/k rows permuted like the base
        plan.append(Planned(gguf_name + ".lora_a", a.shape, gguf.GGMLQuantizationType.F32, a.load))
        plan.append(Planned(gguf_name + ".lora_b", b.shape, gguf.GGMLQuantizationType.F32, load_b))

    w = gguf.GGUFWriter(None, arch.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _gguf_alpha(acfg))
    w.add_name(adapter_dir.name)
    return _write(w, plan, out_path, None)


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.exists():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    acfg = json.loads(path.read_text())
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if acfg.get(k)]
    if acfg.get("peft_type", "LORA") != "LORA" or acfg.get("use_dora") or unsupported:
        raise ModelError(f"{adapter_dir}: only plain LoRA adapters export to GGUF "
                         f"(found {acfg.get('peft_type')}, dora={acfg.get('use_dora')}, "
                         f"{', '.join(unsupported) or 'no per-module settings'})",
                         "fuse the adapter into the model and export the fused model instead")
    return acfg


def _gguf_alpha(acfg: dict) -> float:
    """llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r), so fold that in."""
    alpha, r = float(acfg["lora_alpha"]), int(acfg["r"])
    return alpha * math.sqrt(r) if acfg.get("use_rslora") else alpha


def _lora_pairs(refs: dict[str, T.TensorRef], adapter_dir: Path) -> dict:
    """{base tensor name: (lora_A ref, lora_B ref)} from PEFT names."""
    pairs: dict[str, list] = {}
    for name, ref in refs.items():
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part):
                base = name.removeprefix("base_model.model.")[: -len(part)] + ".weight"
                pairs.setdefault(base, [None, None])[slot] = ref
                break
        else:
            raise ModelError(f"{adapter_dir}: unexpected adapter tensor {name}",
                             "only lora_A/lora_B weights can be exported; fuse the adapter instead")
    broken = [n for n, (a, b) in pairs.items() if a is None or b is None]
    if broken:
        raise ModelError(f"{adapter_dir}: lora_A/lora_B missing for {', '.join(broken[:3])}")
    return {n: tuple(p) for n, p in pairs.items()}


def _check_lora_shapes(base_name, base_ref, a, b, gguf_name, cfg) -> None:
    """Catch adapters trained on another base model before llama.cpp does (with less clarity)."""
    if gguf_name is None or base_ref is None:
        tied = " (tied to the embeddings)" if base_name == "lm_head.weight" else ""
        raise ModelError(f"the adapter targets {base_name}, which the base model has no "
                         f"separate weight for{tied}", "train the adapter without that module")
    out_dim, in_dim = base_ref.shape
    if a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
        raise ModelError(
            f"adapter shapes A{list(a.shape)} B{list(b.shape)} do not fit {base_name} "
            f"{list(base_ref.shape)} of {cfg.get('_name_or_path') or 'the base model'}",
            "export the adapter with the base model it was trained on")
