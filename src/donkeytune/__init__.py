"""DonkeyTune: fine-tune a small open LLM with LoRA and get back a tested, quantized GGUF."""

__version__ = "0.1.0"
