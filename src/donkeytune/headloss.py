"""Cross-entropy through a frozen LM head, in chunks, without keeping the logits.

The vocabulary-wide logits are the largest tensor of a training step (tokens x 49k-152k,
in float32). The head is frozen under LoRA, so the only gradient needed is the one for
the hidden states: (softmax - onehot) @ W. It is computed chunk by chunk in the forward
pass, right after the loss, and kept (tokens x hidden, small); backward just scales it.
"""

from __future__ import annotations

import torch

CHUNK = 128  # positions per chunk: 25 MB of float32 logits for a 49k vocabulary, cache-friendly


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, need_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for s in range(0, hidden.shape[0], CHUNK):
            h, t = hidden[s:s + CHUNK], targets[s:s + CHUNK]
            logits = h @ weight.T
            if softcap:
                squashed = torch.tanh(logits.float() / softcap)
                logits = squashed * softcap
            # one fused pass from the (bf16) logits to float32 log-probabilities
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            total -= logp.gather(1, t[:, None]).sum()
            if need_grad:
                probs = logp.exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                if softcap:
                    probs *= 1.0 - squashed * squashed  # d(cap * tanh(z / cap)) / dz
                grad[s:s + CHUNK] = probs.to(weight.dtype) @ weight
        if need_grad:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` (optionally soft-capped) against `targets`."""
    if weight.requires_grad:
        raise ValueError("head_loss assumes a frozen LM head (LoRA does not train it)")
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadLoss.apply(hidden, weight.to(hidden.dtype), targets, softcap, need_grad)
