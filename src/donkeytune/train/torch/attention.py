"""Attention for packed rows: each example attends to itself, with a causal kernel.

Packing puts several examples in one row and restarts position ids at each. transformers
then builds a block-diagonal mask over the whole row and runs attention over all of it:
row_length² scores, with the mask as an extra input. Here the examples are gathered
into a [examples, length] layout instead (examples of similar length together), and a
causal kernel runs without a row-wide mask: right padding never reaches a real query
under a causal mask, and the padded queries are dropped on the way back. Same result, a
fraction of the work.

Which kernel: short examples (up to 128 tokens) use two plain matmuls; longer ones go 32
queries at a time without autograd (frozen blocks, evaluation) and 64 at a time with it
(_BlockedAttention, a flash-style backward); attention dropout goes to
scaled_dot_product_attention. On this CPU each choice is the fastest one measured for its
case (figures at each function).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

NAME = "donkeytune_packed"


def enable(model) -> bool:
    """Use packed attention in `model` when its attention is plain causal softmax attention
    (no logit soft-capping); returns whether it did."""
    from transformers import AttentionInterface  # noqa: PLC0415

    text = model.config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None) or model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, packed_attention)
    model.set_attn_implementation(NAME)
    return True


class Layout:
    """Where each example of a packed batch lies, grouped into buckets of similar length."""

    def __init__(self, position_ids: torch.Tensor):
        pos = position_ids.reshape(-1)
        starts = (pos == 0).nonzero().flatten().tolist()
        ends = starts[1:] + [len(pos)]
        lengths = [e - s for s, e in zip(starts, ends)]
        buckets: dict[int, list[int]] = {}
        for k, n in enumerate(lengths):  # by power of two: a bucket's padding stays below 4x
            buckets.setdefault(max(n - 1, 0).bit_length(), []).append(k)
        self.groups = []  # (gather index [examples, width], width)
        slot = torch.empty(len(pos), dtype=torch.long)
        offset = 0
        for members in buckets.values():
            width = max(lengths[k] for k in members)
            steps = torch.arange(width)
            index = torch.stack([starts[k] + steps.clamp(max=lengths[k] - 1) for k in members])
            for i, k in enumerate(members):
                slot[starts[k]:ends[k]] = offset + i * width + torch.arange(lengths[k])
            self.groups.append((index.to(position_ids.device), width))
            offset += len(members) * width
        self.slot = slot.to(position_ids.device)

    @staticmethod
    def valid(position_ids: torch.Tensor) -> bool:
        """Rows start at 0 and positions count up by one within each example."""
        if position_ids[:, 0].any():
            return False
        step = position_ids[:, 1:] - position_ids[:, :-1]
        return bool(((step == 1) | (position_ids[:, 1:] == 0)).all())


_last: tuple = (lambda: None, None)  # (weakref to position_ids, its Layout): one per forward


def _layout(position_ids: torch.Tensor) -> Layout | None:
    global _last
    ref, layout = _last
    if ref() is not position_ids:
        layout = Layout(position_ids) if Layout.valid(position_ids) else None
        _last = (weakref.ref(position_ids), layout)
    return layout


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, sliding_window: int | None = None,
                     position_ids: torch.Tensor | None = None, **kwargs):
    """An attention function for transformers' AttentionInterface: query [B, H, T, D],
    key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    b, heads, t, d = query.shape
    layout = None
    if position_ids is not None and attention_mask is None and key.shape[2] == t:
        layout = _layout(position_ids.expand(b, -1) if position_ids.shape[0] != b else position_ids)
    if layout is None:  # generation with a cache, or positions that are not packed examples
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    q, k, v = (_Gather.apply(x.transpose(1, 2).reshape(b * t, x.shape[1], d), layout)
               for x in (query, key, value))
    scale = scaling if scaling is not None else d ** -0.5
    outs = []
    for g, (_, width) in enumerate(layout.groups):
        qg, kg, vg = (x[g].transpose(1, 2) for x in (q, k, v))  # [examples, heads, width, d]
        window = sliding_window if sliding_window and width > sliding_window else None
        if not dropout and (width <= 64 or (width <= SMALL and query.requires_grad)):
            out = _causal_attention(qg, kg, vg, scale, window)
        elif not dropout and not query.requires_grad:  # frozen blocks, evaluation
            out = _causal_attention(qg, kg, vg, scale, window, block=32)
        elif not dropout:
            out = _BlockedAttention.apply(qg, kg, vg, scale, window)
        else:
            mask = None if window is None else ~_hidden(width, window, query.device)
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=window is None,
                                                 scale=scale, dropout_p=dropout,
                                                 enable_gqa=kg.shape[1] != heads)
        outs.append(out.transpose(1, 2).reshape(-1, heads, d))
    return _Scatter.apply(layout, *outs).view(b, t, heads, d), None


class _Gather(torch.autograd.Function):
    """x [positions, ...] -> one [examples, width, ...] tensor per group of the layout.

    A padded slot repeats its example's last position. Its gradient is zero: its query's
    output is dropped (_Scatter), and no real query sees it as a key (causal). So each
    position's gradient is the one at its own slot, a gather. Autograd's backward for
    x[index] is a scatter-add (index_put with accumulate), ~110 us a call against ~20 us for
    a gather at SmolLM2's sizes; +1.3% and +3.4% tokens/s over its LoRA blocks (two runs
    alternating both in one process)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return tuple(x[index] for index, _ in layout.groups)

    @staticmethod
    def backward(ctx, *grads):
        flat = [g.reshape(-1, *g.shape[2:]) for g in grads]
        return (torch.cat(flat) if len(flat) > 1 else flat[0])[ctx.layout.slot], None


class _Scatter(torch.autograd.Function):
    """Group outputs [examples x width, ...] -> [positions, ...], padded slots dropped."""

    @staticmethod
    def forward(ctx, layout, *outs):
        ctx.layout, ctx.sizes = layout, [len(o) for o in outs]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out[layout.slot]

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(sum(ctx.sizes), *grad.shape[1:])
        full.index_copy_(0, ctx.layout.slot, grad)
        return (None, *full.split(ctx.sizes))


SMALL = 128  # up to this width, plain matmuls beat the CPU flash kernel's backward (3.6 vs 1.1 ms at 64)


@functools.lru_cache(maxsize=64)
def _hidden(width: int, window: int | None, device) -> torch.Tensor:
    """True where a query may not see a key: the future, and beyond a sliding window."""
    i = torch.arange(width, device=device)
    hidden = i[None, :] > i[:, None]
    if window is not None:
        hidden |= i[:, None] - i[None, :] >= window
    return hidden


def _causal_attention(q, k, v, scale: float, window: int | None, block: int | None = None,
                      lse: torch.Tensor | None = None):
    """Causal attention as two matmuls and a float32 softmax, `block` queries at a time (all
    at once by default) against the keys up to them (and within a sliding window); query
    heads grouped over the shared key/value heads without copying them. Only the block's
    diagonal needs the mask. Blocks of 32 without autograd: 28 vs 42 ms for 64-query blocks
    masked in full, and vs ~33 ms for the CPU flash forward, at 4 x 900 tokens, 9 heads.
    Given `lse` ([n, kv heads, heads per kv head, width], float32), each query's log-sum-exp
    of scores goes there, for _BlockedAttention's backward."""
    n, heads, width, d = q.shape
    groups = k.shape[1]
    rep = heads // groups
    hidden = _hidden(width, window, q.device)
    block = block or width
    outs = []
    for s, e, lo in _blocks(width, block, window):
        scores = _scores(q, k, scale, hidden, s, e, lo, window)
        if lse is None:
            probs = scores.softmax(-1)
        else:
            top = scores.amax(-1, keepdim=True)
            probs = scores.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            lse[..., s:e] = (top + total.log()).squeeze(-1)
            probs.div_(total)
        probs = probs.to(q.dtype).view(n, groups, rep * (e - s), e - lo)
        outs.append((probs @ v[:, :, lo:e]).view(n, heads, e - s, d))
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def _blocks(width: int, block: int, window: int | None):
    """(first query, end, first key) of each block of queries: no query of a block sees a
    key before its first key."""
    for s in range(0, width, block):
        yield s, min(s + block, width), 0 if window is None else max(0, s - window + 1)


def _scores(q, k, scale: float, hidden, s: int, e: int, lo: int, window: int | None):
    """Scaled float32 scores of queries s..e against keys lo..e, -inf where hidden:
    [n, kv heads, heads per kv head, e - s, e - lo]."""
    n, heads, _, d = q.shape
    groups = k.shape[1]
    scores = (q[:, :, s:e].reshape(n, groups, heads // groups * (e - s), d)
              @ k[:, :, lo:e].transpose(-1, -2)).float()
    scores = scores.view(n, groups, heads // groups, e - s, e - lo).mul_(scale)
    edge = s if window is None else lo  # every key before edge is visible to every query here
    scores[..., edge - lo:].masked_fill_(hidden[s:e, edge:e], float("-inf"))
    return scores


class _BlockedAttention(torch.autograd.Function):
    """Causal attention with autograd for examples longer than SMALL: 64 queries at a time
    forward and backward; the backward recomputes each block's probabilities from the
    kept log-sum-exp (as flash attention does). 74-80 vs 89-100 ms for the CPU flash
    kernel's forward and backward at 4 x 900 tokens, 9 heads."""

    BLOCK = 64

    @staticmethod
    def forward(ctx, q, k, v, scale: float, window: int | None):
        n, heads, width, _ = q.shape
        groups = k.shape[1]
        lse = torch.empty(n, groups, heads // groups, width, device=q.device)
        out = _causal_attention(q, k, v, scale, window, _BlockedAttention.BLOCK, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        n, heads, width, d = q.shape
        groups = k.shape[1]
        rep = heads // groups
        hidden = _hidden(width, ctx.window, q.device)
        grad = grad.contiguous()
        delta = (grad.float() * out.float()).sum(-1).view(n, groups, rep, width)  # rowsum(dP * P)
        dq = torch.empty_like(q)
        dk = torch.zeros(n, groups, width, d, device=q.device)
        dv = torch.zeros(n, groups, width, d, device=q.device)
        for s, e, lo in _blocks(width, _BlockedAttention.BLOCK, ctx.window):
            qb = q[:, :, s:e].reshape(n, groups, rep * (e - s), d)
            gb = grad[:, :, s:e].reshape(n, groups, rep * (e - s), d)
            kb, vb = k[:, :, lo:e], v[:, :, lo:e]
            probs = _scores(q, k, ctx.scale, hidden, s, e, lo, ctx.window).sub_(lse[..., s:e, None]).exp_()
            dv[:, :, lo:e] += probs.to(q.dtype).view(n, groups, rep * (e - s), e - lo).transpose(-1, -2) @ gb
            dp = (gb @ vb.transpose(-1, -2)).float().view(n, groups, rep, e - s, e - lo)
            ds = probs.mul_(dp.sub_(delta[..., s:e, None])).mul_(ctx.scale)
            ds = ds.to(q.dtype).view(n, groups, rep * (e - s), e - lo)
            dq[:, :, s:e] = (ds @ kb).view(n, heads, e - s, d)
            dk[:, :, lo:e] += ds.transpose(-1, -2) @ qb
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None
