"""The one-step LoRA layer computes what PEFT's layer does; packed weights train the same
adapter and come back unchanged."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from peft.tuners.lora import Linear

from donkeytune import config, data, device
from donkeytune.train.torch import loralinear
from donkeytune.train import torch as torch_engine
from test_speed_paths import CHATS
from test_speed_paths import lora_model as speed_paths_model


def lora_model(model_dir, dtype, dropout):
    """test_speed_paths' LoRA model, in training mode (dropout on)."""
    return speed_paths_model(model_dir, dtype, dropout=dropout).train()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's q/k/v have a bias
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_one_step_lora_layer_matches_peft(arch, dtype, dropout, tiny_model):
    """Output and the gradients of x, A and B equal PEFT's forward and backward in float32,
    with the same dropout mask (both draw the dropped positions from the same generator
    state); in bf16 within bf16 rounding (PEFT's own bf16 run is 0.2-0.7% off there)."""
    model = lora_model(tiny_model(arch), dtype, dropout)
    layers = [m for m in model.modules() if type(m) is Linear]
    assert layers and all("forward" in m.__dict__ for m in layers)  # every LoRA linear runs fused
    for layer in (layers[0], layers[-1]):  # q_proj (with a bias in qwen2), down_proj
        ours = _run(layer, lambda x: layer(x), dtype)
        layer.base_layer.float()
        want = _run(layer, lambda x: Linear.forward(layer, x), torch.float32)  # PEFT, float32
        layer.base_layer.to(dtype)
        for got, ref in zip(ours, want):
            assert (got - ref).abs().max() <= (1e-4 if dtype == torch.float32 else 1e-2) * ref.abs().max()


def _run(layer, forward, dtype):
    """Output, and the gradients of input, A and B, of one LoRA layer."""
    torch.manual_seed(1)
    x = torch.randn(2, 9, layer.in_features, dtype=torch.bfloat16).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = forward(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = [y.float(), x.grad.float(), a.grad, b.grad]
    a.grad = b.grad = None
    return out


def _train(model, items, pad, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for s in range(steps):
        loss, n = torch_engine.batch_loss(model, data.collate(items[s * 4 % 12:s * 4 % 12 + 4], pad), "cpu")
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / n)
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: packed linears with a bias
def test_packed_weights_train_the_same_adapter_and_come_back(arch, tiny_model):
    if not loralinear.can_pack(torch.bfloat16, "cpu"):
        pytest.skip("oneDNN bf16 packing is not available on this CPU")
    folder = tiny_model(arch)
    tok = device.load_tokenizer(folder)
    items = [data.tokenize(tok, m) for m in CHATS]
    runs = []
    for pack in (False, True):
        torch.manual_seed(0)
        model = lora_model(folder, torch.bfloat16, 0.1)
        before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
        with loralinear.packed(model) if pack else contextlib.nullcontext():
            if pack:  # really packed: the plain block weights are gone meanwhile
                blocks = model.get_base_model().get_decoder().layers
                frozen = [m.weight for m in blocks.modules()
                          if type(m) is torch.nn.Linear and not m.weight.requires_grad]
                assert len(frozen) == 3 * 7 and all(w.numel() == 0 for w in frozen)
            losses = _train(model, items, tok.pad_token_id, 6)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())  # restored bit for bit
        runs.append((losses, {k: v.float() for k, v in after.items() if "lora" in k}))
    (plain, plain_lora), (packed, packed_lora) = runs
    assert plain[-1] < plain[0]
    assert packed == pytest.approx(plain, rel=1e-3)
    for k, v in plain_lora.items():
        torch.testing.assert_close(packed_lora[k], v, rtol=1e-2, atol=1e-3)


def _mapped_rss() -> int:
    """Resident bytes of this process's safetensors file mappings."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(".safetensors")
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def test_packing_hands_the_file_mapped_weights_back(smollm2_dir):
    """SmolLM2 loads memory-mapped: while packed, the 30 blocks' plain linear weights
    (212 MB in bf16) and its tied LM head (57 MB) leave the process's resident memory; a
    step on the packed model gives the plain one's loss and LoRA gradients bit for bit."""
    if not loralinear.can_pack(torch.bfloat16, "cpu") or not sys.platform.startswith("linux"):
        pytest.skip("needs oneDNN bf16 packing on Linux")
    opts = config.resolve(config.TrainOptions, dict(iters=1, num_layers=8, rank=4), environ={})
    model = torch_engine.add_lora(device.load_model(smollm2_dir, "cpu", torch.bfloat16), opts)
    causal = model.get_base_model()
    with torch.no_grad():
        for p in causal.parameters():
            p.sum()  # read as a forward pass would: the pages come in
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()  # the same forward twice: no dropout
    tok = device.load_tokenizer(smollm2_dir)
    batch = data.collate([data.tokenize(tok, m) for m in CHATS[:4]], tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss, n = torch_engine.batch_loss(model, batch, "cpu")
        return loss.item() / n, torch.autograd.grad(loss / n, params)

    plain = loss_and_grads()
    weight_bytes = 30 * 3_538_944 * 2 + 49152 * 576 * 2
    before = _mapped_rss()
    assert before >= weight_bytes
    with loralinear.packed(model):
        during = _mapped_rss()
        head = causal.get_output_embeddings()
        assert len(getattr(head, loralinear.PACKED)) == 12  # 49152 rows, 4096 at a time
        packed = loss_and_grads()
    assert before - during >= 0.95 * weight_bytes
    assert not hasattr(head, loralinear.PACKED)
    assert packed[0] == plain[0]  # the packed products are the plain ones, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(packed[1], plain[1]))


def test_packing_leaves_a_float32_model_alone(tiny_model):
    model = lora_model(tiny_model("llama"), torch.float32, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with loralinear.packed(model):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_layer_onednn_refuses_leaves_every_weight_plain(tiny_model, monkeypatch):
    """Packing stops at the first refusal and undoes what it did; training goes on unpacked."""
    if not loralinear.can_pack(torch.bfloat16, "cpu"):
        pytest.skip("oneDNN bf16 packing is not available on this CPU")
    model = lora_model(tiny_model("llama"), torch.bfloat16, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls, pack = [], loralinear._pack

    def refuse_the_fifth(weight):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("could not create a primitive descriptor")
        return pack(weight)

    monkeypatch.setattr(loralinear, "_pack", refuse_the_fifth)
    with loralinear.packed(model):
        assert len(calls) == 5
        assert not any(hasattr(m, loralinear.PACKED) or "forward" in m.__dict__
                       for m in model.modules() if type(m) is torch.nn.Linear)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        tok = device.load_tokenizer(tiny_model("llama"))
        items = [data.tokenize(tok, m) for m in CHATS]
        assert _train(model, items, tok.pad_token_id, 2)[0] > 0
