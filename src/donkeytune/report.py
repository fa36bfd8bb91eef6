"""Tables and summaries printed for the user."""

from __future__ import annotations

from .models import KNOWN_MODELS


def print_models() -> None:
    """The built-in alias and the models the seed was tested with."""
    rows = [("alias", "Hugging Face repo", "params", "layers", "context", "train mem", "note")]
    for m in KNOWN_MODELS:
        rows.append((m.alias, m.repo, f"{m.params_b:g}B", str(m.layers), str(m.context),
                     f"~{m.train_gb:g} GB", m.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("\nMODEL= takes an alias, a repo id, a local HF folder or a .gguf file.")
