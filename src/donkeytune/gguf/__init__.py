"""HF folder -> GGUF: our exporter (numpy, safetensors headers and the `gguf` package, no
torch, flat memory) for the architectures in archs.py, llama.cpp's own converter for the rest.
"""

from __future__ import annotations

from .archs import ARCHS
from .adapter import export_adapter
from .exporters import Plan, export, plan

SUPPORTED_ARCHITECTURES = tuple(ARCHS)  # the built-in exporter's

__all__ = ["export", "export_adapter", "plan", "Plan", "SUPPORTED_ARCHITECTURES"]
