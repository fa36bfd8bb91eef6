"""The seed's own adapters: an mlx-lm adapter folder (adapters.safetensors + mlx-lm's
adapter_config.json, no donkeytune.json) read as our PEFT adapter.

mlx-lm's LoRALinear computes y + scale * (x @ lora_a) @ lora_b with lora_a (in, r) and
lora_b (r, out) (mlx_lm/tuner/lora.py); PEFT computes y + (alpha / r) * B(A(x)) with
lora_A (r, in) and lora_B (out, r). So A = lora_a^T, B = lora_b^T, alpha = scale * r.
The converted adapter is written into <folder>/peft/ (redone when the source is newer) and
every reader (fuse, convert, test, RESUME_FROM) takes that folder: one fusing path.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, ModelError
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, RUN_FILE, SEED_ADAPTER_FILE, read_json

PEFT_DIR = "peft"
PEFT_PREFIX = "base_model.model."
TO_PEFT = {"lora_a": "lora_A", "lora_b": "lora_B"}


def mlx_config(folder: Path) -> dict | None:
    """mlx-lm's adapter_config.json of `folder`, None when it is not an mlx-lm adapter folder."""
    folder = Path(folder)
    cfg_file = folder / ADAPTER_CONFIG
    if (folder / RUN_FILE).is_file() or not (folder / SEED_ADAPTER_FILE).is_file() \
            or not cfg_file.is_file():
        return None
    cfg = read_json(cfg_file)
    return cfg if "lora_parameters" in cfg or "fine_tune_type" in cfg else None


def peft_folder(folder: Path, model: str | None = None) -> Path | None:
    """The PEFT adapter converted from the mlx-lm adapter in `folder` (None: not one).
    The base model is the config's `model` unless `model` (MODEL) is given."""
    folder = Path(folder)
    cfg = mlx_config(folder)
    if cfg is None:
        return None
    out = folder / PEFT_DIR
    source = folder / SEED_ADAPTER_FILE
    done = out / ADAPTER_FILE
    if not (done.is_file() and (out / RUN_FILE).is_file()
            and done.stat().st_mtime >= source.stat().st_mtime):
        convert(folder, cfg, out, model)
    return out


def convert(folder: Path, cfg: dict, out: Path, model: str | None) -> None:
    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    from .. import models, runinfo  # noqa: PLC0415
    from ..files import atomic  # noqa: PLC0415

    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ModelError(f"{folder} is an mlx-lm {kind!r} adapter; only LoRA adapters are read",
                         "fuse it with mlx-lm (mlx_lm.fuse), or train a LoRA adapter")
    base = model or cfg.get("model")
    if not base:
        raise ConfigError(f"{folder}: mlx-lm's adapter_config.json names no base model",
                          "give MODEL=<the model it was trained on>")
    params = cfg.get("lora_parameters") or {}
    rank, scale = int(params.get("rank", 8)), float(params.get("scale", 20.0))
    tensors, targets, blocks = {}, set(), set()
    for name, value in load_file(folder / SEED_ADAPTER_FILE).items():
        module, part = name.rsplit(".", 1)
        if part not in TO_PEFT or value.ndim != 2:
            raise ModelError(f"{folder / SEED_ADAPTER_FILE}: tensor {name} {value.shape} is not a "
                             "plain mlx-lm LoRA weight (lora_a / lora_b)",
                             "fuse it with mlx-lm (mlx_lm.fuse) and train from the fused model")
        tensors[f"{PEFT_PREFIX}{module}.{TO_PEFT[part]}.weight"] = value.T.astype("float32").copy()
        targets.add(module.rsplit(".", 1)[-1])
        bits = module.split(".")
        if "layers" in bits:
            blocks.add(int(bits[bits.index("layers") + 1]))
    if not tensors:
        raise ModelError(f"{folder / SEED_ADAPTER_FILE} holds no LoRA weights")
    base_dir = models.resolve(base)
    peft_cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir),
                    inference_mode=True, r=rank, lora_alpha=scale * rank,
                    lora_dropout=float(params.get("dropout", 0.0)), bias="none",
                    fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                    modules_to_save=None, layers_pattern=None, target_modules=sorted(targets),
                    layers_to_transform=sorted(blocks) or None, rank_pattern={}, alpha_pattern={})
    out.mkdir(parents=True, exist_ok=True)
    with atomic(out / ADAPTER_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2) + "\n")
    runinfo.write_json(out / RUN_FILE, dict(
        stage="train", engine="mlx-lm", converted_from=str(folder), base_model=base,
        base_model_path=str(base_dir), base_fingerprint=runinfo.model_fingerprint(base_dir),
        iteration=cfg.get("iters"), rank=rank, scale=scale, num_layers=cfg.get("num_layers"),
        data_dir=cfg.get("data")))
