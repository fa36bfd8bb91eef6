"""The MLX engine (Apple Silicon): mlx-lm's LoRA layers and Adam, with our data, loop and files.

The stage (train/__init__.py) hands over here once the data, recipe and model are resolved. The adapter is
written as PEFT writes it, so fuse, export-adapter, convert and test never ask which engine
trained: mlx-lm computes base(x) + scale * (x @ lora_a) @ lora_b with lora_a (in, r) and
lora_b (r, out); PEFT computes base(x) + lora_alpha / r * lora_B(lora_A(x)) with lora_A
(r, in) and lora_B (out, r). So lora_A = lora_a.T, lora_B = lora_b.T, lora_alpha = scale * r.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from .. import data, models
from ..config import TrainOptions
from ..errors import ConfigError, ModelError
from ..files import ADAPTER_CONFIG, ADAPTER_FILE, MLX_STATE_FILE, atomic
from ..progress import say
from ..use.test import QUESTION_TOKENS, prompt_ids, score_questions
from .adapter import adapted_blocks, misfit, prune_checkpoints, save_adapter, save_best
from .engines import MLX_INSTALL, apple_silicon
from .loop import Job, Reporter, Setup, check_finite, loop, metrics_file

try:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
except ImportError as e:
    raise ConfigError(f"the MLX engine needs mlx and mlx-lm ({e})", MLX_INSTALL) from e

PEFT_PREFIX = "base_model.model."  # PEFT's names: base_model.model.<HF module path>.lora_A.weight
TO_PEFT = {"lora_a": "lora_A", "lora_b": "lora_B"}


def setup(opts: TrainOptions, group=None) -> Setup:
    """Where MLX runs (the GPU on Apple Silicon) and its bytes per weight, for the memory check."""
    return Setup("mps" if apple_silicon() else "cpu", 4 if opts.dtype == "float32" else 2,
                 record={"engine": "mlx"}, versions={"mlx": version("mlx"), "mlx_lm": version("mlx-lm")})


def run(job: Job) -> Path:
    """Train a LoRA adapter with MLX; returns the adapter folder (output/adapters)."""
    opts, folder, pad, valid_set = job.opts, job.folder, job.pad_id, job.valid_set
    if opts.device == "cpu":
        mx.set_default_device(mx.cpu)
    names = weight_names(folder)
    mx.random.seed(opts.seed)
    model = lora_model(folder, opts)
    check_names(model, names)
    if job.resume:
        load_adapter_weights(model, job.resume)
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    say(f"MLX engine ({mx.default_device()}): {n_params:,} trainable LoRA parameters"
        + (f", the base quantized to {opts.quantize_base} bits (QLoRA)" if opts.quantize_base else ""))
    optimizer = optim.Adam(learning_rate=opts.lr, bias_correction=True)  # = torch AdamW, no decay
    optimizer.init(model.trainable_parameters())
    start = restore_checkpoint(job.checkpoint, model, optimizer) if job.checkpoint else 0

    batches = (arrays(chunk, pad, COMPILE) for chunk in
               length_batches(job.train_set, opts.batch_size, opts.seed, start_step=start))
    model.train()
    update = train_step(model, optimizer, compiled=COMPILE)
    done = [start]

    def step(batch):
        done[0] += 1
        mx.random.seed(opts.seed * 1_000_003 + done[0])  # dropout per step: a resumed run redraws it
        loss = update(*batch.inputs)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        value = loss.item()
        check_finite(value, opts)  # raises: the model in memory is dropped, the last checkpoint kept
        return value, batch.tokens

    def evaluate():
        model.eval()
        total, count = 0.0, 0
        for b, i in enumerate(range(0, len(valid_set), opts.batch_size)):
            if opts.val_batches != -1 and b >= opts.val_batches:
                break
            loss, ntok = loss_fn(model, *arrays(valid_set[i:i + opts.batch_size], pad, False).inputs)
            total += loss.item() * ntok.item()
            count += ntok.item()
        model.train()
        return total / max(count, 1)

    adapter = PeftAdapter(model, peft_config(model, opts, folder))

    def save(it: int, final: bool = False, best: bool = False):
        meta = dict(job.meta, iteration=it, complete=final, **job.best.record())
        if best:
            save_best(adapter, opts.adapter_dir, meta)
            return
        save_adapter(adapter, opts.adapter_dir, meta, checkpoint=None if final else it)
        if not final:  # the state file comes last: only then is the folder a checkpoint
            save_state(opts.adapter_dir / "checkpoints" / f"{it:07d}", it, optimizer)
        prune_checkpoints(opts.adapter_dir, opts.keep)

    def ask():
        model.eval()
        found = score_questions(lambda messages: answer(model, job.tokenizer, messages),
                                job.questions, job.meta.get("system_prompt"))
        return found, len(job.questions)

    reporter = Reporter(opts.iters, "mlx", metrics_file(opts), start)
    with checkpointed(model, opts.grad_checkpoint):
        loop(step, batches, evaluate if valid_set else None, save, opts, reporter, start,
             best=job.best, ask=ask if job.questions else None)
    return opts.adapter_dir


# ---------------------------------------------------------------- model and loss

def lora_model(folder: Path, opts: TrainOptions):
    """The base model in mlx-lm, frozen, with mlx-lm's LoRA on every linear layer of the last
    NUM_LAYERS blocks (the layers the torch engine adapts)."""
    model, _ = load_model(Path(folder), model_config=mlx_config(folder),
                          trust_remote_code=opts.trust_remote_code)
    if opts.dtype != "auto":  # auto: as stored
        model.set_dtype(getattr(mx, opts.dtype))
    if opts.quantize_base:  # QLoRA: the frozen base in 4 or 8 bits; the adapter stays float
        nn.quantize(model, group_size=QUANT_GROUP, bits=opts.quantize_base,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % QUANT_GROUP == 0)
    model.freeze()
    n = len(adapted_blocks(opts, len(model.layers)))  # mlx-lm adapts the last n
    linear_to_lora_layers(model, n, dict(rank=opts.rank, scale=opts.scale, dropout=opts.dropout,
                                         keys=block_linear_keys(model)))
    model.labelled_head = head(model)  # a plain attribute, not a parameter
    return model


QUANT_GROUP = 64  # weights per scale and bias of a quantized row (mlx-lm's default)


@contextmanager
def checkpointed(model, enabled: bool):
    """GRAD_CHECKPOINT: the blocks recompute their activations in the backward pass instead of
    keeping them (mlx-lm's grad_checkpoint, undone afterwards: it patches the block class)."""
    if not enabled:
        yield
        return
    cls = type(model.layers[-1])
    call = cls.__call__

    def recomputed(block, *args, **kwargs):
        def inner(params, *args, **kwargs):
            block.update(params)
            return call(block, *args, **kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)

    cls.__call__ = recomputed
    try:
        yield
    finally:
        cls.__call__ = call


def mlx_config(folder: Path) -> dict:
    """Settings mlx-lm reads from keys transformers 5 no longer writes (it would silently use
    its defaults): rope_theta / rope_scaling from rope_parameters (Gemma 3: one per attention
    type) and Gemma 3's sliding_window_pattern from layer_types."""
    cfg = models.read_config(folder)
    out = {}
    rope = cfg.get("rope_parameters") or {}
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention")
    if "rope_theta" in full and "rope_theta" not in cfg:
        out["rope_theta"] = full["rope_theta"]
        if full.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
            out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    if local and "rope_local_base_freq" not in cfg:
        out["rope_local_base_freq"] = local["rope_theta"]
    types = cfg.get("layer_types") or []
    if "full_attention" in types and "sliding_window_pattern" not in cfg:
        n = types.index("full_attention") + 1
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(types)):
            out["sliding_window_pattern"] = n
    return out


def block_linear_keys(model) -> list[str]:
    """Paths of the linear layers inside a block (self_attn.q_proj, ..., mlp.down_proj)."""
    return sorted(k for k, m in model.layers[0].named_modules()
                  if isinstance(m, (nn.Linear, nn.QuantizedLinear)))


def length_batches(items: list, batch_size: int, seed: int, *, start_step: int = 0):
    """Endless seeded epochs of BATCH_SIZE examples of similar lengths, so that little padding
    is left: each epoch is shuffled, cut into windows of WINDOW batches, each window sorted by
    length and cut into batches, and the batches of a window shuffled. Skips `start_step`."""
    window_size = WINDOW if LENGTH_GROUPED else 1
    step, epoch = 0, 0
    while True:
        rng = random.Random(seed + epoch)
        order = list(range(len(items)))
        rng.shuffle(order)
        usable = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
        for w in range(0, usable, window_size * batch_size):
            window = sorted(order[w:min(w + window_size * batch_size, usable)],
                            key=lambda j: len(items[j].input_ids))
            chunks = [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
            rng.shuffle(chunks)
            for chunk in chunks:
                if step >= start_step:
                    yield [items[j] for j in chunk]
                step += 1
        epoch += 1


COMPILE = True  # the bench turns these off one at a time, to measure what each brings
LENGTH_GROUPED = True
HEAD_ON_LABELLED = True
WINDOW = 16  # batches sorted together: similar lengths, still a fresh mix every epoch
HEAD_ROWS = 32  # the labelled positions are padded to a multiple of this (fewer compiled shapes)
WIDTH_STEP = 8  # compiled: rows padded to a multiple of this (one compiled graph per width)


@dataclass
class Arrays:
    inputs: tuple  # (ids, positions, targets, weights): what loss_fn and the step take
    tokens: int  # real (non-padding) tokens


def arrays(chunk: list, pad_id: int, compiled: bool) -> Arrays:
    """One right-padded row per example, as wide as the longest (rounded up to WIDTH_STEP when
    the step is compiled), and the flat positions whose next token is labelled, with targets and
    weights (0 for the padding of HEAD_ROWS): the LM head runs on those positions only."""
    longest = max(len(t.input_ids) for t in chunk)
    width = -(-longest // WIDTH_STEP) * WIDTH_STEP if compiled else longest
    ids = np.full((len(chunk), width), pad_id, dtype=np.int32)
    labels = np.full((len(chunk), width), data.IGNORE, dtype=np.int32)
    for r, t in enumerate(chunk):
        ids[r, :len(t.input_ids)] = t.input_ids
        labels[r, 1:len(t.labels)] = t.labels[1:]  # the first token is never predicted
    targets = labels[:, 1:].reshape(-1)  # position k (of the width - 1 inputs) predicts k + 1
    positions = np.flatnonzero(targets != data.IGNORE).astype(np.int32)
    n = len(positions)
    rows = max(-(-n // HEAD_ROWS) * HEAD_ROWS, HEAD_ROWS)
    weights = np.zeros(rows, np.float32)
    weights[:n] = 1
    positions = np.pad(positions, (0, rows - n))
    return Arrays((mx.array(ids), mx.array(positions), mx.array(targets[positions]),
                   mx.array(weights)), sum(len(t.input_ids) for t in chunk))


def head(model):
    """The LM head as mlx-lm's models apply it after model.model (tied or not), or None when
    that does not give the model's own logits (a model with extras after its head)."""
    fn = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    probe, training = mx.array([[1, 2, 3, 4]]), model.training
    model.eval()  # no dropout in the comparison
    same = mx.allclose(fn(model.model(probe)), model(probe), rtol=1e-4, atol=1e-4).item()
    model.train(training)
    return fn if same and HEAD_ON_LABELLED else None


def loss_fn(model, ids, positions, targets, weights):
    """Mean cross-entropy over the labelled tokens (the assistant's unless --train-on-prompt),
    and their count. The LM head, the largest matmul of a small model, runs on the labelled
    positions only."""
    if model.labelled_head is None:
        logits = model(ids[:, :-1])
        logits = logits.reshape(-1, logits.shape[-1])[positions].astype(mx.float32)
    else:
        hidden = model.model(ids[:, :-1])
        logits = model.labelled_head(hidden.reshape(-1, hidden.shape[-1])[positions]).astype(mx.float32)
    ntok = weights.sum()
    ce = nn.losses.cross_entropy(logits, targets) * weights
    return ce.sum() / mx.maximum(ntok, 1), ntok


def train_step(model, optimizer, compiled: bool = True):
    """(inputs) -> loss: forward, backward and Adam's update. Compiled as mlx-lm's trainer
    compiles its step, with the model, optimizer and random state as inputs and outputs (one
    graph per input shape; its elementwise ops fused)."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(*inputs):
        (loss, _), grads = loss_and_grad(model, *inputs)
        optimizer.update(model, grads)
        return loss

    if not compiled:
        return step
    state = [model.state, optimizer.state, mx.random.state]
    return mx.compile(step, inputs=state, outputs=state)


def answer(model, tok, messages) -> str:
    """A greedy answer of at most QUESTION_TOKENS tokens, as use/test.py answers in torch."""
    from mlx_lm.generate import generate as mlx_generate  # noqa: PLC0415

    return mlx_generate(model, tok, prompt_ids(tok, messages), max_tokens=QUESTION_TOKENS, verbose=False).strip()


# ---------------------------------------------------------------- the PEFT adapter

def peft_config(model, opts: TrainOptions, folder: Path) -> dict:
    """The adapter_config.json PEFT would have written for the same layers (PEFT fills the
    fields left out with its defaults). Written without importing PEFT, which would import
    torch: seconds of start-up an MLX run has no use for."""
    return dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(folder),
                inference_mode=True, r=opts.rank, lora_alpha=opts.lora_alpha,
                lora_dropout=opts.dropout, bias="none", fan_in_fan_out=False, use_rslora=False,
                use_dora=False, init_lora_weights=True, modules_to_save=None, layers_pattern=None,
                target_modules=sorted({k.rsplit(".", 1)[-1] for k in block_linear_keys(model)}),
                layers_to_transform=adapted_blocks(opts, len(model.layers)), rank_pattern={},
                alpha_pattern={})


def to_peft(model) -> dict:
    """The LoRA weights under PEFT's names and shapes, float32 numpy."""
    out = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        module, kind = name.rsplit(".", 1)
        weight = np.array(value.astype(mx.float32)).T
        out[f"{PEFT_PREFIX}{module}.{TO_PEFT[kind]}.weight"] = np.ascontiguousarray(weight)
    return out


@dataclass
class PeftAdapter:
    """What adapter.save_adapter asks of a model: save_pretrained writing PEFT's two files."""

    model: object
    config: dict  # adapter_config.json

    def save_pretrained(self, folder: Path) -> None:
        from safetensors.numpy import save_file  # noqa: PLC0415

        folder.mkdir(parents=True, exist_ok=True)
        save_file(to_peft(self.model), folder / ADAPTER_FILE, metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")


def load_adapter_weights(model, source: Path) -> None:
    """Put a PEFT adapter file (written by either engine) into the model's LoRA layers."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    want = dict(tree_flatten(model.trainable_parameters()))
    got, unexpected = {}, []
    for key, value in load_file(source).items():
        module, kind, _ = key.removeprefix(PEFT_PREFIX).rsplit(".", 2)
        name = f"{module}.{kind.lower()}"
        if name in want and want[name].shape == value.T.shape:
            got[name] = mx.array(np.ascontiguousarray(value.T)).astype(want[name].dtype)
        else:
            unexpected.append(key)
    missing = set(want) - set(got)
    if missing or unexpected:
        raise misfit(source, len(missing), len(unexpected))
    model.load_weights(list(got.items()), strict=False)
    say(f"Resuming from the adapter weights in {source}")


def weight_names(folder: Path) -> set[str]:
    """Tensor names of the base model's safetensors (headers only)."""
    from safetensors import safe_open  # noqa: PLC0415

    names = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(f, "np") as st:
            names.update(st.keys())
    if not names:
        raise ModelError(f"{folder} has no safetensors weights, the only ones MLX reads",
                         "train it with ENGINE=torch")
    return names


def check_names(model, names: set[str]) -> None:
    """Every adapted layer must have its weight under the same name in the HF checkpoint, or
    fuse and convert could not place the adapter."""
    modules = {k.rsplit(".", 1)[0] for k, _ in tree_flatten(model.trainable_parameters())}
    stray = sorted(m for m in modules if f"{m}.weight" not in names)
    if stray:
        raise ModelError(f"mlx-lm names this model's layers differently from its checkpoint "
                         f"({stray[0]}.weight not found): the adapter would not fit the base model",
                         "train it with ENGINE=torch")


# ---------------------------------------------------------------- checkpoints

def save_state(folder: Path, it: int, optimizer) -> None:
    """The optimizer state (Adam moments and step) as safetensors, written atomically."""
    with atomic(folder / MLX_STATE_FILE, suffix=".safetensors") as tmp:  # mlx would append it
        mx.save_safetensors(str(tmp), dict(tree_flatten(optimizer.state)), metadata={"iteration": str(it)})


def restore_checkpoint(folder: Path, model, optimizer) -> int:
    load_adapter_weights(model, folder / ADAPTER_FILE)
    try:
        arrays, meta = mx.load(str(folder / MLX_STATE_FILE), return_metadata=True)
        it = int(meta["iteration"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelError(f"{folder / MLX_STATE_FILE} is not a readable MLX trainer state ({e}); "
                         "it is not loaded", "start over with --force") from None
    names = {k for k, _ in tree_flatten(optimizer.state)}
    if names != set(arrays):
        raise ModelError(f"{folder / MLX_STATE_FILE} does not fit this run's optimizer",
                         "start over with --force")
    optimizer.state = tree_map_with_path(lambda path, _: arrays[path], optimizer.state)
    say(f"Resuming at iteration {it} from {folder}")
    return it
