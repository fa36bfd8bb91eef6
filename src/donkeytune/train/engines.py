"""Which engine trains: torch (train/torch/) or MLX (train/mlx.py, Apple Silicon).

Nothing here imports mlx: only running the MLX engine does. Both engines write the same
PEFT adapter, so every stage after training is one code path.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from ..errors import ConfigError
from ..files import MLX_STATE_FILE

MLX_INSTALL = "pip install 'donkeytune[mlx]'  (Linux: pip install 'mlx[cpu]' mlx-lm)"


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def checkpoint_engine(checkpoint: Path) -> str:
    return "mlx" if (Path(checkpoint) / MLX_STATE_FILE).is_file() else "torch"


def pick(name: str, checkpoint: Path | None = None) -> str:
    """torch or mlx. `auto`: the engine that wrote the checkpoint a run continues, else MLX
    on Apple Silicon when mlx-lm is installed, else torch."""
    trained = checkpoint_engine(checkpoint) if checkpoint is not None else None
    if name == "auto":
        name = trained or ("mlx" if apple_silicon() and mlx_installed() else "torch")
    if trained and name != trained:
        other = "torch" if trained == "mlx" else "mlx"
        raise ConfigError(
            f"the run in {Path(checkpoint).parent.parent} was trained by the {trained} "
            f"engine; --resume continues a run (optimizer, random state) only with the engine that "
            f"trained it, not with {other}",
            f"resume it with ENGINE={trained} (or leave ENGINE unset), or start a new {other} run "
            f"from its adapter: RESUME_FROM={Path(checkpoint).parent.parent}/adapters.safetensors "
            f"ENGINE={other}")
    if name == "mlx":
        require_mlx()
    return name


def require_mlx(what: str = "the MLX engine") -> None:
    if not mlx_installed():
        raise ConfigError(f"{what} needs mlx and mlx-lm, which are not installed", MLX_INSTALL)
