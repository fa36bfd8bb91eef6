"""Recipes: the seed's size table, memory limits, ITERS from the data, and the flags-win rule."""

from __future__ import annotations

import pytest

from donkeytune import config
from donkeytune.train import recipe
from donkeytune.config import TrainOptions
from donkeytune.errors import ConfigError

GB = 1e9
PLENTY = 1000 * GB


def cfg(hidden=2048, inter=8192, layers=36, heads=16, kv=8, vocab=151936):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)


def options(**flags) -> TrainOptions:
    flags.setdefault("model", "./a-model-the-seed-does-not-name")
    return config.resolve(TrainOptions, flags, environ={})


# params (billions) -> the seed's BATCH_SIZE, NUM_LAYERS, RANK (every block below 1B), and auto's
# LR (LR x SCALE 2)
@pytest.mark.parametrize("params_b, want", [
    (0.135, (4, 36, 8, 1e-3)),
    (0.5, (4, 36, 8, 1e-3)),
    (1.5, (4, 8, 8, 1e-4)),
    (3.0, (2, 4, 8, 1e-4)),
    (4.0, (1, 4, 8, 5e-5)),
    (8.0, (1, 2, 4, 5e-5)),
])
def test_auto_follows_the_seed_table_by_size(params_b, want):
    values, reasons = recipe.choose(options(), cfg(), 1000, PLENTY, params=int(params_b * 1e9))
    assert (values["batch_size"], values["num_layers"], values["rank"]) == want[:3]
    assert values["lr"] == pytest.approx(want[3]) and values["scale"] == 2.0
    assert "seed table" in reasons["batch_size"]


def test_auto_shrinks_to_the_memory_there_is():
    big = dict(params=int(1.5e9))
    roomy, _ = recipe.choose(options(), cfg(), 1000, PLENTY, **big)
    assert roomy["batch_size"] == 4
    # weights alone are 3 GB in bf16: 4.5 GB leaves room for a smaller batch only
    tight, why = recipe.choose(options(), cfg(), 1000, 4.5 * GB, **big)
    assert tight["batch_size"] < 4 and "halved to fit 4.5 GB" in why["batch_size"]
    tighter, why = recipe.choose(options(), cfg(), 1000, 3.9 * GB, **big)
    assert tighter["batch_size"] == 1 and tighter["num_layers"] < 8 and "halved" in why["num_layers"]


@pytest.mark.parametrize("examples, iters", [(160, 320), (2000, 1500), (100_000, 5000), (5, 50)])
def test_iters_come_from_the_number_of_examples(examples, iters):
    values, reasons = recipe.choose(options(), cfg(), examples, PLENTY, params=int(0.5e9))
    assert values["iters"] == iters and f"of {examples} examples" in reasons["iters"]


def test_one_rule_the_recipe_fills_only_what_you_left_unset():
    # ITERS=60 alone (the case): auto keeps choosing LR, SCALE, ... as without it
    assert recipe.pick_recipe(options()) == recipe.pick_recipe(options(iters=60)) == "auto"
    alone, _ = recipe.choose(options(), cfg(), 144, PLENTY, params=int(0.135e9))
    values, reasons = recipe.choose(options(iters=60), cfg(), 144, PLENTY, params=int(0.135e9))
    assert values == dict(alone, iters=60) and values["lr"] == 1e-3
    assert reasons["iters"] == "you" and reasons["lr"] != "you"
    # RECIPE=seed fills with the seed's values and keeps yours
    values, reasons = recipe.choose(options(recipe="seed", lr=3e-4), cfg(), 160, PLENTY,
                                    params=int(0.5e9))
    assert values == dict(config.SEED_RECIPE, lr=3e-4) and reasons["lr"] == "you"
    values, reasons = recipe.choose(options(recipe="auto", batch_size=2, scale=4.0), cfg(), 160,
                                    PLENTY, params=int(0.5e9))
    assert values["batch_size"] == 2 and values["scale"] == 4.0 and values["lr"] == 1e-3
    assert values["iters"] == 640  # 8 epochs at the user's batch size
    assert reasons["batch_size"] == reasons["scale"] == "you"
    # ALPHA gives the scale once the rank is known
    values, reasons = recipe.choose(options(alpha=32.0), cfg(), 160, PLENTY, params=int(0.5e9))
    assert values["scale"] == 4.0 and recipe.source("auto", reasons["scale"]) == "you"


def test_the_plan_table_says_where_each_value_came_from():
    values, reasons = recipe.choose(options(iters=60), cfg(), 144, PLENTY, params=int(0.135e9))
    rows = {line.split()[0]: line.split()[1:] for line in recipe.table("auto", values, reasons)
            .splitlines()[1:]}
    assert rows["ITERS"][:2] == ["60", "you"] and rows["LR"][:2] == ["0.001", "auto"]
    values, reasons = recipe.choose(options(recipe="seed", rank=4), cfg(), 144, PLENTY)
    rows = {line.split()[0]: line.split()[1:] for line in recipe.table("seed", values, reasons)
            .splitlines()[1:]}
    assert rows["RANK"][:2] == ["4", "you"] and rows["LR"][:2] == ["1e-05", "seed"]


@pytest.mark.parametrize("model, want", [
    ("unsloth/SmolLM3-3B-128K", dict(batch_size=2, num_layers=4, rank=8, lr=1e-5)),
    ("jan-nano", dict(batch_size=1, num_layers=4, rank=8, lr=5e-6)),
    ("EssentialAI/rnj-1-instruct", dict(batch_size=1, num_layers=2, rank=4, lr=5e-6)),
    ("unsloth/gemma-3-270m-it", dict(batch_size=4, num_layers=8, rank=8, lr=1e-5)),
])
def test_the_seeds_settings_for_the_models_it_names(model, want):
    values, reasons = recipe.choose(options(model=model, recipe="seed"), cfg(), 160, PLENTY)
    assert {k: values[k] for k in want} == want and values["iters"] == 600
    assert "the seed's settings for" in reasons["batch_size"]
    # auto starts from them too (LR x SCALE stronger, as for every model; every block below 1B)
    values, reasons = recipe.choose(options(model=model), cfg(), 160, PLENTY, params=int(2e9))
    assert (values["batch_size"], values["num_layers"], values["rank"]) == \
        (want["batch_size"], want["num_layers"], want["rank"])
    assert "the seed's settings for" in reasons["batch_size"]
    values, reasons = recipe.choose(options(model=model), cfg(), 160, PLENTY, params=int(0.2e9))
    assert (values["batch_size"], values["num_layers"]) == (want["batch_size"], 36)
    assert "every block" in reasons["num_layers"]


def test_recipe_none_needs_every_value():
    with pytest.raises(ConfigError, match="--recipe none: ITERS, BATCH_SIZE, .* not given"):
        recipe.choose(options(recipe="none", lr=1e-4), cfg(), 160, PLENTY)
    given = dict(iters=5, batch_size=1, num_layers=2, lr=1e-4, rank=4, scale=1.0)
    values, _ = recipe.choose(options(recipe="none", **given), cfg(), 160, PLENTY)
    assert values == given


def test_resolve_fills_and_prints_once(tiny_model, capsys):
    folder = tiny_model("llama")
    resolved = recipe.resolve(options(), folder, 40)
    err = capsys.readouterr().err
    assert "Recipe auto" in err and "ITERS       80" in err and "8 epochs of 40 examples" in err
    assert (resolved.iters, resolved.lr, resolved.scale, resolved.recipe) == (80, 1e-3, 2.0, "auto")
    assert resolved.num_layers == 3  # every block of the tiny model
    # a resumed run's recorded options are complete: kept as they are, nothing printed
    again = recipe.resolve(resolved, folder, 40)
    assert again == resolved and capsys.readouterr().err == ""


def test_seed_filled_for_direct_callers():
    o = recipe.seed_filled(options(rank=4))
    assert (o.iters, o.rank, o.scale, o.lora_alpha) == (600, 4, 10.0, 40.0)
    assert recipe.seed_filled(options(alpha=16.0)).scale == 2.0
