"""The training stage: LoRA on the last NUM_LAYERS blocks, loss on assistant tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import data, device, distributed, engines, memory, models, recipe, report, runinfo
from .config import TrainOptions
from .errors import ConfigError, DonkeyError, ModelError
from .progress import say, warn

ADAPTER_FILE = "adapter_model.safetensors"
SEED_ADAPTER_FILE = "adapters.safetensors"  # the name the seed's RESUME_FROM paths use


def run(opts: TrainOptions) -> Path:
    """Train a LoRA adapter; returns the adapter folder (output/adapters)."""
    device.bound_kernel_caches()  # before the first matmul (the CLI has done it already)
    opts = dataclasses.replace(opts, model=opts.model or models.DEFAULT_MODEL)
    checkpoint = None
    if not opts.resume and _continue_interrupted(opts):
        opts = dataclasses.replace(opts, resume=True)
    if opts.resume:
        checkpoint = latest_checkpoint(opts.adapter_dir)
        opts = _recorded_options(checkpoint, opts)  # its DATA_DIR, ITERS, LR, ...
    dataset = data.load_dir(opts.data_dir)  # bad data stops here, before any model loads
    if len(dataset.train) < opts.devices:
        raise ConfigError(f"{len(dataset.train)} training examples for DEVICES={opts.devices}: some "
                          "workers would get none", f"use DEVICES={max(len(dataset.train), 1)} or fewer")
    resume = _resume_source(opts)
    _check_output_dir(opts, resume or checkpoint)
    opts = dataclasses.replace(opts, engine=engines.pick(opts.engine, checkpoint))  # torch or mlx
    group = distributed.worker()  # None unless this process is one of several torchrun workers
    if opts.devices > 1 and group is None:
        status = distributed.launch(opts)
        if status:
            raise DonkeyError(f"the {opts.devices} training workers stopped with status {status}")
        return opts.adapter_dir
    folder = models.resolve(opts.model, trust_remote_code=opts.trust_remote_code,
                            allow_pickle=opts.allow_pickle)
    opts = recipe.resolve(opts, folder, len(dataset.train))  # unset ITERS, LR, ...: from the recipe
    if resume:
        _check_resume_matches(resume, folder, opts)
    if opts.engine == "mlx":  # imports mlx; it writes the same adapter, so later stages are shared
        from .engines import mlx_engine  # noqa: PLC0415

        return mlx_engine.run(opts, folder, dataset, checkpoint=checkpoint, resume=resume)

    import torch  # noqa: PLC0415

    from . import loralinear  # noqa: PLC0415

    device.set_threads(group.world if group else 1)
    dev = device.pick_device(opts.device)
    dtype = device.pick_dtype(opts.dtype, dev)
    if group and dev == "cuda":
        dev = f"cuda:{group.local_rank}"
    tok = device.load_tokenizer(folder, trust_remote_code=opts.trust_remote_code)
    train_set = data.tokenize_all(tok, dataset.train, opts.max_seq_length, opts.train_on_prompt, "train")
    valid_set = data.tokenize_all(tok, dataset.valid, opts.max_seq_length, opts.train_on_prompt, "valid")
    opts = memory.check_training(opts, folder, train_set, dev, dtype.itemsize,  # said before loading
                                 auto=opts.recipe == "auto" and not checkpoint,
                                 packed=loralinear.can_pack(dtype, dev))
    _print_plan(opts, train_set, valid_set)

    torch.manual_seed(opts.seed)
    base = device.load_model(folder, "cpu" if opts.fsdp else dev, dtype,
                             trust_remote_code=opts.trust_remote_code)
    model = add_lora(base, opts)
    if resume:
        load_adapter_weights(model, resume)
    if opts.fsdp:
        held, total = distributed.shard_frozen_blocks(model, dev)
        say(f"FSDP: each worker holds {held / 2**20:.1f} MB of the {total / 2**20:.1f} MB of frozen "
            f"block weights")
    if group is None or group.main:
        model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, opts.lr, dev)
    cache = None if opts.fsdp else prefix_cache(model)  # FSDP: blocks run in lockstep on all workers
    shard = (group.rank, group.world) if group else (0, 1)  # this worker's share of every batch
    start = restore_checkpoint(checkpoint, model, optimizer, shard[1]) if checkpoint else 0

    meta = runinfo.run_record(
        "train", opts, base_model=opts.model, base_model_path=str(folder),
        base_fingerprint=runinfo.model_fingerprint(folder), data_dir=str(opts.data_dir),
        data_fingerprint=dataset.fingerprint, system_prompt=dataset.system_prompt,
        resumed_from=str(resume) if resume else None, lora_alpha=opts.lora_alpha,
        train_examples=len(train_set), valid_examples=len(valid_set))
    pad = tok.pad_token_id
    batches = data.batches(train_set, opts.batch_size, opts.seed, pad, start_step=start, shard=shard)

    def finite(value):  # stop before the update: the saved adapter stays good
        if not math.isfinite(value):
            raise Diverged(f"the loss became {value}; training stopped, the last checkpoint "
                           f"in {opts.adapter_dir} is kept",
                           f"lower LR (now {opts.lr:g}; try {opts.lr / 4:g}) and resume or restart")

    def step(batch):
        return lora_step(model, batch, optimizer, params, dev, cache, group, finite)

    def evaluate():
        return evaluate_loss(model, valid_set, opts.batch_size, opts.val_batches, pad, dev, cache,
                             shard, group.sum if group else None)

    def save(it: int, final: bool = False):
        if group is None or group.main:  # one set of files
            save_adapter(model, opts.adapter_dir, dict(meta, iteration=it, complete=final),
                         checkpoint=None if final else it,
                         state=None if final else trainer_state(it, optimizer, shard[1]))
            prune_checkpoints(opts.adapter_dir, opts.keep)
        if group:
            group.barrier()

    reporter = Reporter(opts.iters, dev, metrics_file(opts), start) if not group or group.main \
        else QuietReporter()
    agree = (lambda flag: group.sum([float(flag)])[0] > 0) if group else None
    with contextlib.nullcontext() if opts.fsdp else loralinear.packed(model):  # FSDP owns the weights
        if cache and start:  # with the weights as the interrupted run had them
            refill_prefix_cache(cache, model, train_set, opts, pad, dev, start, shard)
        loop(step, batches, evaluate if valid_set else None, save, opts, reporter, start, agree)
    if group and not group.main:
        return opts.adapter_dir
    say(f"Adapter saved to {opts.adapter_dir}/ ({ADAPTER_FILE}, {SEED_ADAPTER_FILE})")
    report.finish(opts, meta)  # loss.png, summary.md, the diagnosis, trackers
    return opts.adapter_dir


class Diverged(DonkeyError):
    """NaN or inf loss."""


class QuietReporter:
    """What workers other than the first report: nothing."""

    def train(self, *args):
        pass

    valid = tick = train

    def close(self):
        pass


# ---------------------------------------------------------------- the loop

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

    def valid(self, it, loss, seconds):
        self._print(f"Iter {it}: Val loss {loss:.3f}, Val took {seconds:.3f}s")
        self._record(iter=it, val_loss=loss)

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
         agree=None):
    """Run steps start+1..iters: report, validate (start, every N, end) and checkpoint.

    Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits (status 130).
    `agree(flag)` makes that stop a joint decision of all workers.
    """
    if evaluate and start == 0:
        t = time.perf_counter()
        report.valid(0, evaluate(), time.perf_counter() - t)
    losses, tokens, seen, t0 = [], 0, 0, time.perf_counter()
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
                report.valid(it, evaluate(), time.perf_counter() - t)
                t0 += time.perf_counter() - t  # validation time is not training speed
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
    save(opts.iters, final=True)


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


# ---------------------------------------------------------------- checkpoints

STATE_FILE = "trainer_state.pt"


def trainer_state(it: int, optimizer, workers: int = 1) -> dict:
    """Everything besides the adapter that makes a resumed run continue exactly."""
    import torch  # noqa: PLC0415

    state = {"iteration": it, "optimizer": optimizer.state_dict(), "workers": workers,
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_checkpoint(folder: Path, model, optimizer, workers: int = 1) -> int:
    import torch  # noqa: PLC0415

    state = torch.load(folder / STATE_FILE, weights_only=False)  # our own file, written above
    if state.get("workers", 1) != workers:
        raise ConfigError(f"{folder} was written by a run on {state.get('workers', 1)} device(s); "
                          f"this one has {workers}: the batches would be cut differently",
                          f"resume with DEVICES={state.get('workers', 1)}")
    load_adapter_weights(model, folder / ADAPTER_FILE)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    say(f"Resuming at iteration {state['iteration']} from {folder}")
    return state["iteration"]


def checkpoints(adapter_dir: Path) -> list[Path]:
    folder = Path(adapter_dir) / "checkpoints"
    states = (STATE_FILE, engines.MLX_STATE_FILE)  # torch's or the MLX engine's optimizer state
    found = [p for p in folder.glob("[0-9]*") if any((p / s).is_file() for s in states)] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(adapter_dir: Path) -> Path:
    found = checkpoints(adapter_dir)
    if not found:
        raise ConfigError(f"--resume: no checkpoint to resume in {adapter_dir}/checkpoints",
                          "start a new run without --resume, or point --output-dir at the "
                          "interrupted run's folder")
    return found[-1]


def prune_checkpoints(adapter_dir: Path, keep: int) -> None:
    if keep > 0:
        for old in checkpoints(adapter_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _recorded_options(checkpoint: Path, given: TrainOptions) -> TrainOptions:
    """A resumed run continues with the options it was started with, in the folder it is in
    now (a run folder may have been moved or copied)."""
    recorded = runinfo.read_run(checkpoint)["options"]
    keep = {"resume": True, "force": given.force, "output_dir": given.output_dir}
    if given.engine != "auto":  # asked for: engines.pick refuses it if another engine wrote the run
        keep["engine"] = given.engine
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in recorded.items() if k in names} | keep)


def metrics_file(opts: TrainOptions) -> Path:
    return Path(opts.output_dir) / "report" / "metrics.jsonl"


# ---------------------------------------------------------------- model pieces

def add_lora(model, opts: TrainOptions):
    """Wrap `model` in PEFT LoRA on every linear layer of the last NUM_LAYERS blocks; its
    packed rows attend per example (attention.py), its LoRA layers run as one autograd step
    (loralinear.py) with a dropout that draws only the dropped positions (dropout.py), and
    their RMSNorms as one autograd step each (blockops.py)."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    from . import attention, blockops, dropout, loralinear  # noqa: PLC0415

    opts = recipe.seed_filled(opts)  # called without run() (Python users, tests): the seed's values
    n_blocks = model.config.get_text_config().num_hidden_layers
    n = n_blocks if opts.num_layers == -1 else opts.num_layers
    if n > n_blocks:
        raise ConfigError(f"NUM_LAYERS={opts.num_layers} but the model has only {n_blocks} blocks",
                          f"use NUM_LAYERS={n_blocks} or -1 (all)")
    config = LoraConfig(r=opts.rank, lora_alpha=opts.lora_alpha, lora_dropout=opts.dropout,
                        target_modules=block_linear_names(model),
                        layers_to_transform=list(range(n_blocks - n, n_blocks)),
                        task_type="CAUSAL_LM")
    attention.enable(model)
    model = get_peft_model(model, config)
    dropout.replace_lora_dropout(model)
    loralinear.use_fused_lora(model)
    blockops.use_fused_norms(model)
    # Under autocast the LoRA matmuls take bf16 inputs as they are; PEFT would copy them to fp32.
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    return model


def adamw(params, lr: float, dev):
    """The optimizer of the LoRA weights: AdamW without weight decay, fused on CPU and CUDA."""
    import torch  # noqa: PLC0415

    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=torch.device(dev).type in ("cpu", "cuda"))


def prefix_cache(model):
    """Reuse of the frozen blocks' outputs across epochs; None when every block trains."""
    from .prefixcache import PrefixCache  # noqa: PLC0415

    decoder = model.get_base_model().get_decoder()
    first = next(i for i, layer in enumerate(decoder.layers)
                 if any(p.requires_grad for p in layer.parameters()))
    return PrefixCache(decoder, first) if first > 0 else None


def refill_prefix_cache(cache, model, train_set, opts: TrainOptions, pad_id: int, dev, start: int,
                        shard=(0, 1)):
    """Recompute the kept frozen-block outputs as the interrupted run computed them: with
    the batches of its first epoch, in order."""
    import torch  # noqa: PLC0415

    causal = model.get_base_model()
    steps = min(start, max(len(train_set) // opts.batch_size, 1))
    first_epoch = data.batches(train_set, opts.batch_size, opts.seed, pad_id, shard=shard)
    with torch.no_grad(), _compute_dtype(causal, dev):
        for _ in range(steps):
            batch = next(first_epoch)
            ids = torch.tensor(batch.input_ids, device=dev)
            pos = torch.tensor(batch.position_ids, device=dev)
            cache.fill(batch.segments, ids.shape, lambda: causal.get_decoder()(
                input_ids=ids, position_ids=pos, use_cache=False))


def block_linear_names(model) -> list[str]:
    """Names of the nn.Linear layers inside the transformer blocks (q_proj, ..., down_proj)."""
    import torch  # noqa: PLC0415

    layers = model.get_decoder().layers
    return sorted({name.rsplit(".", 1)[-1] for name, mod in layers[0].named_modules()
                   if isinstance(mod, torch.nn.Linear)})


def batch_loss(model, batch: data.Batch, dev, cache=None):
    """Summed cross-entropy over the labelled tokens of a packed batch, and their count.

    The blocks run in the base model's dtype (bf16 where the hardware has it) under
    autocast, so the fp32 LoRA weights meet bf16 activations without copying them to
    fp32. The LM head runs only on labelled positions, through a chunked loss that never
    keeps the vocabulary-wide logits.
    """
    import torch  # noqa: PLC0415

    from . import loralinear  # noqa: PLC0415
    from .headloss import head_loss  # noqa: PLC0415

    ids, pos, labels = (torch.tensor(x, device=dev) for x in
                        (batch.input_ids, batch.position_ids, batch.labels))
    causal = model.get_base_model()
    replay = cache.batch(batch.segments, ids.shape) if cache else contextlib.nullcontext()
    with _compute_dtype(causal, dev), replay:
        hidden = causal.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != data.IGNORE
    cap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)
    head = causal.get_output_embeddings()
    loss = head_loss(hidden[:, :-1][keep], head.weight, targets[keep], cap,
                     getattr(head, loralinear.PACKED, None))
    return loss, int(keep.sum())


def lora_step(model, batch: data.Batch, optimizer, params, dev, cache=None, group=None,
              check=None) -> tuple[float, int]:
    """One optimizer step on a batch: the mean loss over the labelled tokens (of every
    worker's share, with `group`) and the batch's non-pad tokens. `check(loss)` runs before
    the update and may stop it by raising."""
    if not model.training:  # train() walks ~1,000 modules: 1.5 ms a step on SmolLM2
        model.train()
    loss, ntok = batch_loss(model, batch, dev, cache)
    total, ntok, tokens = [loss.item(), ntok, batch.tokens]
    if group:  # the step's loss is the mean over every worker's labelled tokens
        total, ntok, tokens = group.sum([total, ntok, tokens])
    value = total / ntok
    if check:
        check(value)
    (loss / ntok).backward()
    if group:
        group.sum_grads(params)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value, int(tokens)  # tokens/sec counts every non-pad token


def _compute_dtype(causal, dev):
    """Autocast to the base model's dtype when it is not float32 (fp32 LoRA weights, bf16 blocks)."""
    import torch  # noqa: PLC0415

    low = causal.dtype if causal.dtype != torch.float32 else None
    return torch.autocast(torch.device(dev).type, dtype=low, enabled=low is not None)


def evaluate_loss(model, items, batch_size, max_batches, pad_id, dev, cache=None,
                  shard=(0, 1), reduce=None) -> float:
    """Mean loss over the labelled tokens of the validation batches (each worker takes its
    share of every batch; `reduce` sums over the workers)."""
    import torch  # noqa: PLC0415

    model.eval()
    rank, world = shard
    total, count = 0.0, 0
    with torch.no_grad():
        for b, start in enumerate(range(0, len(items), batch_size)):
            if max_batches != -1 and b >= max_batches:
                break
            mine, weight = items[start:start + batch_size][rank::world], 1
            if not mine and reduce:  # every worker runs every batch (FSDP gathers weights together)
                mine, weight = items[start:start + 1], 0
            if mine:
                loss, ntok = batch_loss(model, data.collate(mine, pad_id), dev, cache)
                total += loss.item() * weight
                count += ntok * weight
    if reduce:
        total, count = reduce([total, count])
    return total / max(count, 1)


def save_adapter(model, adapter_dir: Path, meta: dict, checkpoint: int | None = None,
                 state: dict | None = None):
    """Write the PEFT adapter (+ the seed's adapters.safetensors) and the run metadata.

    Written into a temporary folder and moved into place, so an interrupted save never
    leaves a half-written adapter.
    """
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tmp = adapter_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copyfile(tmp / ADAPTER_FILE, tmp / SEED_ADAPTER_FILE)
    runinfo.write_json(tmp / runinfo.RUN_FILE, meta)
    if state is not None:
        import torch  # noqa: PLC0415

        torch.save(state, tmp / STATE_FILE)
    targets = [adapter_dir]
    if checkpoint is not None:
        targets.append(adapter_dir / "checkpoints" / f"{checkpoint:07d}")
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            if f.name == STATE_FILE and target == adapter_dir:
                continue  # optimizer state lives in the checkpoints only
            shutil.copyfile(f, target / f".{f.name}.partial")
            (target / f".{f.name}.partial").replace(target / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def load_adapter_weights(model, source: Path) -> None:
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    state = load_file(source)
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ModelError(f"{source} does not fit this model's LoRA layers "
                         f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected tensors)",
                         "resume with the NUM_LAYERS and RANK the adapter was trained with")
    say(f"Resuming from the adapter weights in {source}")


# ---------------------------------------------------------------- checks before loading

def _resume_source(opts: TrainOptions) -> Path | None:
    if not opts.resume_from:
        return None
    path = Path(opts.resume_from)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise ConfigError(f"RESUME_FROM={opts.resume_from}: no adapter file there",
                          f"point it at a trained adapter, e.g. output/adapters/{SEED_ADAPTER_FILE}")
    return path


def _check_resume_matches(source: Path, folder: Path, opts: TrainOptions) -> None:
    """An adapter resumes only on its own base model, with its own rank."""
    run_file = source.parent / runinfo.RUN_FILE
    config_file = source.parent / "adapter_config.json"
    if run_file.is_file():
        run = runinfo.read_run(source.parent)
        if run["base_fingerprint"] != runinfo.model_fingerprint(folder):
            raise ModelError(
                f"RESUME_FROM adapter was trained on {run['base_model']!r}, "
                f"but MODEL is {opts.model!r}",
                f"set MODEL={run['base_model']} (or leave it unset), or train from scratch")
    if config_file.is_file():
        rank = json.loads(config_file.read_text()).get("r")
        if rank is not None and rank != opts.rank:
            raise ConfigError(f"RESUME_FROM adapter has rank {rank}, but RANK={opts.rank}",
                              f"set RANK={rank} to continue it")


def _check_output_dir(opts: TrainOptions, resume: Path | None) -> None:
    """Never overwrite the adapter of another model by accident (the seed's clean-output trap)."""
    run_file = opts.adapter_dir / runinfo.RUN_FILE
    if opts.force or not run_file.is_file():
        return
    run = runinfo.read_run(opts.adapter_dir)
    if run.get("base_model") != opts.model and not resume:
        raise ConfigError(
            f"{opts.adapter_dir} holds an adapter trained on {run.get('base_model')!r}; "
            f"training {opts.model!r} would overwrite it",
            "pass --force (FORCE=1), pick another --output-dir, or `make clean-output`")


def _continue_interrupted(opts: TrainOptions) -> bool:
    """An interrupted run sits in the output folder: continue it, or say how to decide."""
    run_file = opts.adapter_dir / runinfo.RUN_FILE
    if opts.force or opts.resume_from or not run_file.is_file():
        return False
    run = runinfo.read_run(opts.adapter_dir)
    if run.get("complete", True) or not checkpoints(opts.adapter_dir):
        return False
    where = f"{opts.adapter_dir} holds an interrupted run (iteration {run.get('iteration')} of " \
            f"{run['options']['iters']}, model {run.get('base_model')!r})"
    if sys.stdin.isatty() and sys.stderr.isatty():
        answer = input(f"{where}. Continue it? [Y/n] ").strip().lower()
        if answer in ("", "y", "yes"):
            return True
    raise ConfigError(f"{where}; a new run would overwrite it",
                      "continue it with --resume (make train RESUME=1), or start over with "
                      "--force (FORCE=1)")


def _print_plan(opts: TrainOptions, train_set, valid_set) -> None:
    tokens = sum(len(t.input_ids) for t in train_set)
    trained = sum(t.trained_tokens for t in train_set)
    epochs = opts.iters * opts.batch_size / max(len(train_set), 1)
    say(f"Data: {len(train_set)} train / {len(valid_set)} valid examples, {tokens} train tokens "
        f"({trained} trained on). {opts.iters} iterations x {opts.batch_size} examples = "
        f"{epochs:.1f} epochs.")
    if epochs > 30:
        warn(f"{epochs:.0f} epochs is a lot: the model may memorise the data; lower ITERS")
    if len(train_set) < opts.batch_size:
        warn(f"only {len(train_set)} training examples for BATCH_SIZE={opts.batch_size}")
