"""GGUF export without a llama.cpp checkout: numpy, safetensors headers and the `gguf` package.

No torch here: exporting must work in a small environment and keep memory flat.
"""

from __future__ import annotations

from .archs import ARCHS
from .convert import export, export_adapter

SUPPORTED_ARCHITECTURES = tuple(ARCHS)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

__all__ = ["export", "export_adapter", "SUPPORTED_ARCHITECTURES", "OUTTYPES"]
