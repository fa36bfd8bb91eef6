"""Choosing where and in which precision torch runs, and loading a base model there."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def pick_device(name: str = "auto") -> str:
    import torch  # noqa: PLC0415

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (amx_bf16, avx512_bf16, avx2, ...); None without /proc/cpuinfo."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on x86."""
    flags = cpu_flags()
    if flags is None:
        return sys.platform == "darwin"  # Apple Silicon CPUs do bf16 natively
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def pick_dtype(name: str, device: str):
    import torch  # noqa: PLC0415

    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


KERNEL_CACHE = "64"  # compiled matmul kernels kept by oneDNN and by ideep (1024 each by default)


def bound_kernel_caches() -> None:
    """Keep the CPU's compiled-kernel caches small (a user's own setting wins).

    oneDNN (and PyTorch's ideep layer above it) compiles a matmul kernel for every new input
    shape and keeps up to 1024 of each, with buffers. A training batch's token count changes
    from step to step, so each step adds a few dozen: resident memory grew by ~14 MB a step
    (Qwen2.5-0.5B shapes, ~210-token batches: +500 MB by step 70). With 64 kept (about two
    steps' worth) it grows by ~2 MB a step, at the same step time; SmolLM2-135M's peak RSS
    over 30 steps fell from 1.26 to 0.94 GB. Both are read when the first kernel is built.
    """
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, KERNEL_CACHE)


def set_threads(workers: int = 1) -> None:
    """The cores shared out among the training processes of this machine."""
    import torch  # noqa: PLC0415

    if "OMP_NUM_THREADS" not in os.environ or workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // workers))


def load_model(folder: Path, device: str, dtype, *, trust_remote_code: bool = False,
               quantize_bits: int | None = None):
    """The HF model on `device`; with quantize_bits (QLoRA on CUDA), its linear layers in 4-bit
    NF4 or 8-bit through bitsandbytes, computing in `dtype`."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    from transformers.utils import logging  # noqa: PLC0415

    if not sys.stderr.isatty():
        logging.disable_progress_bar()  # per-tensor bars flood logs
    if quantize_bits:
        from transformers import BitsAndBytesConfig  # noqa: PLC0415

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True) \
            if quantize_bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quant,
                                                    device_map={"": device},
                                                    trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device)


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # noqa: PLC0415

    from .data import ensure_chat_template  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    ensure_chat_template(tok)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def peak_memory_gb(device: str) -> float:
    if device == "mlx":  # the MLX engine: its allocator's peak (unified memory on Apple Silicon)
        import mlx.core as mx  # noqa: PLC0415

        return mx.get_peak_memory() / 1e9
    import torch  # noqa: PLC0415

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    if device == "mps":
        return torch.mps.driver_allocated_memory() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def trim_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise).

    Packed batches change shape every step, and glibc's allocator then holds on to freed
    blocks: without this, resident memory of a CPU run creeps up by ~40% over a few hundred
    steps.
    """
    if sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...)
            pass
