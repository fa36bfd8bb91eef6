"""The names of the files the stages write and read, the GGUF types they may hold, and the one
way every file is written: atomically."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

RUN_FILE = "donkeytune.json"  # what a stage's output was made from (runinfo.py)
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's adapter weights
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's LoraConfig
SEED_ADAPTER_FILE = "adapters.safetensors"  # the name the seed's RESUME_FROM paths use
STATE_FILE = "trainer_state.safetensors"  # a torch checkpoint's optimizer and random state
LEGACY_STATE_FILE = "trainer_state.pt"  # older runs' pickle of it: refused, never loaded
MLX_STATE_FILE = "mlx_state.safetensors"  # an MLX checkpoint's optimizer state
BEST_DIR = "best"  # adapters/best: the adapter of the lowest validation loss
TEST_FILE = "test.json"  # `donkeytune test`'s answers, in output/report/
LOCK_FILE = ".donkeytune.lock"  # held (flock) by the train run writing an adapter folder

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what our exporter writes (gguf/tensors.py)
# llama.cpp's quantization types: name -> (llama_ftype number, bytes per weight in the file)
QUANT_TYPES = {"Q4_K_M": (15, 4.85 / 8), "Q5_K_M": (17, 5.69 / 8), "Q6_K": (18, 6.56 / 8),
               "Q8_0": (7, 34 / 32), "Q4_0": (2, 18 / 32), "F16": (1, 2), "BF16": (32, 2)}


def model_name(reference: str) -> str:
    """A file-name-friendly name of a model reference (alias, repo name or folder name): the
    <model> of output/gguf/<model>-finetuned-<TYPE>.gguf."""
    name = Path(reference.rstrip("/")).name
    name = name.removesuffix(".gguf")
    return re.sub(r"[^\w.-]+", "-", name) or "model"


@contextmanager
def atomic(path: Path, suffix: str = ""):
    """A temporary name next to `path`, renamed to `path` when the block completes and removed
    when it fails: a reader (or a killed run) never sees half a file. `suffix` ends the
    temporary name, for writers that append their own extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_not_input(out, source, what: str = "output") -> None:
    """Refuse an output that would overwrite its own input: the input file itself, or a file
    of the input folder. Checked before anything is written."""
    from .errors import ConfigError  # noqa: PLC0415

    out, source = Path(out), Path(source)
    same = out.exists() and source.exists() and os.path.samefile(out, source)
    inside = source.is_dir() and out.exists() and out.resolve().is_relative_to(source.resolve())
    if same or inside:
        where = "is the input itself" if same else f"is a file of the input folder {source}"
        raise ConfigError(f"the {what} {out} {where}: writing it would destroy the input",
                          "give an output path outside the input, e.g. output/gguf/model.gguf")
