"""Recipes: the settings the user left unset, chosen from the model, the data and the memory.

One rule: the recipe (`auto` unless RECIPE= says otherwise) fills every value the user did
not set, and keeps every value the user set.
`seed`: the seed's defaults (ITERS=600 BATCH_SIZE=4 NUM_LAYERS=8 LR=1e-5 RANK=8 SCALE=10), with
the seed's own settings for a model it names (SmolLM3-3B: BATCH_SIZE=2 NUM_LAYERS=4, ...).
`auto`: the seed's settings for the model (its table by size for other models), shrunk to the
memory there is, with a stronger LR x SCALE and ITERS from the number of examples (see `choose`).
`none`: no recipe; every one of those options must be given.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .. import models
from ..config import SEED_RECIPE, TrainOptions
from ..errors import ConfigError
from ..progress import say

RECIPE_FIELDS = ("iters", "batch_size", "num_layers", "lr", "rank")
YOU = "you"  # the source of a value the user set
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
# small data sets. SmolLM2-135M on examples/facts, 320 steps, the 16 held-out questions answered
# by the merged model: the seed's 8 blocks at 2e-4 x 2, 11/16; at 1e-3 x 2, 13/16; every block
# at 2e-4 x 2, 13/16; every block at 1e-3 x 2, 15/16 (the lowest validation loss) and 16/16 (last).
AUTO_SCALE = 2.0
AUTO_LR_FACTOR = {1.0: 100.0}  # measured below 1B; larger models get 10x the seed's (untested here)
DEFAULT_LR_FACTOR = 10.0
ALL_BLOCKS_BELOW_B = 1.0  # models smaller than this (billions) get LoRA on every block
# Epochs by data set size: small sets need several passes to learn their facts, large ones few
# (examples/facts, 160 examples, SmolLM2-135M at 2e-4 x 2: 6 epochs left train loss at 0.59,
# under-trained, 10/16 facts; 7.5 epochs: 13/16).
EPOCHS = ((500, 8.0), (5000, 3.0), (math.inf, 1.0))
MIN_ITERS, MAX_ITERS = 50, 5000


def size_class(params_b: float):
    return next(row for row in SIZE_TABLE if params_b < row[0])


def pick_recipe(opts: TrainOptions) -> str:
    """RECIPE= when given, else auto: setting ITERS (or any one value) never switches recipe."""
    return opts.recipe or "auto"


def seed_settings(opts: TrainOptions) -> tuple[dict, str] | None:
    """The seed's BATCH_SIZE/NUM_LAYERS/RANK/LR for a model the seed names, else None."""
    from ..models import DEFAULT_MODEL, find_known  # noqa: PLC0415

    known = find_known(opts.model or DEFAULT_MODEL)
    return (dict(known.seed), f"the seed's settings for {known.repo}") if known else None


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
        reasons = {k: "the seed's default" for k in values}
        known = seed_settings(opts)
        if known:
            values.update(known[0])
            reasons.update(dict.fromkeys(known[0], known[1]))
    else:
        values, reasons = _auto(model_config, n_examples, mem_bytes, params, given, seed_settings(opts),
                                opts.quantize_base)  # QLoRA: a smaller base
    for f, v in given.items():
        values[f] = v
        reasons[f] = YOU
    if opts.alpha is not None:
        values["scale"] = opts.alpha / values["rank"]
        reasons["scale"] = f"{YOU}: ALPHA={opts.alpha:g} / RANK"
    return values, reasons


def _auto(cfg: dict, n_examples: int, mem_bytes: float, params: int | None, given: dict,
          known: tuple[dict, str] | None = None, quant_bits: int | None = None):
    from . import memory  # noqa: PLC0415

    text = models.text_config(cfg)
    n_params = params or _params_from_config(text)
    size_b = n_params / 1e9
    limit, batch, layers, rank, seed_lr, label = size_class(size_b)
    why = f"seed table, {label} model ({size_b:.2f}B)"
    if known:  # the seed's own settings for this model are the starting point
        batch, layers, rank, seed_lr = (known[0][k] for k in ("batch_size", "num_layers", "rank", "lr"))
        why = known[1]
    values = {"batch_size": batch, "num_layers": min(layers, text["num_hidden_layers"]), "rank": rank}
    reasons = dict.fromkeys(values, why)
    if size_b < ALL_BLOCKS_BELOW_B:  # the seed's last 8 blocks learn fewer of the facts taught
        values["num_layers"] = text["num_hidden_layers"]
        reasons["num_layers"] = f"every block of a model under {ALL_BLOCKS_BELOW_B:g}B"
    # memory: step BATCH_SIZE then NUM_LAYERS down until a 512-token batch fits (the precise check
    # with the real lengths runs once the data is tokenized, before the model loads)
    def need(v):
        return memory.estimate_training(cfg, n_params, tokens=v["batch_size"] * 512,
                                        labelled=v["batch_size"] * 128, num_layers=v["num_layers"],
                                        rank=v["rank"], quant_bits=quant_bits).total
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
    cfg = models.read_config(folder)
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


def source(name: str, reason: str) -> str:
    """Where a value came from: you, or the recipe (auto / seed)."""
    return YOU if reason.startswith(YOU) else name


def table(name: str, values: dict, reasons: dict) -> str:
    """One row per value: NAME, value, you/auto/seed, why."""
    rows = [(ENV_NAMES[k], f"{values[k]:g}" if isinstance(values[k], float) else str(values[k]),
             source(name, reasons[k]), reasons[k].removeprefix(YOU).removeprefix(": "))
            for k in ENV_NAMES]
    w0, w1, w2 = (max(len(r[i]) for r in rows) for i in range(3))
    lines = [f"Recipe {name} (RECIPE=auto|seed|none): it fills what you did not set; "
             "what you set is kept"]
    lines += [f"  {a.ljust(w0)}  {b.ljust(w1)}  {c.ljust(w2)}  {d}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)
