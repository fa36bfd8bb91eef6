"""Two workers (torchrun, gloo, on this CPU) train what one process trains on the same global batches."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from donkeytune import config, train
from donkeytune.errors import ConfigError

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} times three?"},
                       {"role": "assistant", "content": f"{i} times three is {3 * i}."}]} for i in range(13)]


def flags(model, data, out):
    # dropout off: each worker draws its own masks, so only a deterministic run can match
    return dict(model=str(model), data_dir=str(data), output_dir=str(out), iters=6, batch_size=4,
                num_layers=2, rank=4, lr=3e-3, scale=2.0, dropout=0.0, dtype="float32",
                steps_per_report=1, steps_per_eval=3, save_every=4)


def step_losses(out):
    rows = [json.loads(x) for x in (out / "report" / "metrics.jsonl").read_text().splitlines()]
    return [r.get("step_loss", r.get("val_loss")) for r in rows if "step_loss" in r or "val_loss" in r]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_workers_match_one_process(fsdp, tiny_model, tmp_path):
    """With --fsdp the frozen block weights are split across the workers (FSDP2): half on each."""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", CHATS[:12])
    write_jsonl(data / "valid.jsonl", CHATS[9:])  # 4 examples: one validation batch, split 2 + 2
    single = tmp_path / "one"
    train.run(config.resolve(config.TrainOptions, flags(tiny_model("llama"), data, single), environ={}))

    multi = tmp_path / "two"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags(tiny_model("llama"), data, multi).items()]
    p = subprocess.run([sys.executable, "-m", "donkeytune", "train", "--devices", "2", *args,
                        *(["--fsdp"] if fsdp else [])], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("Iter 6: Train loss") == 1  # only the first worker reports
    shares = re.findall(r"FSDP: each worker holds ([\d.]+) MB of the ([\d.]+) MB", p.stdout + p.stderr)
    if fsdp:  # said once (by the first worker), from the sizes of its local shards
        [(held, total)] = shares
        assert float(held) == pytest.approx(float(total) / 2, rel=0.05)
    else:
        assert not shares

    want, got = load_file(single / "adapters" / "adapter_model.safetensors"), \
        load_file(multi / "adapters" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-5
    assert any(want[k].abs().max() > 0 for k in want if "lora_B" in k)  # it did train
    assert step_losses(multi) == pytest.approx(step_losses(single), rel=1e-5)
    # one set of files, the same as a single process writes
    names = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())  # noqa: E731
    assert names(multi) == names(single)


def test_fsdp_needs_several_devices():
    with pytest.raises(ConfigError, match="FSDP splits the model across several workers"):
        config.resolve(config.TrainOptions, {"fsdp": True}, environ={})


def test_more_devices_than_examples_per_step_is_refused():
    with pytest.raises(ConfigError, match="BATCH_SIZE=2 is smaller than DEVICES=4"):
        config.resolve(config.TrainOptions, {"devices": 4, "batch_size": 2}, environ={})


def test_gradients_are_summed_like_one_process():
    """The loss normalisation: per-worker sum / global token count, gradients summed."""
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    xs = [torch.randn(5, 3), torch.randn(2, 3)]
    whole = torch.cat(xs) @ w
    (whole.sum() / 7).backward()
    want = w.grad.clone()
    w.grad = None
    total = torch.zeros(3)
    for x in xs:
        (x @ w).sum().div(7).backward()
        total += w.grad
        w.grad = None
    assert torch.allclose(total, want)



@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_worker_run_resumes_on_two_workers(fsdp, tiny_model, tmp_path):
    """`--resume` of a 2-worker run relaunches 2 workers and ends with the uninterrupted adapter."""
    import shutil

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", CHATS[:12])
    full = tmp_path / "full"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags(tiny_model("llama"), data, full).items()]
    p = subprocess.run([sys.executable, "-m", "donkeytune", "train", "--devices", "2", *args,
                        "--save-every=2", "--keep=-1", *(["--fsdp"] if fsdp else [])],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # as if stopped right after the checkpoint at step 4: the same folder, resumed
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "adapters" / "adapter_model.safetensors").unlink()
    p = subprocess.run([sys.executable, "-m", "donkeytune", "train", "--resume", "--output-dir", str(part)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Resuming at iteration 4" in p.stderr
    assert ("FSDP: each worker holds" in p.stdout + p.stderr) == fsdp  # resumed as it was started
    want = load_file(full / "adapters" / "adapter_model.safetensors")
    got = load_file(part / "adapters" / "adapter_model.safetensors")
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6


def test_fewer_examples_than_devices_is_refused(tmp_path):
    """Refused before any model loads or worker starts, with the fix."""
    write_jsonl(tmp_path / "data" / "train.jsonl", CHATS[:1])
    opts = config.resolve(config.TrainOptions, dict(data_dir=str(tmp_path / "data"), devices=2,
                                                    batch_size=2, output_dir=str(tmp_path / "out")),
                          environ={})
    with pytest.raises(ConfigError, match="1 training examples for DEVICES=2") as err:
        train.run(opts)
    assert "DEVICES=1" in err.value.fix
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_process(tiny_model, tmp_path):
    """NNODES=2: two torchrun launches (one CPU worker each, gloo) meeting at 127.0.0.1, as two
    machines would, train what one process trains; only node 0 writes."""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", CHATS[:12])
    write_jsonl(data / "valid.jsonl", CHATS[9:])
    single = tmp_path / "one"
    train.run(config.resolve(config.TrainOptions, flags(tiny_model("llama"), data, single), environ={}))

    multi = tmp_path / "two"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags(tiny_model("llama"), data, multi).items()]
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "donkeytune", "train", *args, "--nnodes=2",
                               f"--node-rank={rank}", "--master-addr=127.0.0.1",
                               f"--master-port={port}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0].count("Iter 6: Train loss") == 1 and "Iter 6" not in outs[1][0]
    want = load_file(single / "adapters" / "adapter_model.safetensors")
    got = load_file(multi / "adapters" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-5
    assert step_losses(multi) == pytest.approx(step_losses(single), rel=1e-5)


def test_rendezvous_backend_and_checks(monkeypatch):
    from donkeytune.train import distributed

    one = config.resolve(config.TrainOptions, {"devices": 2}, environ={})
    assert distributed.rendezvous(one) == ["--standalone", "--nproc-per-node=2"]
    env = {"DONKEYTUNE_NNODES": "2", "DONKEYTUNE_NODE_RANK": "1", "DONKEYTUNE_MASTER_ADDR": "10.0.0.5",
           "DONKEYTUNE_DEVICES": "4", "DONKEYTUNE_BATCH_SIZE": "8"}
    two = config.resolve(config.TrainOptions, {}, environ=env)
    assert two.workers == 8
    assert distributed.rendezvous(two) == ["--nnodes=2", "--node-rank=1", "--nproc-per-node=4",
                                           "--master-addr=10.0.0.5", "--master-port=29500"]
    with pytest.raises(ConfigError, match="needs MASTER_ADDR"):
        config.resolve(config.TrainOptions, {"nnodes": 2}, environ={})
    with pytest.raises(ConfigError, match="NODE_RANK=2 is not one of"):
        config.resolve(config.TrainOptions, {"nnodes": 2, "node_rank": 2, "master_addr": "h"}, environ={})
    with pytest.raises(ConfigError, match="BATCH_SIZE=4 is smaller than DEVICES=4 x NNODES=2"):
        config.resolve(config.TrainOptions, dict(env_opts(env), batch_size=4), environ={})
    # GPUs talk NCCL, CPU processes gloo
    assert distributed.backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.backend() == "nccl"


def env_opts(env: dict) -> dict:
    return {k.removeprefix("DONKEYTUNE_").lower(): v for k, v in env.items()}


def test_memory_check_is_per_worker(tiny_model, tmp_path, capsys):
    """Each worker takes BATCH_SIZE / workers examples; CPU workers on one machine share its RAM."""
    from donkeytune import data as data_mod
    from donkeytune import device
    from donkeytune.train import memory

    tok = device.load_tokenizer(tiny_model("llama"))
    items = [data_mod.tokenize(tok, c["messages"]) for c in CHATS[:8]]
    seen = {}
    real = memory.estimate_training

    def spy(*a, **k):
        seen.setdefault("tokens", k["tokens"])
        return real(*a, **k)

    opts = config.resolve(config.TrainOptions, dict(batch_size=4, devices=2, num_layers=2, rank=4,
                                                    scale=2.0, iters=1, lr=1e-3), environ={})
    monkey = pytest.MonkeyPatch()
    monkey.setattr(memory, "estimate_training", spy)
    monkey.setattr(memory, "available", lambda device="cpu": 8e9)
    try:
        memory.check_training(opts, tiny_model("llama"), items, "cpu", 4)
    finally:
        monkey.undo()
    assert seen["tokens"] == memory.batch_shape(items, 2)[0]  # two of the four examples
    said = capsys.readouterr()
    assert "needed per worker, 4.0 GB available to each of the 2 workers" in said.out + said.err
