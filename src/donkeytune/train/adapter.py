"""The adapter folder: PEFT's files, the seed's copy, the run record, checkpoints with the
trainer state; saved atomically, pruned, loaded back."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from .. import runinfo
from ..errors import ConfigError, ModelError
from ..files import ADAPTER_FILE, BEST_DIR, MLX_STATE_FILE, SEED_ADAPTER_FILE, STATE_FILE, atomic
from ..progress import say


def adapted_blocks(opts, n_blocks: int) -> list[int]:
    """The blocks LoRA adapts, in both engines: the last NUM_LAYERS (-1: all)."""
    n = n_blocks if opts.num_layers == -1 else opts.num_layers
    if n > n_blocks:
        raise ConfigError(f"NUM_LAYERS={opts.num_layers} but the model has only {n_blocks} blocks",
                          f"use NUM_LAYERS={n_blocks} or -1 (all)")
    return list(range(n_blocks - n, n_blocks))


def lora_config(opts, targets: list[str], n_blocks: int, **extra):
    """PEFT's LoraConfig of a run: `targets` (q_proj, ...) in the adapted blocks."""
    from peft import LoraConfig  # noqa: PLC0415

    return LoraConfig(r=opts.rank, lora_alpha=opts.lora_alpha, lora_dropout=opts.dropout,
                      target_modules=targets, layers_to_transform=adapted_blocks(opts, n_blocks),
                      task_type="CAUSAL_LM", **extra)


def misfit(source: Path, missing: int, unexpected: int) -> ModelError:
    """The error of adapter weights that do not fit the model's LoRA layers."""
    return ModelError(f"{source} does not fit this model's LoRA layers "
                      f"({missing} missing, {unexpected} unexpected tensors)",
                      "resume with the NUM_LAYERS and RANK the adapter was trained with")


def trainer_state(it: int, optimizer, workers: int = 1) -> dict:
    """Everything besides the adapter that makes a resumed run continue exactly."""
    import torch  # noqa: PLC0415

    state = {"iteration": it, "optimizer": optimizer.state_dict(), "workers": workers,
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_checkpoint(folder: Path, model, optimizer, workers: int = 1) -> int:
    import torch  # noqa: PLC0415

    state = torch.load(folder / STATE_FILE, weights_only=False)  # our own file, written above
    if state.get("workers", 1) != workers:
        raise ConfigError(f"{folder} was written by a run on {state.get('workers', 1)} device(s); "
                          f"this one has {workers}: the batches would be cut differently",
                          f"resume with DEVICES={state.get('workers', 1)}")
    load_adapter_weights(model, folder / ADAPTER_FILE)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    say(f"Resuming at iteration {state['iteration']} from {folder}")
    return state["iteration"]


def checkpoints(adapter_dir: Path) -> list[Path]:
    folder = Path(adapter_dir) / "checkpoints"
    states = (STATE_FILE, MLX_STATE_FILE)  # torch's or the MLX engine's optimizer state
    found = [p for p in folder.glob("[0-9]*") if any((p / s).is_file() for s in states)] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(adapter_dir: Path) -> Path:
    found = checkpoints(adapter_dir)
    if not found:
        raise ConfigError(f"--resume: no checkpoint to resume in {adapter_dir}/checkpoints",
                          "start a new run without --resume, or point --output-dir at the "
                          "interrupted run's folder")
    return found[-1]


def prune_checkpoints(adapter_dir: Path, keep: int) -> None:
    if keep > 0:
        for old in checkpoints(adapter_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, adapter_dir: Path, meta: dict, checkpoint: int | None = None,
                 state: dict | None = None):
    """Write the PEFT adapter (+ the seed's adapters.safetensors) and the run metadata.

    Written into a temporary folder and moved into place, so an interrupted save never
    leaves a half-written adapter.
    """
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tmp = adapter_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copyfile(tmp / ADAPTER_FILE, tmp / SEED_ADAPTER_FILE)
    runinfo.write_json(tmp / runinfo.RUN_FILE, meta)
    if state is not None:
        import torch  # noqa: PLC0415

        torch.save(state, tmp / STATE_FILE)
    targets = [adapter_dir]
    if checkpoint is not None:
        targets.append(adapter_dir / "checkpoints" / f"{checkpoint:07d}")
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            if f.name == STATE_FILE and target == adapter_dir:
                continue  # optimizer state lives in the checkpoints only
            with atomic(target / f.name) as tmp_file:
                shutil.copyfile(f, tmp_file)
    shutil.rmtree(tmp, ignore_errors=True)


def save_best(model, adapter_dir: Path, meta: dict) -> Path:
    """The adapter of the lowest validation loss so far, in adapters/best (what fuse and
    convert take unless --use-last); adapters/ itself keeps the last."""
    save_adapter(model, Path(adapter_dir) / BEST_DIR, dict(meta, best=True))
    return Path(adapter_dir) / BEST_DIR


def load_adapter_weights(model, source: Path) -> None:
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    state = load_file(source)
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise misfit(source, len(missing), len(result.unexpected_keys))
    say(f"Resuming from the adapter weights in {source}")
