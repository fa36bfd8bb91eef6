"""What an output folder was made from: written next to every stage's output, read by the next."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path

from . import models
from .errors import ModelError
from .files import ADAPTER_FILE, RUN_FILE, read_json, write_atomic



def write_json(path: Path, obj) -> Path:
    """Write JSON atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def model_fingerprint(folder: Path) -> str:
    """Identity of a base model: its config (shapes, vocab) and the size of its weights."""
    cfg = models.read_config(folder)
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"):
        cfg.pop(volatile, None)
    weights = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    blob = json.dumps(cfg, sort_keys=True) + f"|{weights}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for pkg in ("donkeytune", "torch", "transformers", "peft", "gguf", "llama_cpp_python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run_record(stage: str, opts, **extra) -> dict:
    return {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "options": dataclasses.asdict(opts), "versions": versions(), **extra}


def read_run(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / RUN_FILE
    if not path.is_file():
        raise ModelError(f"{adapter_dir} holds no trained adapter ({RUN_FILE} missing)",
                         "train first (make train), or point --output-dir at a run's folder")
    return read_json(path)


def base_model_of(run: dict, model: str | None, *, trust_remote_code: bool = False,
                  allow_pickle: bool = False) -> Path:
    """The base model folder of a run; a MODEL that is not that base is an error naming both."""
    from . import models  # noqa: PLC0415

    trained_on = run["base_model"]
    if model is None:
        folder = Path(run["base_model_path"])
        if not (folder / "config.json").exists():  # moved or cache cleared: resolve the reference again
            folder = models.resolve(trained_on, trust_remote_code=trust_remote_code,
                                    allow_pickle=allow_pickle)
    else:
        folder = models.resolve(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if model_fingerprint(folder) != run["base_fingerprint"]:
        raise ModelError(
            f"the adapter was trained on {trained_on!r}, but MODEL is {model!r}, a different model",
            f"leave MODEL unset to use {trained_on!r}, or train a new adapter for {model!r}")
    return folder


def adapter_fingerprint(adapter_dir: Path) -> str | None:
    return file_fingerprint(Path(adapter_dir) / ADAPTER_FILE)


def check_gguf_current(path: Path, output_dir: str | Path) -> None:
    """A GGUF that `convert` wrote into OUTPUT_DIR/gguf must come from the adapter there now:
    after a new training it is stale, and running it would test the old model."""
    gguf_dir = Path(output_dir) / "gguf"
    adapter = Path(output_dir) / "adapters" / ADAPTER_FILE
    meta_file = gguf_dir / RUN_FILE
    if not (adapter.is_file() and meta_file.is_file() and Path(path).is_file()
            and Path(path).resolve().parent == gguf_dir.resolve()):
        return  # no run here, or a GGUF of the user's own
    meta = read_json(meta_file)
    record = meta.get("files", {}).get(Path(path).name)
    if record is None and meta.get("files"):
        return  # not one of convert's files
    made_from = (record or {}).get("adapter_fingerprint")
    if made_from is not None:
        stale = made_from != adapter_fingerprint(adapter.parent)
    else:  # converted before GGUFs recorded their adapter: the adapter is newer than the file
        stale = adapter.stat().st_mtime > Path(path).stat().st_mtime
    if stale:
        raise ModelError(f"{path} was converted from an earlier adapter: {adapter.parent} has been "
                         "trained again since, so it is not the fine-tuned model any more",
                         "convert the new adapter: make convert (donkeytune convert), "
                         "or pass GGUF= to run another file")
