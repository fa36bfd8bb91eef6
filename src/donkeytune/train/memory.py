"""Know before you start: training memory estimated before any model loads, free disk before writes.

The estimate is a sum of parts a user can reason about (see `estimate_training`); it is
calibrated against the peak RSS of real SmolLM2-135M runs (tests/test_memory.py, slow).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..errors import ConfigError, DonkeyError
from ..files import QUANT_TYPES, safetensors_header

GB = 1e9
# Bytes per parameter of what fuse/export/quantize write (K-quants: llama.cpp's average bits / 8).
# A GGUF type is looked up upper-case (f16 -> F16, q8_0 -> Q8_0); torch dtypes as they are.
FILE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4,
              **{name: size for name, (_ftype, size) in QUANT_TYPES.items()}}
# Python + torch + transformers + tokenizer + allocator slack: the intercept of peak RSS against
# batch size for SmolLM2-135M (Linux x86 CPU, torch 2.13). On a GPU the CUDA context is about 0.5 GB.
BASELINE = 0.7 * GB
# Activation bytes per token and adapted block, in units of hidden / intermediate size (bf16).
# Taken from the measured slope of peak RSS against batch tokens for SmolLM2-135M (saved tensors,
# temporaries and allocator slack together): estimate / peak RSS = 1.16 at batch 2 and 1.07 at
# batch 8 (tests/test_memory.py).
ACT_HIDDEN, ACT_INTER = 36, 16


def count_params(folder: Path) -> int:
    """Parameters of an HF folder, from the safetensors headers (no tensor is read)."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        _, header = safetensors_header(f)
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


@dataclass
class Estimate:
    """Bytes of each part of a training step's peak, and their sum."""

    baseline: float
    weights: float
    lora: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.baseline + self.weights + self.lora + self.activations + self.logits

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.2f}" for k in
                          ("baseline", "weights", "lora", "activations", "logits"))
        return f"{self.total / GB:.2f} GB ({parts})"


QUANT_GROUP_BYTES = 4 / 64  # a quantized weight's share of its group's fp16 scale and bias


def estimate_training(cfg: dict, n_params: int, *, tokens: int, labelled: int, num_layers: int,
                      rank: int, dtype_bytes: int = 2, dropout: bool = True, cached_tokens: int = 0,
                      baseline: float = BASELINE, shards: int = 1, packed: bool = False,
                      quant_bits: int | None = None) -> Estimate:
    """Peak memory of a LoRA training step on `tokens` (packed) tokens, from the model's config.

    - weights: every parameter in the compute dtype (frozen; no gradient, no optimizer state);
      with FSDP over `shards` workers, each holds 1/shards of the block linears (plus one
      block gathered at a time); with `packed` weights (loralinear.py, bf16 on CPU), the
      adapted blocks' linears are held twice (W and W^T, each in oneDNN's layout), and the LM
      head once more (W and W^T packed, its plain pages handed back to the file); with
      `quant_bits` (QUANTIZE_BASE, QLoRA) the block linears take bits/8 bytes a weight plus a
      scale and a bias per group of 64 (mlx-lm's layout; bitsandbytes' NF4 is as large);
    - LoRA: rank x (in + out) per adapted linear, fp32, x4 for weight, gradient and Adam's two moments;
    - activations, kept for the backward pass in the adapted blocks only (frozen blocks below keep
      nothing, and frozen linears keep no input): per token and block, ACT_HIDDEN x hidden +
      ACT_INTER x intermediate bytes (attention's q, k, v and output, the MLP's gate, up and
      silu, the RMSNorms' fp32 tensors, the LoRA inputs and dropout masks), plus the frozen
      blocks' output kept per example by the prefix cache (`cached_tokens`, at most 1 GB);
    - logits: the LM head runs on labelled positions only, CHUNK positions by BLOCK vocabulary
      rows at a time: fp32 logits, exponentials and the bf16 copy (12 bytes an entry).
    """
    from .torch.sizes import BLOCK, CHUNK  # noqa: PLC0415 - the head kernel's blocks, no torch

    cfg = models.text_config(cfg)
    hidden, inter = cfg["hidden_size"], cfg.get("intermediate_size", 4 * cfg["hidden_size"])
    heads = cfg.get("num_attention_heads", 1)
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    n_blocks = cfg["num_hidden_layers"]
    layers = n_blocks if num_layers == -1 else min(num_layers, n_blocks)
    q_out = heads * head_dim
    # (in, out) of the seven linears of a block: q, k, v, o, gate, up, down
    linears = [(hidden, q_out), (hidden, kv), (hidden, kv), (q_out, hidden),
               (hidden, inter), (hidden, inter), (inter, hidden)]
    lora_params = layers * sum(rank * (i + o) for i, o in linears)
    blocks = min(n_blocks * sum(i * o for i, o in linears), n_params)
    block = (ACT_HIDDEN * hidden + ACT_INTER * inter) * dtype_bytes / 2
    if not dropout:
        block -= 6 * hidden + inter  # no dropout masks (1 byte per LoRA input)
    block_bytes = quant_bits / 8 + QUANT_GROUP_BYTES if quant_bits else dtype_bytes
    return Estimate(
        baseline=baseline,
        weights=(n_params - blocks) * dtype_bytes
        + (blocks / shards + blocks / n_blocks * (shards > 1)) * block_bytes
        + (blocks / n_blocks * layers + cfg["vocab_size"] * hidden) * packed * dtype_bytes,
        lora=lora_params * 16,
        activations=tokens * layers * block + min(cached_tokens * hidden * dtype_bytes, GB),
        logits=min(labelled, CHUNK) * min(cfg["vocab_size"], BLOCK) * 12,
    )


def batch_shape(items, batch_size: int) -> tuple[int, int]:
    """(tokens, labelled tokens) of the worst batch: packing removes padding, so the
    BATCH_SIZE longest examples set the tokens, the most-labelled ones the LM head's rows."""
    if not items:
        return 1, 1
    longest = sorted((len(t.input_ids) for t in items), reverse=True)
    labelled = sorted((t.trained_tokens for t in items), reverse=True)
    return sum(longest[:batch_size]), sum(labelled[:batch_size])


def available(device: str = "cpu") -> float:
    """Bytes this process can still grow by on `device` (plus what it already holds on CPU)."""
    import psutil  # noqa: PLC0415

    if device == "cuda":
        import torch  # noqa: PLC0415

        free, _total = torch.cuda.mem_get_info()
        return float(free)
    if device == "mps":
        import torch  # noqa: PLC0415

        limit = getattr(torch.mps, "recommended_max_memory", None)
        if limit:
            return float(limit())
    return float(psutil.virtual_memory().available + psutil.Process().memory_info().rss)


def total_memory(device: str = "cpu") -> float:
    import psutil  # noqa: PLC0415

    if device == "cuda":
        import torch  # noqa: PLC0415

        return float(torch.cuda.get_device_properties(0).total_memory)
    return float(psutil.virtual_memory().total)


class OutOfMemory(DonkeyError):
    """The run will not fit: said before the model loads."""

    status = 2


def check_training(opts, folder: Path, train_set, device: str, dtype_bytes: int, *,
                   auto: bool = False, limit: float | None = None, packed: bool = False):
    """Compare the estimate with free memory before loading. Returns opts (for an auto recipe,
    shrunk until it fits); raises OutOfMemory with the settings that fit otherwise. `packed`:
    the run will pack its frozen weights (loralinear.can_pack)."""
    from ..progress import say  # noqa: PLC0415

    cfg = models.read_config(folder)
    n_params = count_params(folder)
    if limit is None:
        limit = available(device)
        if device == "cpu" and opts.devices > 1:  # the workers on this machine share its RAM
            limit /= opts.devices
    baseline = BASELINE if device == "cpu" else 0.5 * GB

    workers = opts.workers

    def estimate(o):
        tokens, labelled = batch_shape(train_set, -(-o.batch_size // workers))  # a worker's share
        if o.max_seq_length < max((len(t.input_ids) for t in train_set), default=0):
            tokens = min(tokens, o.batch_size * o.max_seq_length)
        return estimate_training(cfg, n_params, tokens=tokens, labelled=labelled,
                                 num_layers=o.num_layers, rank=o.rank, dtype_bytes=dtype_bytes,
                                 dropout=o.dropout > 0, baseline=baseline,
                                 cached_tokens=0 if o.fsdp else cached,  # FSDP runs keep no prefix
                                 shards=o.workers if o.fsdp else 1,
                                 packed=packed and not o.fsdp and not o.quantize_base,
                                 quant_bits=o.quantize_base)

    cached = sum(len(t.input_ids) for t in train_set)
    need = estimate(opts)
    each = " per worker" if workers > 1 else ""
    if need.total <= limit:
        say(f"Memory: about {need.total / GB:.1f} GB needed{each}, {limit / GB:.1f} GB available"
            + (f" to each of the {workers} workers" if workers > 1 else ""))
        return opts
    n_blocks = models.text_config(cfg)["num_hidden_layers"]
    fitting = _shrink(opts, lambda o: estimate(o).total <= limit, n_blocks)
    if auto and fitting is not None:
        say(f"Memory: the recipe needs about {need.total / GB:.1f} GB, {limit / GB:.1f} GB is "
            f"available: using {_settings(fitting)}")
        return fitting
    where = {"cpu": "RAM", "mps": "unified memory"}.get(device, f"{device} memory")
    fix = (f"use {_settings(fitting)} (about {estimate(fitting).total / GB:.1f} GB)"
           if fitting is not None else "use a smaller model (donkeytune models shows what fits)")
    raise OutOfMemory(f"this run needs about {need.describe()}{each}, but only {limit / GB:.1f} GB of "
                      f"{where} is available", fix + "; close other programs to free memory")


def _settings(o) -> str:
    return (f"BATCH_SIZE={o.batch_size} NUM_LAYERS={o.num_layers} RANK={o.rank} "
            f"MAX_SEQ_LENGTH={o.max_seq_length}")


def _shrink(opts, fits, n_blocks: int):
    """The first smaller recipe that fits: halve BATCH_SIZE, then NUM_LAYERS, then RANK, then
    MAX_SEQ_LENGTH (which truncates long examples: last)."""
    import dataclasses  # noqa: PLC0415

    o = opts
    for name, floor in (("batch_size", 1), ("num_layers", 1), ("rank", 4), ("max_seq_length", 256)):
        while getattr(o, name) > floor:
            value = getattr(o, name)
            if name == "num_layers" and value == -1:
                value = n_blocks
            o = dataclasses.replace(o, **{name: max(floor, value // 2)})
            if fits(o):
                return o
    return None


def check_disk(folder: Path, need: float, what: str) -> None:
    """Stop before writing `need` bytes into `folder` when the disk cannot hold them."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * 1.05 > free:
        raise ConfigError(f"{what} needs about {need / GB:.1f} GB in {folder}, but only "
                          f"{free / GB:.1f} GB of disk is free",
                          "free some disk space, or set OUTPUT_DIR to a disk with room")


def file_bytes(n_params: float, kind: str) -> float:
    return n_params * FILE_BYTES.get(kind, FILE_BYTES.get(kind.upper(), 2))


def check_model_write(source: Path, out: Path, kinds: list[str], what: str) -> None:
    """Before fuse/export/quantize: room on disk for `source` (an HF folder or a 16-bit GGUF)
    written once in each of `kinds` (float32, f16, Q4_K_M, ...)."""
    source = Path(source)
    if source.is_dir():
        need = sum(file_bytes(count_params(source), k) for k in kinds)
    elif source.is_file():  # a 16-bit GGUF to quantize: its size, scaled to the target type
        need = sum(file_bytes(source.stat().st_size / 2, k) for k in kinds)
    else:
        return  # the stage itself says what is missing
    check_disk(out, need, what)
