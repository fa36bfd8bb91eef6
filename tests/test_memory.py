"""Know before you start: the memory estimate, the refusal before loading, the disk check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import write_jsonl
from donkeytune import config
from donkeytune.train import memory
from donkeytune.data import Tokenized
from donkeytune.errors import ConfigError

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152)


def items(n: int, length: int, labelled: int) -> list[Tokenized]:
    return [Tokenized(list(range(length)), [-100] * (length - labelled) + [1] * labelled)
            for _ in range(n)]


def opts(**kw):
    base = dict(iters=10, batch_size=8, num_layers=16, lr=1e-4, rank=16, scale=2.0,
                max_seq_length=2048)
    return config.TrainOptions(**(base | kw))


def test_estimate_grows_with_batch_layers_and_length():
    def total(**kw):
        args = dict(tokens=1024, labelled=400, num_layers=8, rank=8) | kw
        return memory.estimate_training(SMOL, 135_000_000, **args).total

    assert total(tokens=2048, labelled=800) > total() > total(tokens=256, labelled=100)
    assert total(num_layers=16) > total() and total(rank=64) > total()
    e = memory.estimate_training(SMOL, 135_000_000, tokens=1, labelled=1, num_layers=8, rank=8)
    assert e.weights == 270_000_000  # bf16: 2 bytes a parameter
    # LoRA rank 8 on 7 linears of 8 blocks: the 651,264 parameters PEFT reports, x16 bytes
    assert e.lora == 651_264 * 16


def test_fsdp_estimate_holds_a_share_of_the_blocks():
    """SmolLM2: 30 blocks of 3,538,944 linear weights (106.2M) + 28.3M embedding, bf16."""
    blocks = 30 * 3_538_944
    for shards in (2, 4):
        e = memory.estimate_training(SMOL, 135_000_000, tokens=1, labelled=1, num_layers=8, rank=8,
                                     shards=shards)
        # the rest whole, 1/N of the blocks, and one block gathered at a time
        assert e.weights == pytest.approx((135_000_000 - blocks + blocks / shards + blocks / 30) * 2)


def test_packed_estimate_holds_the_adapted_blocks_and_the_head_twice():
    """bf16 on CPU: the 8 adapted blocks' linears and the LM head (49152 x 576) are held as W
    and W^T (loralinear.packed)."""
    e = memory.estimate_training(SMOL, 135_000_000, tokens=1, labelled=1, num_layers=8, rank=8,
                                 packed=True)
    assert e.weights == (135_000_000 + 8 * 3_538_944 + 49152 * 576) * 2


def test_count_params_reads_the_safetensors_headers(tiny_model):
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert memory.count_params(folder) == model.num_parameters()  # tied embeddings counted once


def test_refusal_before_loading_proposes_a_recipe_that_fits(tiny_model):
    folder = tiny_model("llama")
    data = items(8, 1500, 1400)
    cfg = json.loads((folder / "config.json").read_text())

    def need(batch):
        return memory.estimate_training(cfg, memory.count_params(folder), tokens=batch * 1500,
                                        labelled=batch * 1400, num_layers=3, rank=16,
                                        cached_tokens=8 * 1500).total

    limit = (need(8) + need(4)) / 2  # batch 4 fits, 8 does not
    with pytest.raises(memory.OutOfMemory) as e:
        memory.check_training(opts(num_layers=3), folder, data, "cpu", 2, limit=limit)
    text = str(e.value)
    assert "this run needs about" in text and "RAM is available" in text
    assert "fix: use BATCH_SIZE=4 NUM_LAYERS=3 RANK=16 MAX_SEQ_LENGTH=2048" in text
    # an auto recipe steps down by itself instead
    fitted = memory.check_training(opts(num_layers=3), folder, data, "cpu", 2, limit=limit, auto=True)
    assert fitted.batch_size == 4
    assert memory.check_training(opts(), folder, data, "cpu", 2, limit=need(8) * 2).batch_size == 8


def test_nothing_fits_says_so(tiny_model):
    with pytest.raises(memory.OutOfMemory, match="use a smaller model"):
        memory.check_training(opts(), tiny_model("llama"), items(4, 300, 50), "cpu", 2, limit=1e6)


def test_disk_check(tmp_path):
    memory.check_disk(tmp_path / "new" / "folder", 1e3, "fusing")  # fits; the folder need not exist
    with pytest.raises(ConfigError, match=r"fusing needs about .* GB in .*, but only .* GB of disk"):
        memory.check_disk(tmp_path, 1e18, "fusing")


# ---------------------------------------------------------------- calibration (slow)

LONG = ("The donkey co-operative keeps careful records of every animal, every visitor and every "
        "harvest, and the guide explains them at length. ")


def measure_peak_rss(args: list[str]) -> float:
    """Peak RSS (bytes) of `donkeytune ARGS` in a fresh process, load and training included."""
    code = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'donkeytune',"
            " *sys.argv[1:]], capture_output=True, text=True); assert r.returncode == 0, r.stderr;"
            " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [2, 8])
def test_estimate_within_30_percent_of_peak_rss(batch_size, smollm2_dir, tmp_path):
    """SmolLM2-135M, bf16, LoRA on 8 blocks, ~600-token examples: estimate vs measured peak RSS."""
    rows = [{"messages": [{"role": "user", "content": f"Tell me all about record {i}."},
                          {"role": "assistant", "content": f"Record {i}. " + LONG * 20}]}
            for i in range(16)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:2])
    args = ["train", "--model", str(smollm2_dir), "--data-dir", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "out"), "--iters", "3", "--batch-size", str(batch_size),
            "--num-layers", "8", "--rank", "8", "--lr", "1e-4", "--scale", "2",
            "--steps-per-eval", "1000", "--val-batches", "1", "--save-every", "1000", "--force"]
    measured = measure_peak_rss(args)

    from donkeytune import data, device

    tok = device.load_tokenizer(smollm2_dir)
    train_set = data.tokenize_all(tok, data.load_dir(tmp_path / "data").train, 2048, False, "train")
    tokens, labelled = memory.batch_shape(train_set, batch_size)
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    est = memory.estimate_training(cfg, memory.count_params(smollm2_dir), tokens=tokens,
                                   labelled=labelled, num_layers=8, rank=8,
                                   dtype_bytes=2 if device.cpu_has_bf16() else 4,
                                   cached_tokens=sum(len(t.input_ids) for t in train_set),
                                   packed=device.cpu_has_bf16())
    print(f"\nbatch {batch_size}: {tokens} tokens ({labelled} labelled): estimate {est.describe()}, "
          f"measured peak RSS {measured / 1e9:.2f} GB, ratio {est.total / measured:.2f}")
    assert abs(est.total - measured) <= 0.3 * measured


def test_the_cli_bounds_the_kernel_caches_unless_the_user_set_them(monkeypatch, capsys):
    """oneDNN's and ideep's kernel caches are capped (resident memory grew ~14 MB a step
    without); a value the user exported stays."""
    import os

    from donkeytune import cli, device

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    assert cli.main(["models"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == device.KERNEL_CACHE
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
