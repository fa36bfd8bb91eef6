"""The adapter folder: PEFT's files, the seed's copy, the run record, checkpoints with the
trainer state; saved atomically, pruned, loaded back."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from .. import runinfo
from ..errors import ConfigError, ModelError
from ..files import (ADAPTER_FILE, BEST_DIR, LEGACY_STATE_FILE, MLX_STATE_FILE, SEED_ADAPTER_FILE,
                     STATE_FILE, atomic)
from ..progress import say

STATE_FORMAT = 1  # of trainer_state.safetensors' metadata


def adapted_blocks(opts, n_blocks: int) -> list[int]:
    """The blocks LoRA adapts, in both engines: the last NUM_LAYERS (-1: all)."""
    n = n_blocks if opts.num_layers == -1 else opts.num_layers
    if n > n_blocks:
        raise ConfigError(f"NUM_LAYERS={opts.num_layers} but the model has only {n_blocks} blocks",
                          f"use NUM_LAYERS={n_blocks} or -1 (all)")
    return list(range(n_blocks - n, n_blocks))


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


def write_state(state: dict, path: Path) -> None:
    """The trainer state without pickle: its tensors in safetensors, the rest as JSON in the
    file's metadata (a run folder may come from anyone; loading it must run no code)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors, entries = {}, {}
    for idx, values in state["optimizer"]["state"].items():
        for key, value in values.items():
            if hasattr(value, "shape"):
                tensors[f"optimizer/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                entries.setdefault(str(idx), {})[key] = value
    tensors["rng/torch"] = state["torch_rng"]
    for i, rng in enumerate(state.get("cuda_rng", [])):
        tensors[f"rng/cuda/{i}"] = rng
    meta = {"format": STATE_FORMAT, "iteration": state["iteration"], "workers": state["workers"],
            "param_groups": state["optimizer"]["param_groups"], "scalars": entries,
            "python_rng": state["python_rng"]}
    save_file(tensors, str(path), metadata={"donkeytune": json.dumps(meta)})


def _bad_state(path: Path, what: str) -> ModelError:
    return ModelError(f"{path} {what}; it is not loaded",
                      f"start the run again (--force, FORCE=1), or delete {path.parent} to resume "
                      "from the checkpoint before it")


def read_state(folder: Path) -> tuple[dict, dict]:
    """The tensors and the metadata of a checkpoint's trainer state, checked for their form;
    a pickle (an older DonkeyTune's trainer_state.pt) or a tampered file is refused unread."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        legacy = Path(folder) / LEGACY_STATE_FILE
        if legacy.is_file():
            raise _bad_state(legacy, "is a pickle file (an older DonkeyTune's format), which can "
                                     "run code when loaded")
        raise _bad_state(path, "is missing")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; its first byte
    # may well be 0x80 (a header of 128 + 256k bytes), so the pickle marks count only without it
    safetensors = head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size
    if not safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise _bad_state(path, "is a pickle (torch.save) file, which can run code when loaded, "
                               "not the safetensors file DonkeyTune writes")
    try:
        with safe_open(str(path), "pt") as st:
            meta = json.loads((st.metadata() or {}).get("donkeytune", "null"))
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad_state(path, f"is not a readable safetensors file ({e})") from None
    ok = isinstance(meta, dict) and meta.get("format") == STATE_FORMAT \
        and isinstance(meta.get("iteration"), int) and isinstance(meta.get("workers"), int) \
        and isinstance(meta.get("param_groups"), list) and isinstance(meta.get("scalars"), dict) \
        and isinstance(meta.get("python_rng"), list) and "rng/torch" in tensors
    if not ok:
        raise _bad_state(path, "does not hold a DonkeyTune trainer state (tampered or truncated)")
    return tensors, meta


def check_state(folder: Path) -> None:
    """Refuse a checkpoint whose trainer state cannot be read safely, before any model loads."""
    if not (Path(folder) / MLX_STATE_FILE).is_file():  # the MLX engine checks its own
        read_state(folder)


def restore_checkpoint(folder: Path, model, optimizer, workers: int = 1) -> int:
    import torch  # noqa: PLC0415

    tensors, meta = read_state(folder)
    path = folder / STATE_FILE
    if meta["workers"] != workers:
        raise ConfigError(f"{folder} was written by a run on {meta['workers']} device(s); "
                          f"this one has {workers}: the batches would be cut differently",
                          f"resume with DEVICES={meta['workers']}")
    load_adapter_weights(model, folder / ADAPTER_FILE)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "optimizer":
            idx, _, key = rest.partition("/")
            if not idx.isdigit() or int(idx) >= len(params) or (
                    value.dim() and value.shape != params[int(idx)].shape):
                raise _bad_state(path, f"has a tensor {name} that fits no LoRA weight of this run")
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    python_rng = meta["python_rng"]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        random.setstate((python_rng[0], tuple(python_rng[1]), python_rng[2]))
        torch.set_rng_state(tensors["rng/torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise _bad_state(path, f"does not fit this run's optimizer ({e})") from None
    say(f"Resuming at iteration {meta['iteration']} from {folder}")
    return meta["iteration"]


def checkpoints(adapter_dir: Path) -> list[Path]:
    folder = Path(adapter_dir) / "checkpoints"
    states = (STATE_FILE, MLX_STATE_FILE, LEGACY_STATE_FILE)  # LEGACY: found, to be refused
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
        write_state(state, tmp / STATE_FILE)
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
