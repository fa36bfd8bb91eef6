"""The run report: diagnosis on synthetic loss curves, and the files a tiny auto-recipe run writes."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import write_jsonl
from donkeytune import config, report, runinfo, train
from donkeytune.errors import ConfigError


def curve(values, every=10):
    return [(every * (i + 1), v) for i, v in enumerate(values)]


def kinds(train_losses, val_losses=(), **kw):
    return [f.kind for f in report.diagnose(curve(train_losses), curve(val_losses, 50), **kw)]


def test_overfitting_is_validation_rising_while_train_falls():
    found = report.diagnose(curve([2.0, 1.2, 0.6, 0.3, 0.15, 0.08], 40),
                            [(0, 2.1), (50, 1.0), (100, 0.9), (150, 1.2), (200, 1.5)], lr=2e-4, iters=200)
    assert [f.kind for f in found] == ["overfitting"]
    assert "ITERS=100" in found[0].fix and "(iter 100)" in found[0].message
    assert report.rising_from([(0, 2.1), (50, 1.0), (100, 0.9), (150, 1.2)]) == 100


def test_under_training_is_train_loss_still_above_half():
    found = report.diagnose(curve([3.0, 2.5, 2.0, 1.6, 1.3]), curve([2.8, 2.2, 1.8], 50),
                            lr=1e-5, iters=600)
    assert [f.kind for f in found] == ["under-training"]
    assert "ITERS=1200" in found[0].fix and "LR=2e-05" in found[0].fix


def test_unstable_is_oscillating_train_loss():
    found = report.diagnose(curve([1.0, 0.4, 0.9, 0.3, 0.8, 0.35, 0.9, 0.3, 0.85, 0.3]), [], lr=1e-3)
    assert [f.kind for f in found] == ["unstable"] and "LR=0.0005" in found[0].fix
    assert "unstable" in kinds([0.4, 0.3, 0.35, 0.45, 0.5])  # ends above where it started


def test_healthy_run():
    assert kinds([1.5, 0.9, 0.5, 0.35, 0.3], [1.6, 0.8, 0.5, 0.45]) == ["healthy"]
    assert report.rising_from([(0, 2.0), (50, 1.0), (100, 1.01)]) is None  # within noise


def test_tracker_packages_are_checked_before_anything_runs():
    for name in ("wandb", "tensorboard"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"pip install {name}"):
                config.resolve(config.TrainOptions, {"report_to": name}, environ={})


def test_tiny_auto_run_writes_the_report(tiny_model, tmp_path, capsys):
    """No recipe option given: auto fills them (and records them); the report files are written."""
    rows = [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                          {"role": "assistant", "content": f"Code {i} is Zanzibar-{i}."}]} for i in range(8)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:4])
    opts = config.resolve(config.TrainOptions, dict(
        model=str(tiny_model("llama")), data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
        steps_per_eval=25, steps_per_report=5, save_every=100, dtype="float32"), environ={})
    out = train.run(opts)
    err = capsys.readouterr().err
    assert "Recipe auto" in err and "Diagnosis: " in err
    recorded = runinfo.read_run(out)["options"]
    assert (recorded["recipe"], recorded["iters"], recorded["lr"], recorded["scale"]) == ("auto", 50, 1e-3, 2.0)
    folder = tmp_path / "out" / "report"
    assert {p.name for p in folder.iterdir()} == {"metrics.jsonl", "loss.png", "summary.md"}
    from PIL import Image

    with Image.open(folder / "loss.png") as png:
        assert png.format == "PNG" and png.size == (800, 450)
    summary = (folder / "summary.md").read_text()
    for part in ("**Model**", str(tiny_model("llama")), "8 train / 4 valid", "ITERS=50", "LR=0.001",
                 "tokens/s", "**Final losses**", "## Diagnosis", "adapter_model.safetensors",
                 "donkeytune convert"):
        assert part in summary, part
