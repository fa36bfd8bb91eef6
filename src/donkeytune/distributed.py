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
from dataclasses import dataclass


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


def worker() -> Group | None:
    """The process group when this process is one of several torchrun workers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Group(dist.get_rank(), world, local)


def launch(opts) -> int:
    """Run `train` with these options on opts.devices workers; returns their exit status."""
    import yaml  # noqa: PLC0415

    values = {k: v for k, v in dataclasses.asdict(opts).items() if v is not None}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="donkeytune-", delete=False) as f:
        yaml.safe_dump(values, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={opts.devices}", "-m", "donkeytune", "train", "--config", f.name]
    try:
        return subprocess.call(cmd)  # workers see WORLD_SIZE and do not launch again
    finally:
        os.unlink(f.name)
