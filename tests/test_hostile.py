"""Hostile and careless input (issue 20): each case gets the clear error, nothing written or lost."""

from __future__ import annotations

import pytest

from donkeytune import progress


@pytest.mark.parametrize("env, speaks", [
    ({"RANK": "16"}, True),  # `make train RANK=16`: the LoRA rank, not a worker
    ({"RANK": "16", "WORLD_SIZE": "2"}, True),
    ({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, False),  # torchrun's second worker
    ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, True),
    ({"RANK": "3", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}, True),
])
def test_rank_from_the_environment_silences_only_torchrun_workers(monkeypatch, capsys, env, speaks):
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    progress.say("Adapter saved")
    assert ("Adapter saved" in capsys.readouterr().err) == speaks
