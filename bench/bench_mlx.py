"""DonkeyTune's MLX engine against mlx-lm's own `lora`, on the same model, data and settings.

Both train a tiny random Llama (SmolLM2's tokenizer, float32) on the single-turn chats of
examples/facts, loss on the assistant turn only (mlx-lm: --mask-prompt), with the same LoRA
(every linear layer of the last NUM_LAYERS blocks, rank, scale, dropout), Adam, batch and
steps, and a one-batch validation at the start and the end. Each run is its own process; the
two alternate (mlx-lm, ours, mlx-lm, ours, ...) and each round is compared within itself, since
the machine's speed drifts. On Linux this is MLX's CPU build, slow in absolute terms (hence the
tiny model); on a Mac it runs on the GPU.

    python bench/bench_mlx.py              # or: make bench ENGINE=mlx
    python bench/bench_mlx.py --rounds 3 --iters 30

Counted the same way for both: tokens = the non-padding tokens of the training batches (mlx-lm's
own tokens/s counts the trained tokens only); time = the training steps (validation excluded),
as both report it; wall = the whole process (imports, load, train, save); peak = MLX's peak
allocation (mx.get_peak_memory) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "examples" / "facts"
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
            intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True,
            max_position_embeddings=2048)
SETTINGS = dict(batch_size=4, num_layers=4, rank=8, scale=10.0, dropout=0.05, lr=1e-4, seed=0)


def inputs(work: Path) -> tuple[Path, Path]:
    """The tiny model and the data folder, built once."""
    from donkeytune import models

    model = models.cache_dir() / "bench" / "tiny-llama-256"
    if not (model / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
        spec = dict(TINY)
        config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok),
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **spec)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model)
        tok.save_pretrained(model)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows = [json.loads(x) for x in (FACTS / f"{split}.jsonl").read_text().splitlines() if x.strip()]
        rows = [r for r in rows if len(r["messages"]) == 3]  # system, user, assistant
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


# ---------------------------------------------------------------- the two engines (child processes)

def run_mlx_lm(model: Path, data: Path, out: Path, iters: int, report: int) -> dict:
    import types
    from functools import partial

    import mlx.core as mx
    import numpy as np
    from mlx_lm import lora
    from mlx_lm.utils import load
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback

    tokens, windows = [0], []

    def counting(*a, **k):  # the training batches' real tokens: (offset, length) per row
        for batch, lengths in trainer.iterate_batches(*a, **k):
            if k.get("loop"):
                tokens[0] += int(lengths[:, 1].sum().item())
            yield batch, lengths

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            windows.append(dict(iter=info["iteration"], seconds=report / info["iterations_per_second"],
                                loss=info["train_loss"]))

    lora.train = partial(trainer.train, iterate_batches=counting)
    s = SETTINGS
    args = dict(lora.CONFIG_DEFAULTS, model=str(model), train=True, data=str(data), iters=iters,
                batch_size=s["batch_size"], num_layers=s["num_layers"], learning_rate=s["lr"],
                steps_per_report=report, steps_per_eval=10 * iters, val_batches=1,
                save_every=10 * iters, adapter_path=str(out), mask_prompt=True, seed=s["seed"],
                lora_parameters=dict(rank=s["rank"], scale=s["scale"], dropout=s["dropout"]),
                optimizer_config={"adam": {}})
    args = types.SimpleNamespace(**args)  # lora.run, with our callback (run drops the one it is given)
    np.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = lora.load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, Record())
    return dict(windows=windows, tokens=tokens[0], mx_peak_gb=mx.get_peak_memory() / 1e9)


def run_ours(model: Path, data: Path, out: Path, iters: int, report: int, extra: dict,
             variant: dict) -> dict:
    import mlx.core as mx

    from donkeytune import config, train
    from donkeytune.train import loop
    from donkeytune.train import mlx as engine

    for name, value in variant.items():  # COMPILE, LENGTH_GROUPED, HEAD_ON_LABELLED: off to measure
        setattr(engine, name, value)

    s = SETTINGS
    opts = config.resolve(config.TrainOptions, dict(
        model=str(model), data_dir=str(data), output_dir=str(out), iters=iters,
        batch_size=s["batch_size"], num_layers=s["num_layers"], rank=s["rank"], scale=s["scale"],
        dropout=s["dropout"], lr=s["lr"], seed=s["seed"], steps_per_report=report,
        steps_per_eval=10 * iters, val_batches=1, save_every=10 * iters, dtype="float32",
        engine="mlx", force=True, **extra), environ={})
    train.run(opts)
    rows = [json.loads(x) for x in loop.metrics_file(opts).read_text().splitlines()]
    rows = [r for r in rows if "its" in r]
    windows, tokens, last = [], 0, 0
    for r in rows:
        seconds = (r["iter"] - last) / r["its"]
        windows.append(dict(iter=r["iter"], seconds=seconds, loss=r["train_loss"]))
        tokens += r["tokens_per_sec"] * seconds
        last = r["iter"]
    return dict(windows=windows, tokens=round(tokens), mx_peak_gb=mx.get_peak_memory() / 1e9)


# ---------------------------------------------------------------- the driver

def measure(engine: str, args, extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--iters", str(args.iters),
           "--report", str(args.report), "--work", args.work, "--ours-options", extra, "--variant", args.variant]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{engine} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    seconds = sum(w["seconds"] for w in r["windows"])
    return dict(r, wall_s=wall, train_s=seconds, its=args.iters / seconds, tokens_per_s=r["tokens"] / seconds,
                final_loss=r["windows"][-1]["loss"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--report", type=int, default=5, help="steps per report window (divides --iters)")
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "mlx"))
    p.add_argument("--ours-options", default="{}", help="extra TrainOptions of ours, as JSON")
    p.add_argument("--variant", default="{}", help='switches of train/mlx.py for ours, as JSON, '
                   'e.g. {"COMPILE": false}: what each change brings')
    p.add_argument("--child", choices=("mlx-lm", "ours"))
    args = p.parse_args()
    work = Path(args.work)
    model, data = inputs(work)
    if args.child:
        out = work / args.child
        result = run_mlx_lm(model, data, out, args.iters, args.report) if args.child == "mlx-lm" else \
            run_ours(model, data, out, args.iters, args.report, json.loads(args.ours_options),
                     json.loads(args.variant))
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        print(json.dumps(result))
        return
    s = SETTINGS
    print(f"MLX ({_mlx_device()}), tiny Llama (hidden 256, 6 blocks, vocab 49152, float32), "
          f"BATCH_SIZE={s['batch_size']} NUM_LAYERS={s['num_layers']} RANK={s['rank']} "
          f"dropout {s['dropout']}, {args.iters} steps; {args.rounds} rounds, mlx-lm then ours", flush=True)
    rounds = []
    for k in range(args.rounds):
        pair = {e: measure(e, args, args.ours_options) for e in ("mlx-lm", "ours")}
        ratio = dict(its=pair["ours"]["its"] / pair["mlx-lm"]["its"],
                     wall=pair["mlx-lm"]["wall_s"] / pair["ours"]["wall_s"],
                     tokens=pair["ours"]["tokens_per_s"] / pair["mlx-lm"]["tokens_per_s"])
        rounds.append(dict(pair, ratio=ratio))
        print(f"round {k + 1}")
        for e, r in pair.items():
            print(f"   {e:7s} {r['its']:6.3f} it/s  {r['tokens_per_s']:7.1f} tokens/s  "
                  f"train {r['train_s']:6.1f} s  wall {r['wall_s']:6.1f} s  "
                  f"MLX peak {r['mx_peak_gb']:.3f} GB  RSS {r['peak_rss_gb']:.2f} GB  "
                  f"final loss {r['final_loss']:.3f}")
        print(f"   ours / mlx-lm: {ratio['its']:.2f}x it/s, {ratio['wall']:.2f}x wall, "
              f"{ratio['tokens']:.2f}x tokens/s", flush=True)
    out = ROOT / "bench" / "results-mlx.json"
    out.write_text(json.dumps(rounds, indent=2) + "\n")
    worst = min(r["ratio"]["its"] for r in rounds)
    print(f"\nresults: {out}\nmlx_speedup_its_min={worst:.2f} "
          f"mlx_speedup_wall_min={min(r['ratio']['wall'] for r in rounds):.2f}")


def _mlx_device() -> str:
    import mlx.core as mx

    return str(mx.default_device())


if __name__ == "__main__":
    main()
