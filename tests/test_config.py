"""Options: defaults < YAML < environment (Make variables) < flags; bad values fail early."""

from __future__ import annotations

import pytest

from donkeytune import config
from donkeytune.config import TrainOptions
from donkeytune.errors import ConfigError


def test_seed_defaults():
    """Recipe options are "not given" (None) until the recipe fills them; `seed` is the seed's."""
    o = TrainOptions()
    assert (o.iters, o.batch_size, o.num_layers, o.lr, o.rank, o.scale, o.recipe) == (None,) * 7
    seed = TrainOptions(**config.SEED_RECIPE)
    assert (seed.iters, seed.batch_size, seed.num_layers, seed.lr, seed.rank, o.dropout) == (
        600, 4, 8, 1e-5, 8, 0.05)
    assert seed.scale == 10.0 and seed.lora_alpha == 80.0  # the seed's mlx-lm scale 10 = PEFT alpha 80 at rank 8
    assert (o.steps_per_eval, o.steps_per_report, o.save_every) == (50, 10, 100)


def test_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("iters: 100\nbatch_size: 2\nlr: 3.0e-4\nrank: 4\n")
    env = {"DONKEYTUNE_ITERS": "200", "DONKEYTUNE_BATCH_SIZE": "3", "DONKEYTUNE_RANK": ""}
    o = config.resolve(TrainOptions, {"iters": 300, "lr": None}, config_file=yaml_file, environ=env)
    assert o.iters == 300        # flag beats environment and YAML
    assert o.batch_size == 3     # environment beats YAML
    assert o.lr == 3e-4          # YAML beats default; a flag left unset (None) does not override
    assert o.rank == 4           # an empty Make variable is "not given"
    assert o.num_layers is None  # not given: the recipe fills it before the model loads


def test_config_file_from_environment(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("iters: 7\n")
    o = config.resolve(TrainOptions, {}, environ={"DONKEYTUNE_CONFIG": str(yaml_file)})
    assert o.iters == 7


def test_alpha_sets_scale():
    o = config.resolve(TrainOptions, {"rank": 16, "alpha": 32}, environ={})
    assert o.scale == 2.0 and o.lora_alpha == 32


@pytest.mark.parametrize("flags, message", [
    ({"iters": 0}, "ITERS must be positive"),
    ({"num_layers": 0}, "NUM_LAYERS must be positive or -1"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"lr": -1.0}, "LR must be positive"),
])
def test_contradictions_fail(flags, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve(TrainOptions, flags, environ={})


def test_bad_env_value_names_the_option():
    with pytest.raises(ConfigError, match="option iters: 'many' is not a valid int"):
        config.resolve(TrainOptions, {}, environ={"DONKEYTUNE_ITERS": "many"})


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("iterations: 5\n")
    with pytest.raises(ConfigError, match="unknown option 'iterations'"):
        config.resolve(TrainOptions, {}, config_file=f, environ={})


def test_broken_yaml_is_located(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("iters: 5\nlr: [1,\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        config.resolve(TrainOptions, {}, config_file=f, environ={})


def test_shipped_configs_are_valid():
    """Every example config in the repo loads into the options it is for."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted(root.glob("examples/**/*.yaml"))
    assert files
    for f in files:
        o = config.resolve(TrainOptions, {}, config_file=f, environ={})
        assert Path(root / o.data_dir, "train.jsonl").is_file() or Path(o.data_dir, "train.jsonl").is_file()
