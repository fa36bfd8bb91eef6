"""The one-step RMSNorm computes what transformers' norm does, forward and backward."""

from __future__ import annotations

import pytest
import torch

from donkeytune.train.torch import blockops
from test_speed_paths import lora_model


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_matches_transformers(arch, dtype, tiny_model):
    """Output equal bit for bit; the input gradient within float32 (bf16: one bf16 step) of
    autograd through transformers' own forward; the input is left as it was."""
    model = lora_model(tiny_model(arch), dtype)
    norms = _norms(model)
    assert norms and all("forward" in m.__dict__ for m in norms)  # every norm runs fused
    norm = norms[-2]  # a trained block's post-attention norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.numel()))
    torch.manual_seed(0)
    x = (torch.randn(2, 7, norm.weight.numel()) * 3).to(dtype)
    g = torch.randn(2, 7, norm.weight.numel()).to(dtype)
    outs = []
    for forward in (norm, lambda t: type(norm).forward(norm, t)):
        xi = x.clone().requires_grad_()
        y = forward(xi)
        y.backward(g)
        assert torch.equal(xi.detach(), x)
        outs.append((y.detach(), xi.grad, type(y.grad_fn).__name__))
    (y, gx, node), (y_ref, gx_ref, _) = outs
    assert node == "_RMSNormBackward"  # really ours
    assert torch.equal(y, y_ref)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=tol, atol=tol * gx_ref.abs().max().item())


def test_norms_it_cannot_reproduce_keep_their_forward(tiny_model):
    """Gemma's norm (x̂ * (1 + weight)) is left to transformers."""
    model = lora_model(tiny_model("gemma3"))
    assert not any("forward" in m.__dict__ for m in _norms(model))
    norm = _norms(model)[0]
    assert not blockops._reproduces(norm) if hasattr(norm, "variance_epsilon") else True
