"""The run report in output/report/, and the diagnosis of a run.

The report: metrics.jsonl (written line by line by train.Reporter), loss.png, summary.md, and
the diagnosis of the seed's table (overfitting, under-training, unstable, memorised, poor results,
slow) printed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .files import BEST_DIR, METRICS_FILE, REPORT_DIR, atomic, write_atomic
from .progress import say, warn

UNDERTRAINED = 0.5  # the seed's table: train loss still above this at the end = under-trained
RISE = 1.03  # validation counts as rising once 3 % above its lowest point
JUMP = 1.10  # a report-to-report rise of 10 % in train loss is a jump
NEAR_ZERO = 0.05  # train loss below this: the examples are known by heart
POOR_ANSWERS = 0.5  # under half of the held-out questions answered: poor
POOR_VAL = 1.5  # without questions: a lowest validation loss above this is poor (above 0.5 after
# a train loss near zero: memorised); on examples/facts a run that answers 13/16 ends near 0.4
SLOW_SECONDS = 30 * 60  # a run longer than this is slow enough to say how to shorten it


# ---------------------------------------------------------------- metrics and diagnosis

def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train_loss": [(iter, loss)], "val_loss": [...], "step_loss": [...]} of metrics.jsonl."""
    out: dict[str, list] = {"train_loss": [], "val_loss": [], "step_loss": [], "tokens_per_sec": [],
                            "questions": [], "early_stop": []}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            for key in out:
                if key in row and key not in ("questions", "early_stop"):
                    out[key].append((row["iter"], row[key]))
            if "questions_found" in row:  # (iter, found, total)
                out["questions"].append((row["iter"], row["questions_found"], row["questions_total"]))
            if row.get("early_stop"):
                out["early_stop"].append((row["iter"], row["best_iteration"]))
    return out


def best_of(valid: list[tuple[int, float]]) -> tuple[int, float] | None:
    """The evaluation training kept in adapters/best: the lowest validation loss after
    iteration 0 (the first of equals)."""
    trained = [(it, loss) for it, loss in valid if it > 0]
    return min(trained, key=lambda p: p[1]) if trained else None


@dataclass
class Finding:
    kind: str  # overfitting, under-training, unstable, memorised, poor results, slow, healthy
    message: str
    fix: str = ""


def rising_from(valid: list[tuple[int, float]]) -> int | None:
    """The iteration after which the validation loss rises (its lowest point), if it does."""
    if len(valid) < 3:
        return None
    best = min(range(len(valid)), key=lambda i: valid[i][1])
    if best < len(valid) - 1 and valid[-1][1] > valid[best][1] * RISE:
        return valid[best][0]
    return None


def diagnose(train: list[tuple[int, float]], valid: list[tuple[int, float]], lr: float | None = None,
             iters: int | None = None, *, questions=(), seconds: float | None = None,
             opts=None) -> list[Finding]:
    """The seed's table: overfitting, under-training, unstable, memorised, poor results, slow;
    or healthy. `questions`: (iter, found, total) of --eval-questions; `seconds`: the run's
    duration; `opts`: the run's options, for the fixes that name them."""
    found = []
    turn = rising_from(valid)
    if turn is not None and train:
        before = [loss for it, loss in train if it <= turn] or [train[0][1]]
        if train[-1][1] < before[-1]:
            low = dict(valid)[turn]
            found.append(Finding(
                "overfitting", f"validation loss rose from {low:.3f} (iter {turn}) to {valid[-1][1]:.3f} "
                f"while train loss fell to {train[-1][1]:.3f}",
                f"the adapter of iter {turn} is kept in adapters/best (fuse and convert use it); "
                f"next time ITERS={turn} or EARLY_STOP=2; or lower LR, or add more data"))
    if train and train[-1][1] > UNDERTRAINED:
        more = f"ITERS={iters * 2}" if iters else "a higher ITERS"
        found.append(Finding(
            "under-training", f"train loss is still {train[-1][1]:.3f} (> {UNDERTRAINED}) at the end",
            f"train longer ({more}) or raise LR" + (f" (LR={lr * 2:g})" if lr else "")))
    losses = [loss for _, loss in train[1:]]
    jumps = sum(b > a * JUMP for a, b in zip(losses, losses[1:]))
    diverged = len(train) >= 3 and train[-1][1] > train[0][1] * 1.05
    if (jumps >= 3 and jumps >= 0.25 * (len(losses) - 1)) or diverged:
        what = "rose above where it started" if diverged else f"jumped up {jumps} times"
        found.append(Finding(
            "unstable", f"train loss {what} (oscillating)",
            "lower LR" + (f" (LR={lr / 2:g})" if lr else "") + ", or raise BATCH_SIZE"))
    found += _held_out_findings(train, valid, list(questions), found)
    if seconds is not None and seconds > SLOW_SECONDS:
        found.append(_slow(seconds, opts))
    if not found:
        found.append(Finding("healthy", "train and validation loss fell together", "no change needed"))
    return found


def _held_out_findings(train, valid, questions, found) -> list[Finding]:
    """Memorised (train loss near zero, held-out answers poor) and poor results overall (the
    training data fitted, the held-out answers still poor), from the held-out questions when
    the run asked them, else from the validation loss."""
    if not train or any(f.kind == "under-training" for f in found):
        return []
    end = train[-1][1]
    if questions:
        last, top = questions[-1], max(questions, key=lambda q: q[1])
        poor_end = last[1] < POOR_ANSWERS * last[2]
        poor_best = top[1] < POOR_ANSWERS * top[2]
        at_end = f"{last[1]}/{last[2]} held-out questions answered at iter {last[0]}"
        at_best = f"at best {top[1]}/{top[2]} held-out questions answered (iter {top[0]})"
    elif valid:
        low = best_of(valid) or valid[-1]
        poor_end = valid[-1][1] > 10 * NEAR_ZERO
        poor_best = low[1] > POOR_VAL
        at_end = f"validation loss {valid[-1][1]:.3f} at iter {valid[-1][0]}"
        at_best = f"the lowest validation loss is {low[1]:.3f} (iter {low[0]})"
    else:
        return []
    if end < NEAR_ZERO and poor_end:
        return [Finding("memorised", f"train loss is {end:.3f}, near zero, while {at_end}: the "
                        "examples are known by heart, not what they say",
                        "fewer iterations (ITERS), or more varied data (each fact or skill in "
                        "several phrasings)")]
    if poor_best:
        return [Finding("poor results", f"train loss fell to {end:.3f}, but {at_best}",
                        "more data (more examples, more varied), or a bigger model "
                        "(`donkeytune models` lists those that fit here)")]
    return []


def _slow(seconds: float, opts) -> Finding:
    fix = "fewer layers (NUM_LAYERS), a smaller batch (BATCH_SIZE) or a shorter MAX_SEQ_LENGTH"
    if opts is not None and getattr(opts, "num_layers", None):
        fix = (f"fewer layers (NUM_LAYERS={max(opts.num_layers // 2, 1)}; now {opts.num_layers}), a "
               f"smaller batch (BATCH_SIZE={max(opts.batch_size // 2, 1)}; now {opts.batch_size}) or a "
               f"shorter MAX_SEQ_LENGTH (now {opts.max_seq_length}; `donkeytune data stats` shows "
               "the lengths)")
    return Finding("slow", f"the run took {_duration(seconds)} (over {SLOW_SECONDS // 60} min)", fix)


# ---------------------------------------------------------------- files

def plot_loss(metrics: dict, png: Path, title: str = "") -> Path:
    """Train and validation loss against iteration, marked where validation starts rising."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if metrics["step_loss"]:
        xs, ys = zip(*metrics["step_loss"])
        ax.plot(xs, ys, color="tab:blue", alpha=0.2, linewidth=0.8, label="train (each step)")
    if metrics["train_loss"]:
        xs, ys = zip(*metrics["train_loss"])
        ax.plot(xs, ys, color="tab:blue", linewidth=2, label="train (report average)")
    if metrics["val_loss"]:
        xs, ys = zip(*metrics["val_loss"])
        ax.plot(xs, ys, "o-", color="tab:orange", linewidth=2, label="validation")
    best = best_of(metrics["val_loss"])
    if best is not None:
        ax.plot(*best, "*", color="tab:green", markersize=14, label=f"best (iter {best[0]}, adapters/best)")
    turn = rising_from(metrics["val_loss"])
    if turn is not None:
        ax.axvline(turn, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(f"validation rises after iter {turn}", (turn, ax.get_ylim()[1]),
                    xytext=(4, -14), textcoords="offset points", color="tab:red", fontsize=9)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png


def summary_markdown(opts, meta: dict, metrics: dict, findings: list[Finding], seconds: float | None,
                     files: list[Path]) -> str:
    tps = [v for _, v in metrics["tokens_per_sec"]]
    last_train = metrics["train_loss"][-1][1] if metrics["train_loss"] else None
    last_val = metrics["val_loss"][-1][1] if metrics["val_loss"] else None
    fmt = (lambda x: "-" if x is None else f"{x:.3f}")
    settings = ", ".join(f"{k.upper()}={getattr(opts, k):g}" if isinstance(getattr(opts, k), float)
                         else f"{k.upper()}={getattr(opts, k)}"
                         for k in ("iters", "batch_size", "num_layers", "lr", "rank", "scale",
                                   "dropout", "max_seq_length", "seed"))
    lines = [
        "# DonkeyTune run report", "",
        f"- **Model**: {meta.get('base_model')} (`{meta.get('base_model_path')}`)",
        f"- **Data**: `{meta.get('data_dir')}`: {meta.get('train_examples')} train / "
        f"{meta.get('valid_examples')} valid examples (fingerprint {meta.get('data_fingerprint')})",
        f"- **Recipe**: {opts.recipe or '-'}; {settings}",
        f"- **Duration**: {_duration(seconds)}; **tokens/s**: "
        + (f"{sum(tps) / len(tps):.1f} average" if tps else "-"),
        f"- **Final losses**: train {fmt(last_train)}, validation {fmt(last_val)}"
        + (f" (lowest {min(v for _, v in metrics['val_loss']):.3f})" if metrics["val_loss"] else ""),
        *_adapter_lines(opts, metrics),
        "", "## Diagnosis", "",
        *[f"- **{f.kind}**: {f.message}" + (f". Suggested: {f.fix}." if f.fix else "") for f in findings],
        "", "## Files", "",
        *[f"- `{p}`" for p in files],
        "", "## How to use them", "",
        "```sh",
        f"donkeytune convert --output-dir {opts.output_dir}     # fuse + GGUF + quantize -> "
        f"{opts.output_dir}/gguf/",
        f"donkeytune test --output-dir {opts.output_dir}        # base vs fine-tuned answers",
        f"donkeytune chat --output-dir {opts.output_dir}        # chat with the GGUF",
        f"donkeytune export-adapter {opts.adapter_dir}  # the adapter alone, for llama.cpp --lora / Ollama ADAPTER",
        "```", "",
        "In Python: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
        f"\"{opts.adapter_dir}\")`.", ""]
    return "\n".join(lines)


def _adapter_lines(opts, metrics: dict) -> list[str]:
    """Which adapter is the best, which the last, which of them fuse and convert take."""
    valid = metrics["val_loss"]
    last_it = max((it for key in ("train_loss", "val_loss") for it, _ in metrics[key]), default=None)
    asked = {it: (n, total) for it, n, total in metrics["questions"]}

    def answered(it):
        return f", {asked[it][0]}/{asked[it][1]} held-out questions" if it in asked else ""

    lines = []
    if metrics["early_stop"]:
        it, best_it = metrics["early_stop"][-1]
        lines.append(f"- **Early stop**: at iter {it}, {opts.early_stop} evaluations after the "
                     f"lowest validation loss (iter {best_it})")
    best = best_of(valid)
    last_val = dict(valid).get(last_it)
    last = f"iter {last_it}" + (f", validation {last_val:.3f}" if last_val is not None else "") \
        + answered(last_it)
    if best is None:
        return lines + [f"- **Adapter**: the last (`{opts.adapter_dir}/`, {last}); no validation "
                        "to choose a best by"]
    lines += [f"- **Best adapter** (used by fuse and convert): `{opts.adapter_dir}/best/`, iter "
              f"{best[0]}, validation {best[1]:.3f}{answered(best[0])}",
              f"- **Last adapter** (`--use-last`): `{opts.adapter_dir}/`, {last}"]
    if asked:
        top = max(metrics["questions"], key=lambda q: q[1])
        lines.append("- **Held-out questions** (greedy, at each evaluation): "
                     + ", ".join(f"{n}/{t} at {it}" for it, n, t in metrics["questions"])
                     + f"; most at iter {top[0]}")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def finish(opts, meta: dict) -> list[Finding]:
    """End of training: loss.png, summary.md, the diagnosis printed, trackers fed."""
    folder = Path(opts.output_dir) / REPORT_DIR
    metrics = read_metrics(folder / METRICS_FILE)
    seconds = _since(meta.get("created"))
    findings = diagnose(metrics["train_loss"], metrics["val_loss"], opts.lr, opts.iters,
                        questions=metrics["questions"], seconds=seconds, opts=opts)
    files = sorted(p for p in Path(opts.adapter_dir).iterdir() if p.is_file())
    best_dir = Path(opts.adapter_dir) / BEST_DIR
    files += sorted(p for p in best_dir.iterdir() if p.is_file()) if best_dir.is_dir() else []
    written = [folder / METRICS_FILE]
    try:
        written.append(plot_loss(metrics, folder / "loss.png", f"{meta.get('base_model')}: "
                                 f"{opts.data_dir}"))
    except ImportError:
        warn("no loss.png: matplotlib is not installed (pip install matplotlib)")
    summary = folder / "summary.md"
    written.append(summary)
    text = summary_markdown(opts, meta, metrics, findings, seconds, files + written)
    write_atomic(summary, text)
    say("Diagnosis: " + "; ".join(f"{f.kind}: {f.message}" + (f" -> {f.fix}" if f.fix else "")
                                  for f in findings))
    say(f"Report: {folder}/ (summary.md, loss.png, metrics.jsonl)")
    if getattr(opts, "report_to", None):
        log_trackers(opts.report_to, folder, opts)
    return findings


def _since(created: str | None) -> float | None:
    try:
        return time.time() - datetime.strptime(created, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- trackers

def log_trackers(kind: str, folder: Path, opts) -> None:
    """Send metrics.jsonl to TensorBoard or Weights & Biases, through their own packages."""
    rows = [json.loads(x) for x in (folder / METRICS_FILE).read_text().splitlines() if x.strip()]
    names = {"train_loss": "train/loss", "val_loss": "val/loss", "step_loss": "train/step_loss",
             "lr": "train/lr", "tokens_per_sec": "train/tokens_per_sec"}
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        writer = SummaryWriter(str(folder / "tensorboard"))
        for row in rows:
            for key, tag in names.items():
                if key in row:
                    writer.add_scalar(tag, row[key], row["iter"])
        writer.close()
        say(f"TensorBoard: tensorboard --logdir {folder / 'tensorboard'}")
    elif kind == "wandb":
        import wandb  # noqa: PLC0415

        wb = wandb.init(project="donkeytune", config=dataclasses.asdict(opts))
        for row in rows:
            wb.log({tag: row[key] for key, tag in names.items() if key in row}, step=row["iter"])
        wb.finish()
