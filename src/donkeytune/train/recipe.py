"""Recipes: the settings the user left unset, chosen from the model, the data and the memory.

`seed`: the seed's flat defaults (ITERS=600 BATCH_SIZE=4 NUM_LAYERS=8 LR=1e-5 RANK=8 SCALE=10).
`auto`: the seed's table by model size, shrunk to the memory there is, with a stronger
LR x SCALE and ITERS from the number of examples (see `choose`).
`none`: no recipe; every one of those options must be given.
Anything the user sets wins, whatever the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..config import SEED_RECIPE, TrainOptions
from ..errors import ConfigError
from ..progress import say

RECIPE_FIELDS = ("iters", "batch_size", "num_layers", "lr", "rank")  # giving one means: seed
ENV_NAMES = {"iters": "ITERS", "batch_size": "BATCH_SIZE", "num_layers": "NUM_LAYERS", "lr": "LR",
             "rank": "RANK", "scale": "SCALE"}

# The seed's table: (largest size in billions, BATCH_SIZE, NUM_LAYERS, RANK, LR, memory in GB)
SIZE_TABLE = (
    (1.0, 4, 8, 8, 1e-5, "0.3-1B"),
    (2.0, 4, 8, 8, 1e-5, "1.5B"),
    (3.5, 2, 4, 8, 1e-5, "3B"),
    (6.0, 1, 4, 8, 5e-6, "4B"),
    (math.inf, 1, 2, 4, 5e-6, "8B"),
)
# Adam's step on the adapter's output scales with LR x SCALE. The seed's 1e-5 x 10 under-trains
# small data sets (SmolLM2-135M on examples/facts: 5/16 facts in 600 steps; 2e-4 x 2: 13/16 in 300).
AUTO_SCALE = 2.0
AUTO_LR_FACTOR = {1.0: 20.0}  # measured below 1B; larger models get half of it (untested here)
DEFAULT_LR_FACTOR = 10.0
# Epochs by data set size: small sets need several passes to learn their facts, large ones few
# (examples/facts, 160 examples, SmolLM2-135M at 2e-4 x 2: 6 epochs left train loss at 0.59,
# under-trained, 10/16 facts; 7.5 epochs: 13/16).
EPOCHS = ((500, 8.0), (5000, 3.0), (math.inf, 1.0))
MIN_ITERS, MAX_ITERS = 50, 5000


def size_class(params_b: float):
    return next(row for row in SIZE_TABLE if params_b < row[0])


def pick_recipe(opts: TrainOptions) -> str:
    """auto unless the user set one of ITERS BATCH_SIZE NUM_LAYERS LR RANK (then the seed's)."""
    if opts.recipe:
        return opts.recipe
    return "seed" if any(getattr(opts, f) is not None for f in RECIPE_FIELDS) else "auto"


def choose(opts: TrainOptions, model_config: dict, n_examples: int, mem_bytes: float,
           params: int | None = None) -> tuple[dict, dict]:
    """Values and reasons for every recipe option; what the user gave is kept, reason "given"."""
    name = pick_recipe(opts)
    given = {f: getattr(opts, f) for f in (*RECIPE_FIELDS, "scale") if getattr(opts, f) is not None}
    if opts.alpha is not None:
        given["scale"] = None  # from alpha, once the rank is known
    values, reasons = {}, {}
    if name == "none":
        missing = [ENV_NAMES[f] for f in (*RECIPE_FIELDS, "scale") if f not in given]
        if missing:
            raise ConfigError(f"--recipe none: {', '.join(missing)} not given",
                              "set them, or use --recipe auto (chosen for the model and data) "
                              "or --recipe seed (the seed's defaults)")
    elif name == "seed":
        values = dict(SEED_RECIPE)
        reasons = {k: "seed default" for k in values}
    else:
        values, reasons = _auto(model_config, n_examples, mem_bytes, params, given)
    for f, v in given.items():
        values[f] = v
        reasons[f] = "given"
    if opts.alpha is not None:
        values["scale"] = opts.alpha / values["rank"]
        reasons["scale"] = f"ALPHA={opts.alpha:g} / RANK"
    return values, reasons


def _auto(cfg: dict, n_examples: int, mem_bytes: float, params: int | None, given: dict):
    from . import memory  # noqa: PLC0415

    text = cfg.get("text_config", cfg)
    n_params = params or _params_from_config(text)
    size_b = n_params / 1e9
    limit, batch, layers, rank, seed_lr, label = size_class(size_b)
    layers = min(layers, text["num_hidden_layers"])
    why = f"seed table, {label} model ({size_b:.2f}B)"
    values = {"batch_size": batch, "num_layers": layers, "rank": rank}
    reasons = dict.fromkeys(values, why)
    # memory: step BATCH_SIZE then NUM_LAYERS down until a 512-token batch fits (the precise check
    # with the real lengths runs once the data is tokenized, before the model loads)
    def need(v):
        return memory.estimate_training(cfg, n_params, tokens=v["batch_size"] * 512,
                                        labelled=v["batch_size"] * 128, num_layers=v["num_layers"],
                                        rank=v["rank"]).total
    for f in ("batch_size", "num_layers"):
        while f not in given and values[f] > 1 and need(values) > mem_bytes:
            values[f] //= 2
            reasons[f] = f"halved to fit {mem_bytes / 1e9:.1f} GB"
    values["scale"] = AUTO_SCALE
    values["lr"] = seed_lr * AUTO_LR_FACTOR.get(limit, DEFAULT_LR_FACTOR)
    step = values["lr"] * AUTO_SCALE / (seed_lr * SEED_RECIPE["scale"])
    reasons["scale"] = "PEFT's usual lora_alpha = 2 x RANK"
    reasons["lr"] = f"LR x SCALE = {step:g} x the seed's (its LR under-trains small data)"
    epochs = next(e for top, e in EPOCHS if n_examples < top)
    batch = given.get("batch_size", values["batch_size"])
    iters = math.ceil(epochs * max(n_examples, 1) / batch)
    values["iters"] = max(MIN_ITERS, min(MAX_ITERS, iters))
    reasons["iters"] = f"{epochs:g} epochs of {n_examples} examples"
    if values["iters"] != iters:
        reasons["iters"] += f" (kept within {MIN_ITERS}-{MAX_ITERS})"
    return values, reasons


def _params_from_config(cfg: dict) -> int:
    """A rough parameter count when the weights cannot be counted (embeddings + blocks)."""
    h, i, n, v = cfg["hidden_size"], cfg.get("intermediate_size", 4 * cfg["hidden_size"]), \
        cfg["num_hidden_layers"], cfg["vocab_size"]
    return v * h * (1 if cfg.get("tie_word_embeddings") else 2) + n * (4 * h * h + 3 * h * i)


def resolve(opts: TrainOptions, folder: Path, n_examples: int) -> TrainOptions:
    """Fill what the user left unset (before the model loads) and print the choice and why."""
    from .. import device  # noqa: PLC0415
    from . import memory  # noqa: PLC0415

    unset = [f for f in (*RECIPE_FIELDS, "scale") if getattr(opts, f) is None]
    if not unset:  # everything given, or a resumed run's recorded options
        return dataclasses.replace(opts, recipe=pick_recipe(opts))
    cfg = json.loads((Path(folder) / "config.json").read_text())
    values, reasons = choose(opts, cfg, n_examples, memory.available(device.pick_device(opts.device)),
                             memory.count_params(folder))
    name = pick_recipe(opts)
    say(table(name, values, reasons))
    return dataclasses.replace(opts, recipe=name, **values)


def seed_filled(opts: TrainOptions) -> TrainOptions:
    """`opts` with what is still unset taken from the seed's defaults (no model or data needed)."""
    unset = {k: v for k, v in SEED_RECIPE.items() if getattr(opts, k) is None}
    if opts.alpha is not None:
        unset.pop("scale", None)  # __post_init__ derives it from ALPHA once the rank is set
    return dataclasses.replace(opts, **unset) if unset else opts


def table(name: str, values: dict, reasons: dict) -> str:
    rows = [(ENV_NAMES[k], f"{values[k]:g}" if isinstance(values[k], float) else str(values[k]),
             reasons[k]) for k in ENV_NAMES]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"Recipe {name} (--recipe auto|seed|none; any option you set wins):"]
    lines += [f"  {a.ljust(w0)}  {b.ljust(w1)}  {c}" for a, b, c in rows]
    return "\n".join(lines)
