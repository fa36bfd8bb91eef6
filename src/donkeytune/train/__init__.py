"""The training stage: LoRA on the last NUM_LAYERS blocks, loss on assistant tokens.

Everything that can fail is checked before a model loads; then one of two engines trains,
through the interface in loop.py: torch (train/torch/) or MLX (train/mlx.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from pathlib import Path

from .. import data, device, models, report, runinfo
from ..config import TrainOptions
from ..errors import ConfigError, DonkeyError, ModelError
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, BEST_DIR, SEED_ADAPTER_FILE, read_json
from ..progress import say, warn
from . import distributed, engines, memory, mlxadapter, recipe
from .adapter import adapted_blocks, check_state, checkpoints, latest_checkpoint
from .loop import Best, Job


def run(opts: TrainOptions) -> Path:
    """Train a LoRA adapter; returns the adapter folder (output/adapters)."""
    device.bound_kernel_caches()  # before the first matmul (the CLI has done it already)
    # first of all: a run in progress there would otherwise look like an interrupted one
    with distributed.writer_lock(opts):
        return _run(opts)


def _run(opts: TrainOptions) -> Path:
    opts, dataset, checkpoint, resume = _checked(opts)
    group = distributed.worker()  # None unless this process is one of several torchrun workers
    if opts.workers > 1 and group is None:
        status = distributed.launch(opts)
        if status:
            raise DonkeyError(f"the {opts.devices} training workers stopped with status {status}")
        return opts.adapter_dir
    folder = models.resolve(opts.model, trust_remote_code=opts.trust_remote_code,
                            allow_pickle=opts.allow_pickle)
    check_export(folder, opts)
    if opts.num_layers is not None and n_blocks(folder):  # (a recipe's own choice fits)
        adapted_blocks(opts, n_blocks(folder))
    opts = recipe.resolve(opts, folder, len(dataset.train))  # unset ITERS, LR, ...: from the recipe
    if resume:
        _check_resume_matches(resume, folder, opts)
    engine = importlib.import_module(f".{opts.engine}", __package__)  # .torch or .mlx
    job = _job(opts, folder, dataset, engine.setup(opts, group), checkpoint, resume, group)
    engine.run(job)  # both write the same adapter, so later stages are shared
    if group and not group.main:
        return opts.adapter_dir
    say(f"Adapter saved to {opts.adapter_dir}/ ({ADAPTER_FILE}, {SEED_ADAPTER_FILE})")
    report.finish(job.opts, job.meta)  # loss.png, summary.md, the diagnosis, trackers
    return opts.adapter_dir


def _checked(opts: TrainOptions):
    """The options of this run (those of the run it continues), its data, the checkpoint it
    continues and the adapter it starts from: all checked before any model loads."""
    if opts.resume_from and not opts.model:  # the adapter's own base, as the seed's users expect
        model = adapter_base_model(Path(opts.resume_from))
        if model:
            say(f"MODEL={model}: the base model RESUME_FROM's adapter was trained on")
            opts = dataclasses.replace(opts, model=model)
    opts = dataclasses.replace(opts, model=opts.model or models.DEFAULT_MODEL)
    checkpoint = None
    if not opts.resume and _continue_interrupted(opts):
        opts = dataclasses.replace(opts, resume=True)
    if opts.resume:
        checkpoint = latest_checkpoint(opts.adapter_dir)
        check_state(checkpoint)  # a pickle or a tampered file: refused unread
        opts = _recorded_options(checkpoint, opts)  # its DATA_DIR, ITERS, LR, ...
    dataset = data.load_dir(opts.data_dir)  # bad data stops here, before any model loads
    if len(dataset.train) < opts.workers:
        nodes = f" x NNODES={opts.nnodes}" if opts.nnodes > 1 else ""
        raise ConfigError(f"{len(dataset.train)} training examples for DEVICES={opts.devices}{nodes}: "
                          "some workers would get none",
                          f"use DEVICES={max(len(dataset.train) // opts.nnodes, 1)} or fewer")
    resume = _resume_source(opts)
    _check_output_dir(opts, resume or checkpoint)
    opts = dataclasses.replace(opts, engine=engines.pick(opts.engine, checkpoint))  # torch or mlx
    return opts, dataset, checkpoint, resume


def _job(opts, folder, dataset, setup, checkpoint, resume, group) -> Job:
    """The tokenized splits, the memory check (said before loading), the plan, the run record."""
    tok = device.load_tokenizer(folder, trust_remote_code=opts.trust_remote_code)
    train_set = data.tokenize_all(tok, dataset.train, opts.max_seq_length, opts.train_on_prompt, "train")
    valid_set = data.tokenize_all(tok, dataset.valid, opts.max_seq_length, opts.train_on_prompt, "valid")
    opts = memory.check_training(opts, folder, train_set, setup.device, setup.dtype_bytes,
                                 auto=opts.recipe == "auto" and not checkpoint, packed=setup.packed)
    _print_plan(opts, train_set, valid_set)
    meta = runinfo.run_record(
        "train", opts, base_model=opts.model, base_model_path=str(folder),
        base_fingerprint=runinfo.model_fingerprint(folder), data_dir=str(opts.data_dir),
        data_fingerprint=dataset.fingerprint, system_prompt=dataset.system_prompt,
        resumed_from=str(resume) if resume else None, lora_alpha=opts.lora_alpha,
        train_examples=len(train_set), valid_examples=len(valid_set), **setup.record)
    meta["versions"].update(setup.versions)
    best = Best.of(runinfo.read_run(checkpoint)) if checkpoint else Best()
    if not checkpoint and (group is None or group.main):  # a new run: an older run's best goes
        shutil.rmtree(opts.adapter_dir / BEST_DIR, ignore_errors=True)
    return Job(opts, folder, setup, tok.pad_token_id, train_set, valid_set, meta, checkpoint, resume,
               group, best, _questions(opts, valid_set), tok)


def _questions(opts: TrainOptions, valid_set) -> list[dict]:
    """The held-out questions --eval-questions asks at each evaluation."""
    if not opts.eval_questions:
        return []
    questions = [q for q in data.load_questions(opts.data_dir) if q["keyword"]]
    if not questions:
        warn(f"--eval-questions: {opts.data_dir}/questions.jsonl has no questions with keywords; "
             "only the validation loss is measured")
    elif not valid_set:
        warn("--eval-questions: the questions are asked at each evaluation, and without "
             "valid.jsonl there is none")
    return questions


def _recorded_options(checkpoint: Path, given: TrainOptions) -> TrainOptions:
    """A resumed run continues with the options it was started with, in the folder it is in
    now (a run folder may have been moved or copied)."""
    recorded = runinfo.read_run(checkpoint)["options"]
    keep = {"resume": True, "force": given.force, "output_dir": given.output_dir}
    if given.engine != "auto":  # asked for: engines.pick refuses it if another engine wrote the run
        keep["engine"] = given.engine
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in recorded.items() if k in names} | keep)


def adapter_base_model(path: Path) -> str | None:
    """The base model an adapter (file or folder) records: ours, PEFT's or mlx-lm's config."""
    folder = path if path.is_dir() else path.parent
    if (folder / runinfo.RUN_FILE).is_file():
        return runinfo.read_run(folder).get("base_model")
    if (folder / ADAPTER_CONFIG).is_file():
        cfg = read_json(folder / ADAPTER_CONFIG)
        return cfg.get("model") or cfg.get("base_model_name_or_path")
    return None


def _resume_source(opts: TrainOptions) -> Path | None:
    if not opts.resume_from:
        return None
    path = Path(opts.resume_from)
    seed = mlxadapter.peft_folder(path.parent if path.is_file() else path, opts.model)
    if seed is not None:  # mlx-lm's adapter folder, converted to PEFT's
        return seed / ADAPTER_FILE
    if path.is_dir():  # ours, else the seed's (mlx-lm's) file name
        path = path / ADAPTER_FILE if (path / ADAPTER_FILE).is_file() else path / SEED_ADAPTER_FILE
    if not path.is_file():
        raise ConfigError(f"RESUME_FROM={opts.resume_from}: no adapter file there",
                          f"point it at a trained adapter, e.g. output/adapters/{SEED_ADAPTER_FILE}")
    return path


def _check_resume_matches(source: Path, folder: Path, opts: TrainOptions) -> None:
    """An adapter resumes only on its own base model, with its own rank."""
    run_file = source.parent / runinfo.RUN_FILE
    config_file = source.parent / ADAPTER_CONFIG
    if run_file.is_file():
        run = runinfo.read_run(source.parent)
        if run["base_fingerprint"] != runinfo.model_fingerprint(folder):
            raise ModelError(
                f"RESUME_FROM adapter was trained on {run['base_model']!r}, "
                f"but MODEL is {opts.model!r}",
                f"set MODEL={run['base_model']} (or leave it unset), or train from scratch")
    if config_file.is_file():
        rank = read_json(config_file).get("r")
        if rank is not None and rank != opts.rank:
            raise ConfigError(f"RESUME_FROM adapter has rank {rank}, but RANK={opts.rank}",
                              f"set RANK={rank} to continue it")


def n_blocks(folder: Path) -> int:
    """The transformer blocks of a model, from its config.json (a multimodal one: its text part)."""
    text = models.text_config(models.read_config(folder))
    return int(text.get("num_hidden_layers") or text.get("n_layer") or 0)


def _check_output_dir(opts: TrainOptions, resume: Path | None) -> None:
    """Never overwrite the adapter of another model by accident (the seed's clean-output trap)."""
    run_file = opts.adapter_dir / runinfo.RUN_FILE
    if opts.force or not run_file.is_file():
        return
    run = runinfo.read_run(opts.adapter_dir)
    if not resume and not models.same_model(opts.model, run.get("base_model"),
                                            run.get("base_model_path")):
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


def check_export(folder: Path, opts: TrainOptions) -> None:
    """Say how the trained model will become a GGUF, or refuse a model that cannot, before
    it loads (no one should train for an hour for nothing)."""
    from ..gguf import plan  # noqa: PLC0415

    export = plan(folder, opts.exporter)
    if export.exporter:
        say(export.line)
    elif opts.export_check:
        raise ModelError(f"{opts.model}: {export.line}; train anyway with --no-export-check",
                         export.fix)
    else:
        warn(f"{opts.model}: {export.line} (training anyway: --no-export-check)")


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
