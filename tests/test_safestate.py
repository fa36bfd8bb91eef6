"""Issue 20: no pickle in a run folder, one train run per output folder, no output over its input."""

from __future__ import annotations

import shutil

import pytest

from donkeytune.cli import main
from donkeytune.errors import ModelError


def test_quantize_onto_its_own_input_is_refused(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(range(200)))
    before = src.read_bytes()
    (tmp_path / "link.gguf").symlink_to(src)
    for out in (src, tmp_path / "." / "m.gguf", tmp_path / "link.gguf"):
        assert main(["quantize", str(src), str(out), "--type", "Q8_0"]) == 2
        assert "would destroy the input" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "m.gguf"]


def test_export_over_a_file_of_its_input_folder_is_refused(tiny_model, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_model("llama"), hf)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for name in ("model.safetensors", "config.json"):
        assert main(["export", str(hf), str(hf / name)]) == 2
        err = capsys.readouterr().err
        assert "would destroy the input" in err and name in err
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before


# ------------------------------------------------------------ 1. no pickle in the trainer state

class _RunsCode:
    """Unpickling this creates `path`: a stand-in for any code a planted pickle would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _trained_run(tiny_model, tmp_path):
    from conftest import write_jsonl
    from donkeytune import config, train

    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(6)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:2])
    flags = dict(model=str(tiny_model("llama")), data_dir=str(tmp_path / "data"),
                 output_dir=str(tmp_path / "out"), iters=4, batch_size=2, num_layers=1,
                 steps_per_eval=100, save_every=2, dtype="float32")
    train.run(config.resolve(config.TrainOptions, flags, environ={}))
    return sorted((tmp_path / "out" / "adapters" / "checkpoints").iterdir())[-1]


def test_a_planted_pickle_is_refused_and_never_runs(tiny_model, tmp_path, capsys):
    import pickle

    import torch
    from safetensors.torch import save_file

    checkpoint = _trained_run(tiny_model, tmp_path)
    good = checkpoint / "trainer_state.safetensors"
    assert good.is_file() and not (checkpoint / "trainer_state.pt").exists()
    marker = tmp_path / "ran"
    resume = ["train", "--resume", "--output-dir", str(tmp_path / "out")]
    planted = {
        "pickle as the new name": lambda: good.write_bytes(pickle.dumps(_RunsCode(marker))),
        "torch.save as the new name": lambda: torch.save({"x": _RunsCode(marker)}, good),
        "an older run's trainer_state.pt": lambda: torch.save(
            {"iteration": 2, "x": _RunsCode(marker)}, checkpoint / "trainer_state.pt"),
        "safetensors without our metadata": lambda: save_file({"rng/torch": torch.zeros(3)}, str(good)),
        "truncated": lambda: good.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""),
    }
    for case, plant in planted.items():
        for f in ("trainer_state.pt", "trainer_state.safetensors"):
            (checkpoint / f).unlink(missing_ok=True)
        plant()
        assert main(resume) == 2, case
        err = capsys.readouterr().err
        assert "it is not loaded" in err and "--force" in err, (case, err)
        assert not marker.exists(), case
        assert ("is a pickle" in err) == ("pickle" in case or "torch.save" in case or ".pt" in case), case


def test_the_trainer_state_round_trips_without_pickle(tmp_path):
    import random

    import torch
    from donkeytune.train import adapter

    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW(params, lr=0.1)
    params[0].grad, params[1].grad = torch.ones(2, 3), torch.ones(3)
    opt.step()
    state = adapter.trainer_state(9, opt)
    adapter.write_state(state, tmp_path / "trainer_state.safetensors")
    tensors, meta = adapter.read_state(tmp_path)
    assert meta["iteration"] == 9 and meta["workers"] == 1
    assert torch.equal(tensors["optimizer/0/exp_avg"], opt.state[params[0]]["exp_avg"])
    assert torch.equal(tensors["rng/torch"], torch.get_rng_state())
    assert tuple(meta["python_rng"][1]) == random.getstate()[1]


def test_a_state_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """safetensors begins with its header's length: 1 time in 256 its first byte is pickle's 0x80."""
    import torch
    from donkeytune.train import adapter

    params = [torch.nn.Parameter(torch.zeros(2, 3))]
    opt = torch.optim.AdamW(params, lr=0.1)
    path = tmp_path / "trainer_state.safetensors"
    state = adapter.trainer_state(3, opt)
    for pad in range(512):  # a scalar of the optimizer's state, one byte longer each time
        state["optimizer"]["state"][0] = {"note": "x" * pad}
        adapter.write_state(state, path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert adapter.read_state(tmp_path)[1]["scalars"]["0"]["note"] == "x" * pad
    path.write_bytes(b"\x80\x04" + bytes(200))  # a real pickle's start is still refused
    with pytest.raises(ModelError, match="is a pickle"):
        adapter.read_state(tmp_path)
