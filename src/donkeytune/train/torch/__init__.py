"""The torch engine (transformers + PEFT): CPU, CUDA, Apple MPS.

LoRA by PEFT on the last NUM_LAYERS blocks, run through the speed kernels of this folder
(each equal to the stock path); the loop, the adapter folder and the report are shared
with the MLX engine (train/loop.py, train/adapter.py).
"""

from __future__ import annotations

import contextlib

from ... import data, device
from ...config import TrainOptions
from ...errors import ConfigError
from ...progress import say
from .. import distributed, recipe
from ...use.test import QUESTION_TOKENS, generate, score_questions
from ..adapter import (adapted_blocks, load_adapter_weights, prune_checkpoints, restore_checkpoint,
                       save_adapter, save_best, trainer_state)
from ..loop import Job, QuietReporter, Reporter, Setup, check_finite, loop, metrics_file


def setup(opts: TrainOptions, group=None) -> Setup:
    """Threads, device and dtype of this run; whether the LM head will be packed."""
    from .loralinear import can_pack  # noqa: PLC0415

    device.set_threads(group.world if group else 1)
    dev = device.pick_device(opts.device)
    dtype = device.pick_dtype(opts.dtype, dev)
    if opts.grad_checkpoint:
        raise ConfigError("GRAD_CHECKPOINT is an option of the MLX engine",
                          "drop it, or train with ENGINE=mlx")
    if opts.quantize_base:
        check_qlora(dev)
    if group and dev == "cuda":
        dev = f"cuda:{group.local_rank}"
    return Setup(dev, dtype.itemsize, packed=can_pack(dtype, dev) and not opts.quantize_base,
                 dtype=dtype)


def check_qlora(dev: str) -> None:
    """QUANTIZE_BASE on torch: bitsandbytes' 4/8-bit layers, which need a CUDA GPU."""
    import importlib.util  # noqa: PLC0415

    if dev != "cuda":
        raise ConfigError(f"QUANTIZE_BASE on the torch engine needs a CUDA GPU (bitsandbytes); this "
                          f"run is on {dev}",
                          "on a Mac use ENGINE=mlx (mlx-lm's quantized layers); elsewhere drop "
                          "QUANTIZE_BASE")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("QUANTIZE_BASE on CUDA needs the bitsandbytes package, which is not "
                          "installed", "pip install 'donkeytune[qlora]'  (or: pip install bitsandbytes)")


def run(job: Job):
    """Train with PEFT's LoRA layers and our kernels; writes the adapter folder."""
    import torch  # noqa: PLC0415

    from . import loralinear  # noqa: PLC0415

    opts, group, dev = job.opts, job.group, job.setup.device
    torch.manual_seed(opts.seed)
    base = device.load_model(job.folder, "cpu" if opts.fsdp else dev, job.setup.dtype,
                             trust_remote_code=opts.trust_remote_code, quantize_bits=opts.quantize_base)
    model = add_lora(base, opts)
    if job.resume:
        load_adapter_weights(model, job.resume)
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
    start = restore_checkpoint(job.checkpoint, model, optimizer, shard[1]) if job.checkpoint else 0

    pad, train_set, valid_set = job.pad_id, job.train_set, job.valid_set
    batches = data.batches(train_set, opts.batch_size, opts.seed, pad, start_step=start, shard=shard)

    def step(batch):
        return lora_step(model, batch, optimizer, params, dev, cache, group,
                         lambda value: check_finite(value, opts))

    def evaluate():
        return evaluate_loss(model, valid_set, opts.batch_size, opts.val_batches, pad, dev, cache,
                             shard, group.sum if group else None)

    def save(it: int, final: bool = False, best: bool = False):
        if group is None or group.main:  # one set of files
            meta = dict(job.meta, iteration=it, complete=final, **job.best.record())
            if best:
                save_best(model, opts.adapter_dir, meta)
            else:
                save_adapter(model, opts.adapter_dir, meta, checkpoint=None if final else it,
                             state=None if final else trainer_state(it, optimizer, shard[1]))
                prune_checkpoints(opts.adapter_dir, opts.keep)
        if group:
            group.barrier()

    def ask():
        with _compute_dtype(model.get_base_model(), dev):
            found = score_questions(lambda messages: generate(model, job.tokenizer, messages,
                                                              QUESTION_TOKENS, dev),
                                    job.questions, job.meta.get("system_prompt"))
        return found, len(job.questions)

    reporter = Reporter(opts.iters, dev, metrics_file(opts), start) if not group or group.main \
        else QuietReporter()
    agree = (lambda flag: group.sum([float(flag)])[0] > 0) if group else None
    with contextlib.nullcontext() if opts.fsdp else loralinear.packed(model):  # FSDP owns the weights
        if cache and start:  # with the weights as the interrupted run had them
            refill_prefix_cache(cache, model, train_set, opts, pad, dev, start, shard)
        loop(step, batches, evaluate if valid_set else None, save, opts, reporter, start, agree,
             job.best, ask if job.questions and group is None else None)
    return opts.adapter_dir


def add_lora(model, opts: TrainOptions):
    """Wrap `model` in PEFT LoRA on every linear layer of the last NUM_LAYERS blocks; its
    packed rows attend per example (attention.py), its LoRA layers run as one autograd step
    (loralinear.py) with a dropout that draws only the dropped positions (dropout.py), and
    their RMSNorms as one autograd step each (blockops.py)."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    from . import blockops, dropout, fit, loralinear  # noqa: PLC0415

    opts = recipe.seed_filled(opts)  # called without run() (Python users, tests): the seed's values
    layers = adapted_blocks(opts, model.config.get_text_config().num_hidden_layers)
    config = LoraConfig(r=opts.rank, lora_alpha=opts.lora_alpha, lora_dropout=opts.dropout,
                        task_type="CAUSAL_LM", **lora_targets(model, layers))
    paths = fit.check(model)  # packing, packed attention, head loss: where they equal the stock path
    if paths.notes:
        say("Training with " + "; ".join(paths.notes))
    model = get_peft_model(model, config)
    model.get_base_model().donkeytune_paths = paths
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
            batch = _layout(causal, next(first_epoch))
            ids = torch.tensor(batch.input_ids, device=dev)
            pos = torch.tensor(batch.position_ids, device=dev)
            cache.fill(batch.segments, ids.shape, lambda: causal.get_decoder()(
                input_ids=ids, position_ids=pos, use_cache=False))


def block_linear_names(model) -> list[str]:
    """Names of the nn.Linear layers inside the transformer blocks (q_proj, ..., down_proj),
    without mixture-of-experts routers (LoRA on a router would move tokens between experts)."""
    import torch  # noqa: PLC0415

    text = model.config.get_text_config()
    experts = {getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")}
    names = set()
    for layer in model.get_decoder().layers:  # hybrids: each layer kind has its own linears
        for name, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            router = mod.out_features in experts - {None} or "router" in leaf or leaf == "shared_expert_gate"
            if not router:
                names.add(leaf)
    return sorted(names)


def lora_targets(model, layers: list[int]) -> dict:
    """PEFT's target_modules (and layers_to_transform) for LoRA on the decoder blocks `layers`
    only. A multimodal model's vision or audio tower has linears of the same names (q_proj,
    ...): then a pattern on the decoder's own path keeps LoRA off them."""
    import re  # noqa: PLC0415

    import torch  # noqa: PLC0415

    names = block_linear_names(model)
    decoder_layers = model.get_decoder().layers
    path = next(n for n, m in model.named_modules() if m is decoder_layers)
    inside = {n for n, m in model.named_modules() if n.startswith(path + ".")}
    elsewhere = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and n.rsplit(".", 1)[-1] in names and n not in inside]
    if not elsewhere:
        return dict(target_modules=names, layers_to_transform=layers)
    return dict(target_modules=rf"{re.escape(path)}\.({'|'.join(map(str, layers))})\.(.*\.)?"
                               rf"({'|'.join(map(re.escape, names))})")


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

    causal = model.get_base_model()
    paths = getattr(causal, "donkeytune_paths", None)
    batch = _layout(causal, batch)
    ids, pos, labels = (torch.tensor(x, device=dev) for x in
                        (batch.input_ids, batch.position_ids, batch.labels))
    replay = cache.batch(batch.segments, ids.shape) if cache else contextlib.nullcontext()
    targets = labels[:, 1:]
    keep = targets != data.IGNORE
    if paths is not None and not paths.head:  # the model's own head and logits
        with _compute_dtype(causal, dev), replay:
            logits = causal(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep],
                                                 reduction="sum")
        return loss, int(keep.sum())
    with _compute_dtype(causal, dev), replay:
        hidden = causal.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    cap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)
    head = causal.get_output_embeddings()
    hidden = hidden[:, :-1][keep]
    if paths is not None and paths.hidden_scale != 1.0:  # Granite's logits_scaling
        hidden = hidden * paths.hidden_scale
    loss = head_loss(hidden, head.weight, targets[keep], cap, getattr(head, loralinear.PACKED, None))
    return loss, int(keep.sum())


def _layout(causal, batch: data.Batch) -> data.Batch:
    """One example per row for models whose layers mix the examples of a packed row."""
    from .fit import unpack  # noqa: PLC0415

    paths = getattr(causal, "donkeytune_paths", None)
    return batch if paths is None or paths.pack else unpack(batch)


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
