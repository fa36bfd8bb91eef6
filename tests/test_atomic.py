"""A writer killed at any moment (SIGKILL) leaves the old file or the new one, never a truncated
one under the final name: GGUF export, quantization, adapter save, merged data."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Each writer rewrites the same final file(s) in a loop, so a kill lands at a random point of a
# write; the final names must then hold exactly what a complete write produces.
WRITERS = {
    "gguf export": """
        from donkeytune import gguf
        print("ready", flush=True)
        while True:
            gguf.export(MODEL, OUT / "m.gguf", "f16")
    """,
    "quantize": """
        from donkeytune import gguf
        from donkeytune.gguf import quantize
        gguf.export(MODEL, OUT / "src.gguf", "f32")
        print("ready", flush=True)
        while True:
            quantize.quantize(OUT / "src.gguf", OUT / "m.gguf", "Q8_0")
    """,
    "adapter save": """
        import torch
        from donkeytune import config, device, train
        from donkeytune.train import torch as torch_engine
        from donkeytune.train import adapter
        opts = config.resolve(config.TrainOptions, dict(iters=1, batch_size=1, num_layers=2, rank=4,
                              lr=1e-3, output_dir=str(OUT)), environ={})
        model = torch_engine.add_lora(device.load_model(MODEL, "cpu", torch.float32), opts)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_()
        print("ready", flush=True)
        while True:
            adapter.save_adapter(model, OUT, {"stage": "train"}, checkpoint=7,
                                 state=adapter.trainer_state(7, torch.optim.AdamW(model.parameters())))
    """,
    "merged data": """
        from donkeytune import files
        text = "".join('{"messages": [{"role": "user", "content": "q%d"}, '
                       '{"role": "assistant", "content": "%s"}]}\\n' % (i, "a" * 500) for i in range(20000))
        print("ready", flush=True)
        while True:
            files.write_atomic(OUT / "train.jsonl", text)
    """,
}
FINAL = {"gguf export": ["m.gguf"], "quantize": ["m.gguf"],
         "adapter save": ["adapter_model.safetensors", "adapters.safetensors", "donkeytune.json",
                          "checkpoints/0000007/adapter_model.safetensors",
                          "checkpoints/0000007/trainer_state.safetensors"],
         "merged data": ["train.jsonl"]}


def start(name: str, model: Path, out: Path) -> subprocess.Popen:
    code = f"from pathlib import Path\nMODEL = Path({str(model)!r})\nOUT = Path({str(out)!r})\n"
    code += textwrap.dedent(WRITERS[name])
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def snapshot(out: Path, names) -> dict:
    return {n: (out / n).read_bytes() for n in names if (out / n).exists()}


@pytest.mark.parametrize("name", list(WRITERS))
def test_kill_never_leaves_a_partial_file(name, tiny_model, tmp_path):
    model = tiny_model("llama")
    names = FINAL[name]
    # a reference: let one complete write happen, then stop
    ref_dir = tmp_path / "ref"
    proc = start(name, model, ref_dir)
    deadline = time.time() + 120
    while not all((ref_dir / n).exists() for n in names):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reference = snapshot(ref_dir, names)

    rng = random.Random()
    for trial in range(4):
        out = tmp_path / f"t{trial}"
        proc = start(name, model, out)
        assert proc.stdout.readline().strip() == "ready"  # imports done: the kill lands in the writes
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = snapshot(out, names)
        for n, content in got.items():
            if n == "donkeytune.json" or n.endswith("trainer_state.safetensors"):
                assert len(content) > 0  # torch/json files carry no fixed bytes: complete = loadable
                continue
            assert content == reference[n], f"{name}: {n} is not a complete write (trial {trial})"
        if "checkpoints/0000007/trainer_state.safetensors" in got:
            from donkeytune.train import adapter

            assert adapter.read_state(out / "checkpoints/0000007")[1]["iteration"] == 7
