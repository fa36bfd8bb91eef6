"""The names of the files the stages write and read, declared once."""

from __future__ import annotations

RUN_FILE = "donkeytune.json"  # what a stage's output was made from (runinfo.py)
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's adapter weights
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's LoraConfig
SEED_ADAPTER_FILE = "adapters.safetensors"  # the name the seed's RESUME_FROM paths use
STATE_FILE = "trainer_state.pt"  # a torch checkpoint's optimizer and random state
MLX_STATE_FILE = "mlx_state.safetensors"  # an MLX checkpoint's optimizer state
