"""`donkeytune models`: the built-in alias and the models the seed was tested with, what each
needs to train, and which fit in this machine's memory."""

from __future__ import annotations

from . import KNOWN_MODELS


def run() -> None:
    """Print the table of the known models and which fit here."""
    from ..gguf.exporters import for_architecture  # noqa: PLC0415

    dev, avail = memory_here()
    rows = [("alias", "Hugging Face repo", "params", "layers", "context", "disk (bf16)", "train mem",
             f"fits here ({avail:.0f} GB {dev})", "seed B/L/R/LR", "GGUF export", "note")]
    for m in KNOWN_MODELS:
        seed = "/".join(f"{m.seed[k]:g}" for k in ("batch_size", "num_layers", "rank", "lr"))
        rows.append((m.alias, m.repo, f"{m.params_b:g}B", str(m.layers), str(m.context),
                     f"{m.params_b * 2:.1f} GB", f"~{m.train_gb:g} GB", fits_here(m.train_gb, avail),
                     seed, for_architecture(m.arch), m.note))
    print_table(rows)
    print("\ntrain mem: a LoRA run with the seed's recipe for the size (bf16 weights); "
          "`donkeytune train` checks the figure for your data before it loads the model.")
    print("seed B/L/R/LR: the seed's BATCH_SIZE/NUM_LAYERS/RANK/LR for the model, where the "
          "recipe starts (RECIPE=seed takes them as they are).")
    print("GGUF export: builtin = our exporter; llama.cpp = llama.cpp's own converter, which also "
          "takes any other architecture it knows (`donkeytune train` says which before it starts).")
    print("MODEL= takes an alias, a repo id, a local HF folder or a .gguf file.")


def fits_here(train_gb: float, available_gb: float) -> str:
    return "yes" if train_gb <= available_gb else "no"


def memory_here() -> tuple[str, float]:
    """(device, GB available to training there): the GPU's memory, else this machine's RAM."""
    from .. import device  # noqa: PLC0415
    from ..train import memory  # noqa: PLC0415

    try:
        dev = device.pick_device("auto")
    except ImportError:
        dev = "cpu"
    return dev, memory.available(dev) / 1e9


def largest_fitting(available_gb: float):
    fitting = [m for m in KNOWN_MODELS if m.train_gb <= available_gb]
    return max(fitting, key=lambda m: m.params_b) if fitting else None


def print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
