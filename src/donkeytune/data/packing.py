"""Batching: seeded epochs of examples packed into rows."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .template import IGNORE, Tokenized

PACK_ROW = 1024  # tokens per packed row: short examples share a row, long ones get their own


@dataclass
class Batch:
    """Examples packed into rows. Position ids restart at every example, and no attention
    mask is passed: transformers then builds a block-diagonal causal mask from them, so
    no token attends across an example boundary."""

    input_ids: list[list[int]]
    position_ids: list[list[int]]
    labels: list[list[int]]
    tokens: int  # real (non-padding) tokens
    segments: list[tuple[int, int, int, int]]  # (example key, row, start, length)


def batches(items: list[Tokenized], batch_size: int, seed: int, pad_id: int, *, start_step: int = 0,
            shard: tuple[int, int] = (0, 1)):
    """Endless seeded epochs of BATCH_SIZE examples each, packed; skips the first `start_step`.

    With shard=(rank, workers), each worker gets every workers-th example of each batch.
    """
    rank, world = shard
    step = 0
    epoch = 0
    while True:
        order = list(range(len(items)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            if step >= start_step:
                yield collate([items[j] for j in order[i:i + batch_size]][rank::world], pad_id)
            step += 1
        epoch += 1


def collate(chunk: list[Tokenized], pad_id: int, row_tokens: int = PACK_ROW) -> Batch:
    """Pack examples into rows of at most max(row_tokens, longest) tokens (first fit, longest first)."""
    cap = max(row_tokens, max(len(t.input_ids) for t in chunk))
    rows: list[list[Tokenized]] = []
    for t in sorted(chunk, key=lambda t: -len(t.input_ids)):
        row = next((r for r in rows if sum(len(x.input_ids) for x in r) + len(t.input_ids) <= cap), None)
        if row is None:
            rows.append([t])
        else:
            row.append(t)
    width = max(sum(len(x.input_ids) for x in r) for r in rows)
    ids, pos, labels, segments = [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for x in row:
            segments.append((id(x), r, start, len(x.input_ids)))
            start += len(x.input_ids)
        pad = width - start
        ids.append([i for x in row for i in x.input_ids] + [pad_id] * pad)
        pos.append([k for x in row for k in range(len(x.input_ids))] + list(range(pad)))
        # an example's first token is never predicted (nothing precedes it in its own sequence)
        labels.append([lab for x in row for lab in [IGNORE] + x.labels[1:]] + [IGNORE] * pad)
    return Batch(ids, pos, labels, sum(len(t.input_ids) for t in chunk), segments)
