"""Reusing the frozen blocks' work across epochs.

LoRA trains only the last NUM_LAYERS blocks; the blocks below see the same weights and
the same example every epoch, so their output for an example never changes. The first
time an example passes, the output of the last frozen block is kept (per example, in the
model's dtype); when every example of a batch is known, the frozen blocks are skipped and
the kept outputs are laid out as the packed batch would have produced them.

Examples attend only to themselves (packing restarts positions), so an example's hidden
states do not depend on the batch it came in.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

BUDGET_BYTES = 1 << 30  # beyond this, further examples are recomputed every epoch


class PrefixCache:
    def __init__(self, decoder, first_trainable: int, budget_bytes: int = BUDGET_BYTES):
        self.store: dict[int, torch.Tensor] = {}
        self.budget = budget_bytes
        self.used = 0
        self._segments = None
        self._replay = None
        self._fill_only = False
        frozen = list(decoder.layers[:first_trainable])
        for i, layer in enumerate(frozen):
            layer.forward = self._wrap(layer.forward, last=i == len(frozen) - 1)

    def _wrap(self, forward, last: bool):
        def run(hidden_states, *args, **kwargs):
            if self._replay is not None:  # all known: skip the block
                return self._replay if last else hidden_states
            out = forward(hidden_states, *args, **kwargs)
            if last and self._segments is not None:
                self._keep(out)
                if self._fill_only:
                    raise _Filled
            return out

        return run

    @contextmanager
    def batch(self, segments: list[tuple[int, int, int, int]], shape):
        """Within this block, the decoder works on a batch of (key, row, start, length) segments."""
        self._segments = segments
        if segments and all(key in self.store for key, *_ in segments):
            sample = self.store[segments[0][0]]
            replay = sample.new_zeros(*shape, sample.shape[-1])
            for key, row, start, length in segments:
                replay[row, start:start + length] = self.store[key]
            self._replay = replay
        try:
            yield
        finally:
            self._segments = self._replay = None

    def fill(self, segments, shape, run_decoder) -> None:
        """Run only the frozen blocks of `run_decoder()` for a batch and keep their outputs.

        A resumed run refills the cache with the batches of its first epoch, so that every
        example gets the very values the interrupted run had computed (bit for bit).
        """
        self._fill_only = True
        try:
            with self.batch(segments, shape):
                run_decoder()
        except _Filled:
            pass
        finally:
            self._fill_only = False

    def _keep(self, out: torch.Tensor) -> None:
        for key, row, start, length in self._segments:
            if key in self.store:
                continue
            value = out[row, start:start + length].detach().clone()
            size = value.numel() * value.element_size()
            if self.used + size > self.budget:
                return
            self.store[key] = value
            self.used += size


class _Filled(Exception):
    """Raised past the last frozen block when only filling the cache."""
