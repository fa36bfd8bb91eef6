"""Training on several devices with torch.distributed, launched by torchrun.

`donkeytune train --devices N` re-runs itself under `torch.distributed.run` with N workers
(GPUs, or CPU processes with the gloo backend). Each worker takes its share of every
global batch (BATCH_SIZE stays the examples per optimizer step); the LoRA gradients are
summed across workers before the optimizer step, exactly what DDP does for these few
parameters; only worker 0 writes files and prints.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass

LAUNCHER_ENV = "DONKEYTUNE_LAUNCHER_PID"  # set by launch() for its workers: it holds the lock


@dataclass
class Group:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over the workers (every worker gets the result)."""
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)

    def barrier(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()


def backend() -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    import torch  # noqa: PLC0415

    return "nccl" if torch.cuda.is_available() else "gloo"


def worker() -> Group | None:
    """The process group when this process is one of several torchrun workers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        dist.init_process_group(backend=backend())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Group(dist.get_rank(), world, local)


def writer_lock(opts):
    """The output folder's lock (files.folder_lock), taken by the one process that writes there:
    a single process; for several workers the launcher (not its workers), or, under a torchrun
    started by hand, the first worker. Machines other than the first of NNODES write nothing."""
    from ..files import folder_lock  # noqa: PLC0415

    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) > 1:  # a worker, as worker() tells
        if LAUNCHER_ENV in env or env.get("RANK", "0") != "0":
            return nullcontext()
    elif opts.node_rank > 0:
        return nullcontext()
    return folder_lock(opts.output_dir, "train")


def rendezvous(opts) -> list[str]:
    """torchrun's arguments: one machine (--standalone), or machine NODE_RANK of NNODES meeting
    at MASTER_ADDR:MASTER_PORT (static rendezvous: machine k runs workers k*DEVICES and up)."""
    if opts.nnodes == 1:
        return ["--standalone", f"--nproc-per-node={opts.devices}"]
    return [f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}",
            f"--nproc-per-node={opts.devices}", f"--master-addr={opts.master_addr}",
            f"--master-port={opts.master_port}"]


def launch(opts) -> int:
    """Run `train` with these options on this machine's opts.devices workers; returns their exit status."""
    import yaml  # noqa: PLC0415

    values = {k: v for k, v in dataclasses.asdict(opts).items() if v is not None}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="donkeytune-", delete=False) as f:
        yaml.safe_dump(values, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous(opts),
           "-m", "donkeytune", "train", "--config", f.name]
    try:
        # workers see WORLD_SIZE and do not launch again, nor take the lock this process holds
        return subprocess.call(cmd, env=dict(os.environ, **{LAUNCHER_ENV: str(os.getpid())}))
    finally:
        os.unlink(f.name)


def shard_frozen_blocks(model, dev: str) -> tuple[int, int]:
    """FSDP (torch's fully_shard) on every transformer block: each worker keeps 1/N of the
    frozen base weights, and a block's weights are gathered only while the forward or
    backward pass is inside it. The LoRA weights are left out of FSDP: whole on every
    worker, their gradients summed as without FSDP, so checkpoints stay plain.

    Returns the bytes of frozen block weights this worker holds, and their total."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    mesh = init_device_mesh(torch.device(dev).type, (dist.get_world_size(),))
    held = total = 0
    for block in model.get_base_model().get_decoder().layers:
        lora = {p for p in block.parameters() if p.requires_grad}
        # resharded after every forward on every worker, so all of them gather in step (a block
        # that is its own FSDP root would otherwise stay gathered until something reshards it)
        fully_shard(block, mesh=mesh, ignored_params=lora, reshard_after_forward=True)
        for p in block.parameters():
            if not p.requires_grad:
                held += p.to_local().numel() * p.element_size()
                total += p.numel() * p.element_size()
    # the model was loaded on the CPU so that no worker holds all of it on its device; FSDP
    # moved the shards there, the rest (embeddings, final norm, LoRA weights) follows
    for t in [*model.parameters(), *model.buffers()]:
        if not isinstance(t, DTensor) and t.device != torch.device(dev):
            t.data = t.data.to(dev)
    return held, total
