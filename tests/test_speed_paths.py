"""The fast training path computes what the plain one does: packing, frozen-prefix reuse,
the chunked LM-head loss, and bf16 compute against a float32 reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from donkeytune import config, data, device, train
from donkeytune.train.torch.headloss import head_loss
from donkeytune.train import torch as torch_engine

CHATS = [[{"role": "system", "content": "Be brief."},
          {"role": "user", "content": f"Tell me fact number {i}, please{'!' * i}"},
          {"role": "assistant", "content": f"Fact {i}: the number {i * 7} is {'odd' if i % 2 else 'even'}."}]
         for i in range(12)]


def lora_model(model_dir, dtype=torch.float32, num_layers=2, dropout=0.0):
    opts = config.resolve(config.TrainOptions, dict(iters=1, batch_size=4, num_layers=num_layers, rank=4,
                                                    lr=1e-3, dropout=dropout), environ={})
    model = torch_engine.add_lora(device.load_model(model_dir, "cpu", dtype), opts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def items_for(model_dir):
    tok = device.load_tokenizer(model_dir)
    return [data.tokenize(tok, m) for m in CHATS], tok.pad_token_id


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_examples_do_not_see_each_other(arch, tiny_model):
    """One packed row of 12 examples gives the loss of the 12 examples run one by one."""
    model = lora_model(tiny_model(arch))
    items, pad = items_for(tiny_model(arch))
    with torch.no_grad():
        alone = sum(torch_engine.batch_loss(model, data.collate([x], pad), "cpu")[0].item() for x in items)
        packed_batch = data.collate(items, pad)
        packed = torch_engine.batch_loss(model, packed_batch, "cpu")[0].item()
    assert len(packed_batch.input_ids) == 1  # really packed into one row
    assert packed == pytest.approx(alone, rel=1e-5)


LONG = [{"role": "user", "content": "Count: " + " ".join(str(i) for i in range(70))},
        {"role": "assistant", "content": " ".join(str(i) for i in range(70, 160))}]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_attention_matches_transformers_attention(arch, tiny_model):
    """Our per-example attention (small matmul path, SDPA path for long examples, Gemma's
    sliding window) gives the loss and LoRA gradients of transformers' own SDPA attention
    run on each example alone."""
    model = lora_model(tiny_model(arch))
    assert model.config._attn_implementation == "donkeytune_packed"
    tok = device.load_tokenizer(tiny_model(arch))
    items = [data.tokenize(tok, m) for m in [*CHATS[:5], LONG, CHATS[5]]]
    assert max(len(x.input_ids) for x in items) > 2 * 128  # beyond the small path and the window
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batches):
        total = sum(torch_engine.batch_loss(model, b, "cpu")[0] for b in batches)
        return total.item(), torch.autograd.grad(total, params)

    ours = loss_and_grads([data.collate(items, tok.pad_token_id)])
    model.get_base_model().set_attn_implementation("sdpa")
    stock = loss_and_grads([data.collate([x], tok.pad_token_id) for x in items])
    assert ours[0] == pytest.approx(stock[0], rel=1e-5)
    for a, b in zip(ours[1], stock[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_prefix_cache_replays_the_frozen_blocks(tiny_model):
    model = lora_model(tiny_model("llama"), num_layers=1)
    items, pad = items_for(tiny_model("llama"))
    cache = torch_engine.prefix_cache(model)
    with torch.no_grad():
        first = [torch_engine.batch_loss(model, data.collate(items[i:i + 4], pad), "cpu", cache)[0].item()
                 for i in range(0, 12, 4)]
        assert len(cache.store) == 12
        # other groupings, served from the cache, against no cache at all
        regrouped = [data.collate(items[i:i + 3], pad) for i in range(0, 12, 3)]
        cached = [torch_engine.batch_loss(model, b, "cpu", cache)[0].item() for b in regrouped]
        plain = [torch_engine.batch_loss(model, b, "cpu")[0].item() for b in regrouped]
    assert cached == pytest.approx(plain, rel=1e-5)
    assert sum(first) == pytest.approx(sum(plain), rel=1e-5)


@pytest.mark.parametrize("block", [4096, 64], ids=["one-block", "five-blocks"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_head_loss_matches_cross_entropy(softcap, block, monkeypatch):
    """Several position chunks; the vocabulary in one block, or in 5 (the online softmax)."""
    from donkeytune.train.torch import headloss

    monkeypatch.setattr(headloss, "BLOCK", block)
    torch.manual_seed(0)
    hidden = torch.randn(5000, 32, requires_grad=True)  # more than one chunk
    weight = torch.randn(300, 32) * 2.0  # large logits: the running maximum matters
    targets = torch.randint(0, 300, (5000,))
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits, targets, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, hidden)
    got = head_loss(hidden, weight, targets, softcap)
    (got_grad,) = torch.autograd.grad(got, hidden)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(got_grad, want_grad, atol=1e-5)


def test_head_loss_with_the_head_packed_is_the_plain_one_bit_for_bit():
    """The head's vocabulary blocks in oneDNN's layout (loralinear.packed) give the same
    loss and hidden-state gradient as the plain bf16 head, over three blocks."""
    from donkeytune.train.torch import headloss
    from donkeytune.train.torch import loralinear

    if not loralinear.can_pack(torch.bfloat16, "cpu"):
        pytest.skip("oneDNN bf16 packing is not available on this CPU")
    torch.manual_seed(0)
    weight = (torch.randn(2 * headloss.BLOCK + 300, 64) * 0.5).bfloat16()
    rows = [weight[v:v + headloss.BLOCK] for v in range(0, len(weight), headloss.BLOCK)]
    blocks = [(loralinear._pack(w), loralinear._pack(w.t())) for w in rows]
    hidden = torch.randn(70, 64).bfloat16().requires_grad_()
    targets = torch.randint(0, len(weight), (70,))
    results = []
    for packed in (None, blocks):
        loss = head_loss(hidden, weight, targets, None, packed)
        results.append((loss, torch.autograd.grad(loss, hidden)[0]))
    (plain, plain_grad), (ours, ours_grad) = results
    assert torch.equal(ours, plain) and torch.equal(ours_grad, plain_grad)


def test_bf16_loss_curve_follows_the_float32_reference(tiny_model, tmp_path):
    """50 steps, dropout off: our fast path (bf16 base, autocast, packing, prefix reuse) stays
    within 2% (smoothed over 5 steps) of a float32 run of the same loop on the same batches."""
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"messages": m} for m in CHATS])
    curves = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train.run(config.resolve(config.TrainOptions, dict(
            model=str(tiny_model("llama")), data_dir=str(tmp_path / "data"), output_dir=str(out),
            iters=50, batch_size=4, num_layers=2, lr=3e-3, dropout=0.0, dtype=dtype,
            steps_per_report=10, save_every=100), environ={}))
        rows = [json.loads(x) for x in (out / "report" / "metrics.jsonl").read_text().splitlines()]
        curves[dtype] = [r["step_loss"] for r in rows if "step_loss" in r]
    ref, fast = curves["float32"], curves["bfloat16"]
    assert len(ref) == len(fast) == 50
    assert ref[-1] < 0.8 * ref[0]  # it learns
    for i in range(4, 50):
        r, f = sum(ref[i - 4:i + 1]) / 5, sum(fast[i - 4:i + 1]) / 5
        assert abs(f - r) / r <= 0.02, (i, r, f)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_gap_dropout_drops_each_element_with_probability_p(p):
    from donkeytune.train.torch.dropout import GapDropout

    torch.manual_seed(0)
    layer = GapDropout(p)
    x = torch.ones(1000, 1000, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    dropped = (y == 0).float()
    assert dropped.mean().item() == pytest.approx(p, abs=0.002)  # 1e6 draws: sd <= 0.0005
    assert y.float().mean().item() == pytest.approx(1.0, abs=0.01)
    # the same rate at the start, middle and end of the tensor, and drops independent of
    # the element before (a gap distribution other than Geometric(p) would show here)
    assert dropped.mean(1).view(10, 100).mean(1).sub(p).abs().max().item() < 0.005
    flat = dropped.flatten()
    after_drop = flat[1:][flat[:-1] == 1].mean().item()
    assert after_drop == pytest.approx(p, abs=0.01)
    y.float().sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # no gradient through a dropped element
    assert layer.eval()(x) is x


def test_lora_layers_use_gap_dropout(tiny_model):
    from donkeytune.train.torch.dropout import GapDropout

    opts = config.resolve(config.TrainOptions, dict(iters=1, num_layers=2, rank=4, dropout=0.1), environ={})
    model = torch_engine.add_lora(device.load_model(tiny_model("llama"), "cpu", torch.float32), opts)
    layers = [m for m in model.modules() if isinstance(m, GapDropout)]
    assert len(layers) == 2 * 7 and all(m.p == 0.1 for m in layers)


@pytest.mark.parametrize("width", [65, 128, 200])
@pytest.mark.parametrize("window", [None, 50])
def test_blocked_attention_matches_sdpa(width, window):
    """The no-grad path of frozen blocks: 32 queries at a time, grouped key/value heads, the
    mask on each block's diagonal (and the keys before a sliding window left out)."""
    from donkeytune.train.torch.attention import _causal_attention, _hidden

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, width, 16), torch.randn(3, 2, width, 16), torch.randn(3, 2, width, 16)
    mask = ~_hidden(width, window, q.device)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(_causal_attention(q, k, v, 0.3, window, block=32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 50])
def test_blocked_attention_with_grad_matches_sdpa(window):
    """Long examples under autograd: output and q, k, v gradients (recomputed from the kept
    log-sum-exp, 64 queries at a time) equal SDPA's."""
    from donkeytune.train.torch.attention import _BlockedAttention, _hidden

    torch.manual_seed(0)
    width = 200
    q, k, v = (torch.randn(2, h, width, 16, requires_grad=True) for h in (6, 2, 2))
    weights = torch.randn(2, 6, width, 16)
    results = []
    for attend in (lambda: _BlockedAttention.apply(q, k, v, 0.3, window),
                   lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=~_hidden(width, window, q.device),
                                                          scale=0.3, enable_gqa=True)):
        out = attend()
        q.grad = k.grad = v.grad = None
        (out * weights).sum().backward()
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
