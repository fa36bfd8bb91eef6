"""The benchmark's inputs are what its cases claim (short ~60, long 800-1,000 tokens)."""

from __future__ import annotations

import sys
from pathlib import Path

from donkeytune import data, device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench  # noqa: E402


def test_example_lengths(smollm2_dir):
    tok = device.load_tokenizer(smollm2_dir)
    short = [len(data.tokenize(tok, m).input_ids) for m in bench.examples("short", 40)]
    long = [len(data.tokenize(tok, m).input_ids) for m in bench.examples("long", 40)]
    assert 40 <= sum(short) / len(short) <= 80
    assert 800 <= min(long) and max(long) <= 1000


def test_flops_per_token_of_smollm2(smollm2_dir):
    import json

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    # 30 blocks of ~3.5M weights forward, 8 of them backward, the head on every token
    assert 0.25e9 < bench.flops_per_token(cfg, 1.0) < 0.45e9


def test_second_epoch_case_repeats_the_same_examples():
    """Case d passes twice over 32 examples in the same order; the others never repeat one."""
    d = bench.case_examples(bench.CASES["d"])
    assert len(d) == 64 and d[:32] == d[32:] and len({id(m) for m in d}) == 32
    for name in "abc":
        chats = bench.case_examples(bench.CASES[name])
        assert len({id(m) for m in chats}) == len(chats)
