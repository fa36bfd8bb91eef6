"""The best adapter beside the last, early stopping, held-out questions during training, and
the diagnosis rows that read them: on scripted curves and on a tiny model."""

from __future__ import annotations

import itertools
import json

import torch

from conftest import write_jsonl
from donkeytune import config, fuse, report, runinfo, train
from donkeytune.train import adapter
from donkeytune.train.loop import Best, Reporter, loop, metrics_file
from test_train import FACTS, PROBE, base_plus_adapter, chat

CURVE = {0: 3.0, 10: 2.0, 20: 1.5, 30: 1.6, 40: 1.55, 50: 1.7, 60: 1.0}  # validation by iteration


def scripted_run(tmp_path, **kw):
    """The loop on a validation curve that is given: returns the saves and the Best."""
    opts = config.resolve(config.TrainOptions, dict(iters=60, steps_per_eval=10, steps_per_report=10,
                                                    save_every=1000, lr=1e-3, output_dir=str(tmp_path), **kw),
                          environ={})
    done, saves = [0], []

    def step(_batch):
        done[0] += 1
        return 1.0, 10

    def save(it, final=False, best=False):
        saves.append((it, final, best))

    best = loop(step, itertools.repeat(None), lambda: CURVE[done[0]], save, opts,
                Reporter(opts.iters, "cpu", metrics_file(opts)))
    return saves, best, report.read_metrics(metrics_file(opts))


def test_best_is_saved_at_each_lower_validation_loss(tmp_path):
    saves, best, metrics = scripted_run(tmp_path)
    assert saves == [(10, False, True), (20, False, True), (60, False, True), (60, True, False)]
    assert (best.iteration, best.loss, best.stale) == (60, 1.0, 0)
    assert report.best_of(metrics["val_loss"]) == (60, 1.0) and metrics["early_stop"] == []


def test_early_stop_after_n_evaluations_without_improvement(tmp_path):
    saves, best, metrics = scripted_run(tmp_path, early_stop=3)
    # 30, 40, 50 are no lower than 20's 1.5: the run ends at 50, the best stays 20's
    assert saves == [(10, False, True), (20, False, True), (50, True, False)]
    assert (best.iteration, best.loss, best.stale) == (20, 1.5, 3)
    assert metrics["early_stop"] == [(50, 20)] and max(it for it, _ in metrics["val_loss"]) == 50


def test_a_resumed_run_compares_with_the_recorded_best():
    best = Best.of({"best_iteration": 20, "best_val_loss": 1.5, "evals_since_best": 1})
    assert not best.update(30, 1.6) and best.stale == 2
    assert best.update(40, 1.2) and best.record() == {"best_iteration": 40, "best_val_loss": 1.2,
                                                      "evals_since_best": 0}
    assert Best.of({}).record() == {} and not Best().update(0, 0.1)  # iteration 0 is never kept


def curve(values, every=10):
    return [(every * (i + 1), v) for i, v in enumerate(values)]


def kinds(train_losses, val=(), **kw):
    return [f.kind for f in report.diagnose(curve(train_losses), list(val), **kw)]


def test_memorised_poor_results_and_slow_from_what_the_run_measured():
    low = [2.0, 0.8, 0.2, 0.04, 0.01]
    assert kinds(low, questions=[(50, 3, 16), (100, 4, 16)]) == ["memorised"]
    assert "memorised" in kinds(low, [(0, 3.0), (25, 1.2), (50, 1.3)])  # no questions: validation
    assert kinds(low, questions=[(50, 14, 16)]) == ["healthy"]  # near zero, but it answers
    assert kinds([2.0, 1.0, 0.4, 0.3], questions=[(50, 5, 16), (100, 6, 16)]) == ["poor results"]
    assert kinds([2.0, 1.0, 0.4, 0.3], [(0, 3.0), (25, 1.9), (50, 1.8)]) == ["poor results"]
    assert kinds([2.0, 1.0, 0.4, 0.3], [(0, 3.0), (25, 0.9), (50, 0.6)]) == ["healthy"]
    assert kinds([3.0, 2.5, 2.0], questions=[(50, 1, 16)]) == ["under-training"]  # not poor: unfinished
    opts = config.resolve(config.TrainOptions, dict(num_layers=8, batch_size=4), environ={})
    slow = report.diagnose(curve([2.0, 0.5, 0.3]), [(0, 2.0), (30, 0.5)], seconds=3600, opts=opts)
    assert [f.kind for f in slow] == ["slow"]
    assert all(s in slow[0].fix for s in ("NUM_LAYERS=4", "BATCH_SIZE=2", "MAX_SEQ_LENGTH"))
    assert kinds([2.0, 0.5, 0.3], [(0, 2.0), (30, 0.5)], seconds=600) == ["healthy"]


def test_fuse_takes_the_best_unless_use_last(tiny_model, tmp_path):
    """A tiny run with held-out questions: both adapters and the questions' scores are reported;
    fuse takes adapters/best, --use-last the last."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat(q, a) for q, a in FACTS * 3])
    write_jsonl(data / "valid.jsonl", [chat(q, a) for q, a in FACTS])
    write_jsonl(data / "questions.jsonl", [{"question": "Which code word?", "keyword": "Zanzibar"},
                                           {"question": "Who is at the gate?", "keyword": "Pimbleton"}])
    model_dir = tiny_model("llama")
    opts = config.resolve(config.TrainOptions, dict(
        model=str(model_dir), data_dir=str(data), output_dir=str(tmp_path / "out"), iters=8,
        batch_size=4, num_layers=2, lr=3e-3, scale=10.0, steps_per_eval=4, steps_per_report=4,
        save_every=100, dropout=0.0, dtype="float32", eval_questions=True), environ={})
    out = train.run(opts)
    rows = [json.loads(x) for x in metrics_file(opts).read_text().splitlines()]
    assert [(r["iter"], r["questions_total"]) for r in rows if "questions_found" in r] == \
        [(0, 2), (4, 2), (8, 2)]
    best = runinfo.read_run(out / "best")
    assert best["best"] and best["iteration"] == best["best_iteration"] in (4, 8)
    summary = (tmp_path / "out" / "report" / "summary.md").read_text()
    assert "**Best adapter**" in summary and "**Last adapter**" in summary and "held-out" in summary

    # make best and last differ for sure: the best's lora_B doubled
    model = base_plus_adapter(model_dir, out / "best")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(2.0)
    adapter.save_adapter(model, out / "best", best)

    def fused_logits(**flags):
        folder = fuse.run(config.resolve(config.FuseOptions, dict(output_dir=opts.output_dir, **flags),
                                         environ={}))
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(PROBE).logits

    with torch.no_grad():
        want_best = base_plus_adapter(model_dir, out / "best")(PROBE).logits
        want_last = base_plus_adapter(model_dir, out)(PROBE).logits
    assert (want_best - want_last).abs().max() > 1e-3
    assert (fused_logits() - want_best).abs().max() <= 1e-3
    assert (fused_logits(use_last=True) - want_last).abs().max() <= 1e-3
    assert runinfo.read_run(tmp_path / "out" / "fused")["adapter"] == str(out)


def test_a_new_run_drops_an_older_runs_best(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat(q, a) for q, a in FACTS])
    old_best = tmp_path / "out" / "adapters" / "best"
    old_best.mkdir(parents=True)
    (old_best / "adapter_model.safetensors").write_bytes(b"old")
    opts = config.resolve(config.TrainOptions, dict(
        model=str(tiny_model("llama")), data_dir=str(data), output_dir=str(tmp_path / "out"), iters=2,
        batch_size=2, num_layers=1, lr=1e-3, rank=4, scale=2.0, dtype="float32", force=True), environ={})
    train.run(opts)  # no valid.jsonl: no evaluation, no best
    assert not old_best.exists()
    assert config.resolve(config.FuseOptions, dict(output_dir=opts.output_dir), environ={}) \
        .chosen_adapter == opts.adapter_dir
