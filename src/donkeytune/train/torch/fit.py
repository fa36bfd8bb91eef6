"""Which speed paths reproduce this architecture's own forward: checked on the loaded model.

- Packing several examples into a row relies on every layer keeping them apart given
  restarting position ids. Attention does (transformers builds a block-diagonal mask);
  convolutions, linear attention and recurrent layers (LFM2, Qwen3.5, Mamba hybrids) run
  across the boundary. Checked: the packed row against each example alone.
- The packed attention kernel (attention.py) must give what transformers' attention gives
  for every layer kind the model has (sliding windows, per-layer head sizes). Checked on the
  row layout the run will use; Gemma 2's soft-capped attention keeps its own.
- The chunked head loss (headloss.py) computes `hidden @ W.T`, soft-capped as the config
  says. Checked against the model's own logits; Granite divides them by `logits_scaling`,
  which is folded into the hidden states; any other difference (a head bias, another
  scaling) falls back to the model's own logits.

A path that does not reproduce the stock result on a fixed input is not installed, and the run
says which fallback it took. The frozen-block cache keys on examples, so it works either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LENGTHS = (21, 27)  # the two probe examples: longer than the tiny test models' windows


@dataclass
class Paths:
    pack: bool = True  # several examples per row
    attention: bool = True  # attention.packed_attention installed
    head: bool = True  # the chunked head loss (else the model's own logits)
    hidden_scale: float = 1.0  # multiplies the hidden states before the head loss
    notes: list[str] = field(default_factory=list)


def _probe(vocab: int, length: int, salt: int) -> list[int]:
    return [(salt + 7919 * i) % (vocab - 1) + 1 for i in range(length)]  # no RNG drawn


def _close(got: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    got, ref = got.float(), ref.float()
    return bool(torch.isfinite(got).all()) and \
        float((got - ref).abs().max()) <= tol * max(float(ref.abs().max()), 1e-6)


def check(model) -> Paths:
    """Decide the speed paths for `model` (the base model, before LoRA) and install the
    packed attention where it reproduces the stock one."""
    from . import attention  # noqa: PLC0415

    paths = Paths()
    decoder = model.get_decoder()
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    vocab = model.get_output_embeddings().weight.shape[0]
    examples = [_probe(vocab, n, salt) for n, salt in zip(LENGTHS, (11, 5))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(dtype, dev):
            def hidden(rows, positions):
                ids = torch.tensor(rows, device=dev)
                pos = torch.tensor(positions, device=dev)
                return decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state

            alone = [hidden([x], [list(range(len(x)))])[0] for x in examples]
            packed_row = ([examples[0] + examples[1]], [list(range(LENGTHS[0])) + list(range(LENGTHS[1]))])
            paths.pack = _close(hidden(*packed_row)[0], torch.cat(alone), dtype)
            if not paths.pack:
                paths.notes.append("one example per row (its layers mix the examples of a packed row)")
            pad = LENGTHS[1] - LENGTHS[0]  # the layout of an unpacked batch: padding restarts at 0
            row = packed_row if paths.pack else \
                ([examples[0] + [0] * pad], [list(range(LENGTHS[0])) + list(range(pad))])
            stock = hidden(*row)[0][: sum(LENGTHS) if paths.pack else LENGTHS[0]]
            paths.attention = attention.enable(model)
            if paths.attention and not _close(hidden(*row)[0][: len(stock)], stock, dtype):
                model.set_attn_implementation("sdpa")
                paths.attention = False
                paths.notes.append("transformers' attention (the packed kernel does not match it)")
            _check_head(model, examples[0], alone[0], paths, dtype, dev)
    finally:
        model.train(was_training)
    return paths


def _check_head(model, ids, hidden, paths: Paths, dtype, dev) -> None:
    """Our head loss's logits against the model's own."""
    text = model.config.get_text_config()
    ref = model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0]
    weight = model.get_output_embeddings().weight
    cap = getattr(text, "final_logit_softcapping", None)
    scaling = getattr(text, "logits_scaling", None)
    for scale in [1.0] + ([1.0 / scaling] if scaling and scaling != 1.0 else []):
        logits = (hidden * scale) @ weight.to(hidden.dtype).T
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if _close(logits, ref, dtype):
            paths.hidden_scale = scale
            return
    paths.head = False
    paths.notes.append("the model's own logits for the loss (its head is not a plain matmul)")


def _autocast(dtype, dev):
    low = dtype if dtype != torch.float32 else None
    return torch.autocast(torch.device(dev).type, dtype=low, enabled=low is not None)


def unpack(batch):
    """The batch with one example per row, right-padded. Padding follows the example, so a
    causal layer never carries it into a real token; its positions restart at 0."""
    from ...data import IGNORE, Batch  # noqa: PLC0415

    if len(batch.segments) == len(batch.input_ids):
        return batch
    width = max(length for *_, length in batch.segments)
    ids, pos, labels, segments = [], [], [], []
    for r, (key, row, start, length) in enumerate(batch.segments):
        pad = width - length
        ids.append(batch.input_ids[row][start:start + length] + [0] * pad)
        pos.append(list(range(length)) + list(range(pad)))
        labels.append(batch.labels[row][start:start + length] + [IGNORE] * pad)
        segments.append((key, r, 0, length))
    return Batch(ids, pos, labels, batch.tokens, segments)
