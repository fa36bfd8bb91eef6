"""The `export-adapter` command: a PEFT LoRA adapter -> GGUF adapter (llama.cpp --lora, Ollama
ADAPTER), written through our exporter's streaming writer."""

from __future__ import annotations

import math
from pathlib import Path

import gguf

from .. import runinfo
from ..config import ExportAdapterOptions
from ..errors import ModelError
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, model_name, output_lock, read_json
from ..progress import say, status
from . import tensors as T
from ..models import read_config, text_config
from .archs import arch_for
from .builtin import Planned, transform, write


def run(opts: ExportAdapterOptions) -> Path:
    """The LoRA adapter as a GGUF adapter, for llama.cpp --lora and Ollama's ADAPTER."""
    from ..train import mlxadapter  # noqa: PLC0415

    given = Path(opts.adapter_dir)
    adapter_dir = mlxadapter.peft_folder(given, opts.model) or given  # mlx-lm's (the seed's): its PEFT copy
    run_info = runinfo.read_run(adapter_dir)
    base = runinfo.base_model_of(run_info, opts.model, trust_remote_code=opts.trust_remote_code)
    out = Path(opts.out or given.parent / "gguf" / f"{model_name(run_info['base_model'])}-adapter.gguf")
    with output_lock(out, "export-adapter"), status(f"Exporting the adapter {adapter_dir} to {out}"):
        export_adapter(adapter_dir, base, out)
    say(f"  {out}  {out.stat().st_size / 1e6:.2f} MB  (base model: {run_info['base_model']})")
    return out


def export_adapter(adapter_dir: Path, base_hf_dir: Path, out_path: Path) -> Path:
    """Write a PEFT LoRA adapter as a GGUF adapter for the GGUF export of `base_hf_dir`.

    llama.cpp applies it at load time (`--lora`, Ollama's ADAPTER) with scale alpha / r.
    """
    adapter_dir, base_hf_dir, out_path = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    acfg = _adapter_config(adapter_dir)
    cfg = text_config(read_config(base_hf_dir))
    arch = arch_for(cfg, base_hf_dir)
    base = T.index(base_hf_dir)
    pairs = _lora_pairs(T.index(adapter_dir, Path(ADAPTER_FILE).stem), adapter_dir)
    names = gguf.get_tensor_name_map(arch.gguf_arch, cfg["num_hidden_layers"])

    plan = []
    for base_name, (a, b) in sorted(pairs.items()):
        gguf_name = names.get_name(base_name, try_suffixes=(".weight",))
        _check_lora_shapes(base_name, base.get(base_name), a, b, gguf_name, cfg)
        load_b = transform(b.load, base_name, cfg, arch)  # q/k rows permuted like the base
        plan.append(Planned(gguf_name + ".lora_a", a.shape, gguf.GGMLQuantizationType.F32, a.load))
        plan.append(Planned(gguf_name + ".lora_b", b.shape, gguf.GGMLQuantizationType.F32, load_b))

    w = gguf.GGUFWriter(None, arch.name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _gguf_alpha(acfg))
    w.add_name(adapter_dir.name)
    return write(w, plan, out_path, None)


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.exists():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    acfg = read_json(path)
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
