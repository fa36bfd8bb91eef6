"""The engine-neutral training loop: steps, reporting, validation, checkpoints, Ctrl-C.

An engine (train/torch, train/mlx.py) trains through two functions the stage calls:

    setup(opts, group) -> Setup   where it will run (device, dtype), for the memory check
    run(job: Job) -> Path         train job.opts.iters steps with `loop`, write the adapter

The stage (train/__init__.py) does what both share before and after: the checks, the
tokenized splits, the memory check, the plan, the run record, "Adapter saved", the report.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import device
from ..config import TrainOptions
from ..errors import DonkeyError
from ..files import METRICS_FILE, REPORT_DIR
from ..progress import say


@dataclass
class Setup:
    """Where an engine runs: what the memory check needs, and what the run record adds."""

    device: str
    dtype_bytes: int
    packed: bool = False  # the LM head packed for oneDNN (torch on bf16 CPUs)
    dtype: object = None  # the engine's own dtype object (torch)
    record: dict = field(default_factory=dict)  # extra fields of the run record
    versions: dict = field(default_factory=dict)  # extra library versions of the run record


@dataclass
class Job:
    """What the stage hands an engine: everything resolved and checked."""

    opts: TrainOptions
    folder: Path  # the base model's HF folder
    setup: Setup
    pad_id: int
    train_set: list
    valid_set: list
    meta: dict  # the run record, written with every save
    checkpoint: Path | None = None  # a checkpoint to continue exactly (--resume)
    resume: Path | None = None  # adapter weights to start from (RESUME_FROM)
    group: object = None  # distributed.Group when this is one of several workers
    best: Best = field(default_factory=lambda: Best())  # the lowest validation loss so far
    questions: list = field(default_factory=list)  # held-out questions to ask (--eval-questions)
    tokenizer: object = None  # the HF tokenizer, for asking them


@dataclass
class Best:
    """The evaluation of the lowest validation loss so far, and how many came after it
    (for --early-stop). Its record goes into every saved run record, so a resumed run
    goes on comparing with it."""

    iteration: int | None = None
    loss: float = math.inf
    stale: int = 0  # evaluations since the best

    def update(self, it: int, loss: float) -> bool:
        """Count one evaluation; True when it is a new best (iteration 0, the untrained
        adapter, never is: there is nothing to keep)."""
        if it > 0 and loss < self.loss:
            self.iteration, self.loss, self.stale = it, loss, 0
            return True
        if self.iteration is not None:
            self.stale += 1
        return False

    def record(self) -> dict:
        if self.iteration is None:
            return {}
        return {"best_iteration": self.iteration, "best_val_loss": self.loss,
                "evals_since_best": self.stale}

    @classmethod
    def of(cls, record: dict) -> Best:
        """The Best a saved run record holds (a checkpoint being resumed)."""
        if record.get("best_iteration") is None:
            return cls()
        return cls(record["best_iteration"], record["best_val_loss"], record.get("evals_since_best", 0))


class Diverged(DonkeyError):
    """NaN or inf loss."""


class QuietReporter:
    """What workers other than the first report: nothing."""

    def train(self, *args, **kwargs):
        pass

    valid = tick = questions = stopped = train

    def close(self):
        pass


@dataclass
class Reporter:
    """Report lines, a progress bar and output/report/metrics.jsonl; the loop only calls
    train, valid, tick and close."""

    iters: int
    device: str
    metrics: Path
    start: int = 0
    _bar: object = None

    def __post_init__(self):
        self.metrics.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.start and self.metrics.is_file():  # resumed: keep what led up to the checkpoint
            kept = [line for line in self.metrics.read_text().splitlines()
                    if line and json.loads(line)["iter"] <= self.start]
        self.metrics.write_text("".join(line + "\n" for line in kept))

    def train(self, it, loss, lr, its, tps, seen):
        self._print(f"Iter {it}: Train loss {loss:.3f}, Learning Rate {lr:.3e}, It/sec {its:.3f}, "
                    f"Tokens/sec {tps:.1f}, Trained Tokens {seen}, "
                    f"Peak mem {device.peak_memory_gb(self.device):.3f} GB")
        self._record(iter=it, train_loss=loss, lr=lr, its=its, tokens_per_sec=tps)

    def valid(self, it, loss, seconds, best=False):
        self._print(f"Iter {it}: Val loss {loss:.3f}, Val took {seconds:.3f}s"
                    + (" (best so far, kept in adapters/best)" if best else ""))
        self._record(iter=it, val_loss=loss, **({"best": True} if best else {}))

    def questions(self, it, found, total, seconds):
        self._print(f"Iter {it}: Held-out questions {found}/{total} answered, took {seconds:.1f}s")
        self._record(iter=it, questions_found=found, questions_total=total)

    def stopped(self, it, best_it, evals):
        self._print(f"Iter {it}: no lower validation loss in {evals} evaluations since iteration "
                    f"{best_it}: early stop (EARLY_STOP={evals})")
        self._record(iter=it, early_stop=True, best_iteration=best_it)

    def tick(self, it, loss):
        self._record(iter=it, step_loss=loss)
        if self._bar is None and sys.stderr.isatty():
            from rich.progress import Progress  # noqa: PLC0415

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task("training", total=self.iters, completed=self.start)
        if self._bar is not None:
            self._bar.update(self._task, completed=it)

    def close(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _record(self, **row):
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _print(self, line):
        if self._bar is not None:
            self._bar.console.print(line, highlight=False)
        else:
            print(line, flush=True)


def loop(step, batches, evaluate, save, opts: TrainOptions, report: Reporter, start: int = 0,
         agree=None, best: Best | None = None, ask=None):
    """Run steps start+1..iters: report, validate (start, every N, end) and checkpoint.

    Each validation that beats `best` saves the adapter with save(it, best=True); after
    EARLY_STOP validations without one the run ends there. `ask()` -> (found, total) scores
    the held-out questions at each validation. Ctrl-C or SIGTERM finishes the current step,
    saves a checkpoint and exits (status 130); `agree(flag)` makes that stop a joint
    decision of all workers.
    """
    best = best if best is not None else Best()

    def validate(it) -> bool:  # True: stop early
        t = time.perf_counter()
        loss = evaluate()
        improved = best.update(it, loss)
        report.valid(it, loss, time.perf_counter() - t, best=improved)
        if improved:
            save(it, best=True)
        if ask:
            t = time.perf_counter()
            report.questions(it, *ask(), time.perf_counter() - t)
        return opts.early_stop is not None and best.stale >= opts.early_stop

    if evaluate and start == 0:
        validate(0)
    losses, tokens, seen, t0 = [], 0, 0, time.perf_counter()
    last = opts.iters
    with stop_signals() as stop:
        for it in range(start + 1, opts.iters + 1):
            loss, ntok = step(next(batches))
            losses.append(loss)
            tokens += ntok
            seen += ntok
            report.tick(it, loss)
            if it % opts.steps_per_report == 0 or it == opts.iters:
                dt = time.perf_counter() - t0
                report.train(it, sum(losses) / len(losses), opts.lr, len(losses) / dt, tokens / dt, seen)
                device.trim_memory()
                losses, tokens, t0 = [], 0, time.perf_counter()
            if evaluate and (it % opts.steps_per_eval == 0 or it == opts.iters):
                t = time.perf_counter()
                early = validate(it)
                t0 += time.perf_counter() - t  # validation time is not training speed
                if early and it != opts.iters:
                    report.stopped(it, best.iteration, opts.early_stop)
                    last = it
                    break
            if (stop.requested if agree is None else agree(stop.requested)) and it != opts.iters:
                report.close()
                save(it)
                say(f"\nStopped at iteration {it} of {opts.iters}; checkpoint saved in "
                    f"{opts.adapter_dir}/checkpoints/{it:07d}.\n"
                    "Continue exactly where it stopped with: donkeytune train --resume "
                    f"--output-dir {opts.output_dir}   (or: make train RESUME=1)")
                raise SystemExit(130)
            if it % opts.save_every == 0 and it != opts.iters:
                save(it)
    report.close()
    save(last, final=True)
    return best


class _Stop:
    requested = False


@contextmanager
def stop_signals():
    """Turn the first Ctrl-C / SIGTERM into a request to stop after the current step.

    A second Ctrl-C interrupts at once (the last checkpoint stays).
    """
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True
        say(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to abort)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_finite(value: float, opts: TrainOptions) -> None:
    """Stop before the update when the loss is NaN or inf: the saved adapter stays good."""
    if not math.isfinite(value):
        raise Diverged(f"the loss became {value}; training stopped, the last checkpoint "
                       f"in {opts.adapter_dir} is kept",
                       f"lower LR (now {opts.lr:g}; try {opts.lr / 4:g}) and resume or restart")


def metrics_file(opts: TrainOptions) -> Path:
    return Path(opts.output_dir) / REPORT_DIR / METRICS_FILE
