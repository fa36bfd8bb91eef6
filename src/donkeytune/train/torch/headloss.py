"""Cross-entropy through a frozen LM head, without keeping the logits, reading the head once.

The vocabulary-wide logits are the largest tensor of a training step (tokens x 49k-152k,
in float32), and the head weight is the largest one read (272 MB in bf16 for a 152k
vocabulary). The head is frozen under LoRA, so the only gradient needed is the one for
the hidden states: (softmax - onehot) @ W. Both the loss and that gradient are computed
in the forward pass, a block of the vocabulary at a time with a running maximum and sum
(an online softmax): each block of W is used twice while it is in cache, and only
positions x block logits exist at once. Backward just scales the kept gradient.
"""

from __future__ import annotations

import torch

from .sizes import BLOCK, CHUNK


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, need_grad, packed):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for s in range(0, hidden.shape[0], CHUNK):
            h, t = hidden[s:s + CHUNK], targets[s:s + CHUNK]
            lse, picked, g = _chunk(h, weight, t, softcap, need_grad, packed)
            total += (lse - picked).sum()
            if need_grad:
                grad[s:s + CHUNK] = g
        if need_grad:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def _chunk(h, weight, t, softcap, need_grad, packed=None):
    """log-sum-exp and target logit per position, and the gradient for h. `packed`: per
    vocabulary block, its rows W and W^T in oneDNN's layout (loralinear._pack_head)."""
    n = h.shape[0]
    order = torch.argsort(t)  # positions by target, so each block's targets are one slice
    edges = torch.searchsorted(t[order], torch.arange(0, weight.shape[0] + BLOCK, BLOCK,
                                                      device=h.device)).tolist()
    top = torch.full((n,), float("-inf"), device=h.device)
    norm = torch.zeros(n, device=h.device)
    picked = torch.zeros(n, device=h.device)
    slope = torch.ones(n, device=h.device)  # d(capped logit)/d(logit) at the target
    acc = torch.zeros(n, h.shape[1], device=h.device) if need_grad else None
    for b, v in enumerate(range(0, weight.shape[0], BLOCK)):
        w = weight[v:v + BLOCK]
        logits = (linear_packed(h, packed[b][0]) if packed else h @ w.T).float()
        if softcap:
            squashed = torch.tanh(logits / softcap)
            logits = squashed * softcap
        new_top = torch.maximum(top, logits.amax(1))
        rescale = (top - new_top).exp_()
        e = (logits - new_top[:, None]).exp_()
        norm = norm * rescale + e.sum(1)
        if edges[b] < edges[b + 1]:  # the positions whose target lies in this block
            here = order[edges[b]:edges[b + 1]]
            picked[here] = logits[here, t[here] - v]
            if softcap:
                slope[here] = 1.0 - squashed[here, t[here] - v] ** 2
        if need_grad:
            if softcap:
                e *= 1.0 - squashed * squashed  # d(cap * tanh(z / cap)) / dz
            e = e.to(w.dtype)
            step = linear_packed(e, packed[b][1]) if packed else e @ w
            acc.mul_(rescale[:, None]).add_(step.float())
        top = new_top
    lse = top + norm.log()
    grad = None
    if need_grad:  # softmax @ W - slope * W[target]
        grad = (acc / norm[:, None] - slope[:, None] * weight[t].float()).to(h.dtype)
    return lse, picked, grad


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              softcap: float | None = None, packed=None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` (optionally soft-capped) against `targets`;
    `packed`: the head's blocks in oneDNN's layout, when loralinear.packed made them."""
    if weight.requires_grad:
        raise ValueError("head_loss assumes a frozen LM head (LoRA does not train it)")
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadLoss.apply(hidden, weight.to(hidden.dtype), targets, softcap, need_grad, packed)


def linear_packed(x, packed_weight, bias=None):
    """x W^T with W in oneDNN's blocked layout (loralinear._pack)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")
