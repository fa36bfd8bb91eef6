"""The block linears of a LoRA step: a LoRA layer as one autograd step, frozen weights packed.

PEFT runs a LoRA layer as separate autograd nodes (base, dropout, A, scaling, B, add) with
autocast copying the fp32 A and B on each use. `_LoraLinear` does the same maths as one step:
the scale goes on the rank-r activation, B's product is added into the base output in place,
and the backward forms the input gradient through the base weight and the adapter together.

On an x86 CPU in bf16, oneDNN reorders a plain weight into its blocked (AVX512-BF16 / AMX)
layout on every matmul; at the ~200-token batches of a LoRA step that is 5-25% of the
matmul (2054 vs 2343 us at 212 x 896 -> 4864; 519 vs 655 us at 54 x 896 -> 4096).
`packed(model)` reorders the frozen block weights once for the duration of training: frozen
blocks use W packed, LoRA layers W packed for the forward and W^T packed for the input
gradient. The plain copies are dropped meanwhile (so memory grows by one copy of the adapted
blocks' weights) and restored bit for bit on exit. Packed and plain products are equal bit
for bit. The LM head is packed too, a vocabulary block at a time (W and W^T), when its plain
weight is mapped from the safetensors file: its pages go back to the file meanwhile and a tied
input embedding reads its rows from there (+7.4% tokens/s on Qwen2.5-0.5B shapes, +8.2% on
SmolLM2-135M, alternating both in one process; one head more in memory).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import mmap
import platform
import sys
import types

import torch
import torch.nn.functional as F

from ... import device
from .dropout import dropped_positions, scale_and_zero
from .headloss import linear_packed as _linear_packed

PACKED = "_donkeytune_packed"  # attribute of a packed layer: (W packed,) or (W, W^T) packed;
# of a packed LM head: [(W, W^T) packed] per headloss.BLOCK rows


class _Base:
    """The frozen part of a LoRA layer: y = x W^T + bias, and the input gradient g W."""

    def __init__(self, layer):
        self.weight, self.bias = layer.weight, layer.bias
        self.packed = getattr(layer, PACKED, None)

    def forward(self, x):
        if self.packed:
            return _linear_packed(x, self.packed[0], self.bias)
        return F.linear(x, self.weight, self.bias)

    def input_grad(self, g):
        return _linear_packed(g, self.packed[1]) if self.packed else g @ self.weight


class _LoraLinear(torch.autograd.Function):
    """base(x) + scale * dropout(x) A^T B^T, for x [..., in]; A [r, in] and B [out, r] in fp32."""

    @staticmethod
    def forward(ctx, x, a, b, base: _Base, scale: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])
        a_, b_ = a.to(x.dtype), b.to(x.dtype)
        drop = dropped_positions(x2.numel(), p, x.device) if p else None
        xd = scale_and_zero(x2, drop, 1.0 / (1.0 - p)) if p else x2
        h = (xd @ a_.t()).mul_(scale)
        y = base.forward(x2).addmm_(h, b_.t())
        ctx.save_for_backward(xd, h, a_, b_, drop)
        ctx.base, ctx.scale, ctx.p, ctx.shape = base, scale, p, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xd, h, a_, b_, drop = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(xd.dtype)
        gh = (g @ b_).mul_(ctx.scale)  # gradient at the rank-r activation
        grad_a = (gh.t() @ xd).float() if ctx.needs_input_grad[1] else None
        grad_b = (g.t() @ h).float() if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.base.input_grad(g)
            if drop is None:
                grad_x.addmm_(gh, a_)
            else:
                grad_x.add_(scale_and_zero(gh @ a_, drop, 1.0 / (1.0 - ctx.p)))
            grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_a, grad_b, None, None, None


def _plain(layer, args, kwargs) -> bool:
    """One active plain LoRA adapter on an nn.Linear: what _LoraLinear computes."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A:
        return False
    dropout = layer.lora_dropout[name]
    return (name not in layer.lora_variant and not layer.fan_in_fan_out
            and type(layer.base_layer) is torch.nn.Linear and layer.lora_B[name].bias is None
            and (isinstance(dropout, torch.nn.Identity)
                 or (isinstance(dropout, torch.nn.Dropout) and dropout.p < 1)))


def _lora_forward(self, x, *args, **kwargs):
    """PEFT lora.Linear.forward, as one autograd step where it is a plain LoRA layer."""
    packed = getattr(self.base_layer, PACKED, None)
    if not _plain(self, args, kwargs):
        if packed:
            raise RuntimeError("a packed LoRA layer can only run as a plain adapter; unpack first")
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    elif packed:
        x = x.to(torch.bfloat16)
    with torch.autocast(dev, enabled=False):
        return _LoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight,
                                 _Base(self.base_layer), self.scaling[name], p)


def use_fused_lora(model) -> None:
    """Run every PEFT LoRA linear of `model` through _LoraLinear (other layers fall back)."""
    from peft.tuners.lora import Linear  # noqa: PLC0415

    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_lora_forward, module)


# ---------------------------------------------------------------- packed weights

def can_pack(dtype, device) -> bool:
    """oneDNN packing applies: bf16 on an x86 CPU whose oneDNN has bf16 matmuls."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return False
    return _onednn_bf16_packs()


@functools.cache
def _onednn_bf16_packs() -> bool:
    """This machine's oneDNN packs bf16 weights and computes with them (checked once)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        w = torch.linspace(-1, 1, 48 * 40).sin().view(48, 40).bfloat16()  # not from the RNG: the
        x = torch.linspace(-1, 1, 3 * 40).cos().view(3, 40).bfloat16()  # dropout masks stay the same
        return torch.equal(_linear_packed(x, _pack(w)), F.linear(x, w))
    except (RuntimeError, AttributeError, TypeError):  # a torch without these private ops
        return False


def _pack(weight):
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 256)


def _file_pages() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from safetensors files (Linux)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _pages(tensor) -> tuple[int, int]:
    """The address range of the memory pages lying wholly inside `tensor`."""
    page = mmap.PAGESIZE
    return -(-tensor.data_ptr() // page) * page, (tensor.data_ptr() + tensor.nbytes) // page * page


def _in_file(tensor, mapped: list[tuple[int, int]]) -> bool:
    lo, hi = _pages(tensor)
    return hi > lo and any(a <= lo and hi <= b for a, b in mapped)


def _release(tensor, mapped: list[tuple[int, int]]) -> None:
    """Hand the pages of a weight read from a memory-mapped safetensors file back to the kernel.

    Dropping the tensor does not unmap them (the file's other tensors keep the mapping), so
    they would stay in the process's resident memory next to the packed copy. The bytes stay
    in the file: a later read maps them in again (a change made in place after loading would
    be lost, but frozen weights are never changed, and the restore copies from the packed one).
    Only pages wholly inside the tensor are handed back.
    """
    if _in_file(tensor, mapped):
        lo, hi = _pages(tensor)
        ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


def _pack_head(head, mapped: list[tuple[int, int]]) -> bool:
    """Pack a frozen bf16 LM head a vocabulary block at a time (headloss.BLOCK rows), W for
    the logits and W^T for the hidden states' gradient, when its plain pages can be handed
    back to the file meanwhile: then it costs one head more, not two (the plain weight stays
    readable: a tied input embedding, or the target rows headloss reads, map back in alone).
    """
    from .headloss import BLOCK  # noqa: PLC0415

    w = getattr(head, "weight", None)
    if (type(head) is not torch.nn.Linear or w is None or w.requires_grad
            or w.dtype != torch.bfloat16 or head.bias is not None or not _in_file(w, mapped)):
        return False
    blocks = []
    for v in range(0, w.shape[0], BLOCK):
        rows = w[v:v + BLOCK]
        blocks.append((_pack(rows), _pack(rows.t())))
        _release(rows, mapped)  # block by block: the plain head is never resident beside both copies
    _release(w, mapped)  # the pages the blocks share
    setattr(head, PACKED, blocks)
    return True


def _frozen_forward(self, x):
    return _linear_packed(x.to(torch.bfloat16), getattr(self, PACKED)[0], self.bias)


@contextlib.contextmanager
def packed(model):
    """Within this block, the frozen linears of the transformer blocks hold their weights in
    oneDNN's blocked layout (when `can_pack`); their plain weights are restored on exit."""
    from peft.tuners.lora import Linear  # noqa: PLC0415

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = causal.get_decoder().layers
    first = next((p for p in layers.parameters() if not p.requires_grad), None)
    if first is None or not can_pack(first.dtype, first.device):
        yield
        return
    lora_bases = {id(m.base_layer) for m in layers.modules() if type(m) is Linear}
    uses = collections.Counter(id(p) for _, p in causal.named_parameters(remove_duplicate=False))
    mapped = _file_pages() if sys.platform == "linux" else []
    done = []
    try:
        for m in layers.modules():
            w = getattr(m, "weight", None)
            if (type(m) is not torch.nn.Linear or w.requires_grad or w.dtype != torch.bfloat16
                    or uses[id(w)] > 1):  # a weight shared with another layer stays as it is
                continue
            if id(m) in lora_bases:
                setattr(m, PACKED, (_pack(w), _pack(w.t())))
            else:
                setattr(m, PACKED, (_pack(w),))
                m.forward = types.MethodType(_frozen_forward, m)
            done.append((m, w.shape))
            _release(w, mapped)
            w.data = w.data.new_empty(0)  # the plain copy goes while packed
        head = causal.get_output_embeddings()
        if _pack_head(head, mapped):
            done.append((head, None))
    except (RuntimeError, TypeError):  # a layer oneDNN will not take: train with plain weights
        _unpack(done)
        done = []
    # packing from a transposed view leaves a copy of each weight on the heap (260 MB for
    # Qwen2.5-0.5B's head W^T): hand it back
    device.trim_memory()
    try:
        yield
    finally:
        _unpack(done)


def _unpack(done) -> None:
    for m, shape in done:
        if shape is not None:  # the head kept its plain weight
            m.weight.data = getattr(m, PACKED)[0].to_dense().view(shape)
        delattr(m, PACKED)
        m.__dict__.pop("forward", None)
