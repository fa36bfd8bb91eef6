"""Option values from YAML and the environment get the checks flags get (issue 20, item 7):
choices, types and finite numbers, all before any model loads."""

from __future__ import annotations

import pytest

from donkeytune import config
from donkeytune.cli import main

# (command, option, YAML text of the value, environment text of the value, words the message names)
BAD = [
    ("train", "recipe", "magic", "magic", ["recipe", "auto", "seed", "none"]),
    ("train", "device", "tpu", "tpu", ["device", "cpu", "cuda", "mps"]),
    ("train", "dtype", "int8", "int8", ["dtype", "bfloat16", "float32"]),
    ("train", "report_to", "mlflow", "mlflow", ["report_to", "tensorboard", "wandb"]),
    ("train", "engine", "foo", "foo", ["engine", "torch", "mlx"]),
    ("train", "iters", "true", "true", ["iters", "int"]),
    ("train", "iters", "1e999", "1e999", ["iters", "finite"]),
    ("train", "iters", ".inf", "inf", ["iters", "finite"]),
    ("train", "lr", ".nan", "nan", ["lr", "finite"]),
    ("convert", "outtype", "q2", "q2", ["outtype", "f16", "q8_0"]),
]


@pytest.fixture
def no_model_loads(tiny_model, monkeypatch):
    """The tiny model's path; loading any model or tokenizer from here on fails the test."""
    import transformers

    path = str(tiny_model("llama"))

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    return path


def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("command, option, yaml_value, env_value, words", BAD,
                         ids=[f"{c}-{o}-{y}" for c, o, y, _, _ in BAD])
@pytest.mark.parametrize("source", ["yaml", "env"])
def test_bad_option_value_is_exit_2_before_the_model_loads(
        tmp_path, monkeypatch, capsys, no_model_loads,
        source, command, option, yaml_value, env_value, words):
    _clean_env(monkeypatch)
    model = no_model_loads
    args = [command, "--model", model, "--output-dir", str(tmp_path / "out")]
    if source == "yaml":
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"{option}: {yaml_value}\n", encoding="utf-8")
        args += ["--config", str(cfg)]
    else:
        env = next(f.metadata["env"] for f in config.dataclasses.fields(config.TrainOptions
                                                                        if command == "train"
                                                                        else config.ConvertOptions)
                   if f.name == option)
        monkeypatch.setenv(config.ENV_PREFIX + env, env_value)
    assert main(args) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_a_choice_in_another_case_is_the_choice(monkeypatch):
    opts = config.resolve(config.ConvertOptions, {}, environ={"DONKEYTUNE_OUTTYPE": "F16",
                                                             "DONKEYTUNE_DEVICE": "CPU"})
    assert opts.outtype == "f16"
    assert config.resolve(config.TrainOptions, {}, environ={"DONKEYTUNE_DEVICE": "CPU"}).device == "cpu"


def test_good_values_from_every_source_still_pass():
    opts = config.resolve(config.TrainOptions, {"engine": "torch"},
                          environ={"DONKEYTUNE_ITERS": "1e3", "DONKEYTUNE_RECIPE": "seed",
                                   "DONKEYTUNE_LR": "2e-4", "DONKEYTUNE_QUANTIZE_BASE": "4"})
    assert (opts.iters, opts.recipe, opts.lr, opts.quantize_base, opts.engine) == (1000, "seed", 2e-4, 4, "torch")
