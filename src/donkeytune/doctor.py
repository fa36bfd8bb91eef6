"""`donkeytune doctor`: what this machine has, and what it can fine-tune."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from pathlib import Path

from . import device, models, runinfo
from .models import table
from .train import memory


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    flags = device.cpu_flags()
    if flags is None:
        return ["arm64 (bf16)"] if platform.machine() == "arm64" else []
    return [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                                    ("avx512f", "AVX512"), ("avx2", "AVX2")) if flag in flags]


def compute_device() -> tuple[str, str]:
    """(device, description) the way training picks it."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return "cpu", "torch is not installed (pip install torch)"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "cuda", f"CUDA: {p.name}, {p.total_memory / 1e9:.0f} GB ({bf16})" + (
            f", {torch.cuda.device_count()} GPUs (training uses one)" if torch.cuda.device_count() > 1 else "")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", "Apple MPS (bf16)"
    feats = cpu_features()
    fast = any(f in feats for f in ("AMX-BF16", "AVX512-BF16", "arm64 (bf16)"))
    return "cpu", (f"CPU: {cpu_name()}, {os.cpu_count()} threads, "
                   f"{', '.join(feats) or 'no AVX'}; "
                   + ("bf16 matmuls are fast here" if fast else "no bf16 units: float32, slower"))


def lines(output_dir: str = "output") -> list[tuple[str, str]]:
    vers = runinfo.versions()
    extra = {}
    for pkg in ("matplotlib", "tensorboard", "wandb"):
        if importlib.util.find_spec(pkg):
            extra[pkg] = "installed"
    dev, desc = compute_device()
    avail, total = memory.available(dev) / 1e9, memory.total_memory(dev) / 1e9
    free = shutil.disk_usage(Path(output_dir) if Path(output_dir).exists() else Path.cwd()).free / 1e9
    cache = models.cache_dir()
    llama = vers.get("llama_cpp_python")
    builtin = models.find_known("smollm2-135m")
    packaged = importlib.util.find_spec(builtin.package) is not None
    fit = table.largest_fitting(avail)
    rows = [
        ("python", f"{vers['python']} ({platform.system()} {platform.machine()})"),
        ("packages", ", ".join(f"{k} {v}" for k, v in vers.items() if k != "python")),
        ("optional", ", ".join(extra) or "none (matplotlib for loss.png; tensorboard, wandb)"),
        ("device", desc),
        ("memory", f"{avail:.1f} GB available of {total:.1f} GB"
         + (" (GPU)" if dev == "cuda" else "")),
        ("disk", f"{free:.1f} GB free for {output_dir}/; model cache {cache}"),
        ("llama.cpp", f"llama-cpp-python {llama}: convert/test/chat work" if llama else
         "llama-cpp-python missing: quantize/test/chat need it (pip install llama-cpp-python)"),
        ("built-in model", f"{builtin.alias} installed ({builtin.package})" if packaged else
         f"{builtin.alias} missing (pip install {builtin.package.replace('_', '-')})"),
        ("largest model", f"{fit.alias} ({fit.params_b:g}B, ~{fit.train_gb:g} GB to train) fits"
         if fit else "none of `donkeytune models` fits in the memory available"),
    ]
    return rows


def run(_opts=None) -> int:
    """Print what this machine has; returns 0."""
    rows = lines()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0
