"""DonkeyTune's training speed against TRL's SFTTrainer + PEFT, in the same run.

Both engines train the same model on the same examples in the same order, with the same
LoRA configuration (every linear layer of the last 8 blocks, rank 8, alpha 16, dropout
0.05), BATCH_SIZE examples per optimizer step, bf16 compute, loss on the assistant turn
only. TRL keeps its other defaults, as its users run it (gradient checkpointing included;
TRL_GRADIENT_CHECKPOINTING=0 turns it off). Each engine runs in its own process (peak RSS is per
process); warm-up steps are excluded from the timing. The engines run alternately, twice
(--rounds), and each one's fastest round counts. Case (d) is a second epoch over the same
examples, where DonkeyTune reuses the frozen blocks' outputs as its training stage does.

    python bench/bench.py            # all cases, results in bench/results.json
    python bench/bench.py --cases a  # one case

Tokens are the non-padding tokens of the examples, counted with the model's tokenizer.
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
LORA = dict(rank=8, alpha=16, num_layers=8, dropout=0.05, lr=2e-4)

CASES = {
    "a": dict(title="SmolLM2-135M, short chats", model="smollm2", data="short", batch=4, warmup=3, steps=24),
    "b": dict(title="SmolLM2-135M, long chats (~900 tokens)", model="smollm2", data="long", batch=4,
              warmup=1, steps=3),
    "c": dict(title="Qwen2.5-0.5B shapes (random weights), short chats", model="qwen05", data="short",
              batch=4, warmup=2, steps=8),
    # most real runs see their examples many times (ITERS x BATCH_SIZE > examples): the same 32
    # examples twice, timed over the second epoch, where we reuse the frozen blocks' outputs
    "d": dict(title="SmolLM2-135M, short chats, second epoch", model="smollm2", data="short", batch=4,
              warmup=8, steps=8, epochs=2),
}

QWEN05 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
              intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
              max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)


# ---------------------------------------------------------------- shared inputs

def model_dir(name: str) -> Path:
    from donkeytune import models

    if name == "smollm2":
        return models.resolve("smollm2-135m")
    target = models.cache_dir() / "bench" / "qwen2.5-0.5b-shapes"
    if not (target / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from donkeytune import device

        spec = dict(QWEN05)
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(target)
        device.load_tokenizer(models.resolve("smollm2-135m")).save_pretrained(target)
    return target


def case_examples(case: dict) -> list[list[dict]]:
    """The chats of a case in training order: `epochs` passes over the same examples."""
    epochs = case.get("epochs", 1)
    n = (case["warmup"] + case["steps"]) * case["batch"]
    return examples(case["data"], n // epochs) * epochs


def examples(kind: str, n: int) -> list[list[dict]]:
    """Single-turn chats (system, user, assistant) in a fixed order."""
    from donkeytune import data

    rows = [ex.messages for ex in data.load_dir(FACTS).train if len(ex.messages) == 3]
    if kind == "long":
        facts = [m[2]["content"] for m in rows]
        rows = [[m[0], {"role": "user", "content": m[1]["content"] + " Tell me everything you know "
                        "about Donkey Valley, in detail."},
                 {"role": "assistant", "content": " ".join(facts[(i * 7 + k) % len(facts)]
                                                           for k in range(64))}]
                for i, m in enumerate(rows)]
    return [rows[i % len(rows)] for i in range(n)]


def matmul_tflops() -> float:
    """bf16 matmul rate of this machine now, on a shape like the model's."""
    import torch

    a, b = torch.randn(2048, 576, dtype=torch.bfloat16), torch.randn(576, 1536, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - t) / 1e12


def flops_per_token(cfg: dict, labelled_fraction: float, frozen_reused: bool = False) -> float:
    """Model FLOPs of a LoRA step per token: forward through every block (only the LoRA blocks
    when the frozen blocks' outputs are reused), backward (input gradients) through the LoRA
    blocks, LM head forward + backward on labelled tokens."""
    d, f, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    block = 2 * d * d + 2 * d * kv + 3 * d * f  # q, o, k, v, gate, up, down
    top = min(LORA["num_layers"], layers)
    return 2 * block * (top if frozen_reused else layers) + 2 * block * top + 4 * d * v * labelled_fraction


# ---------------------------------------------------------------- the engines (child processes)

def run_ours(case: dict, out: Path) -> dict:
    from donkeytune import device

    device.bound_kernel_caches()  # as the CLI does, before torch builds its first kernel
    import torch

    from donkeytune import config, data
    from donkeytune.train import torch as torch_engine
    from donkeytune.train.torch import loralinear

    folder = model_dir(case["model"])
    opts = config.resolve(config.TrainOptions, dict(
        model=str(folder), iters=case["warmup"] + case["steps"], batch_size=case["batch"],
        num_layers=LORA["num_layers"], rank=LORA["rank"], alpha=LORA["alpha"],
        dropout=LORA["dropout"], lr=LORA["lr"], max_seq_length=2048, dtype="bfloat16",
        output_dir=str(out)), environ={})
    device.set_threads()
    tok = device.load_tokenizer(folder)
    chats = case_examples(case)
    unique = {id(m): data.tokenize(tok, m) for m in chats}  # an example seen again is the same item
    items = [unique[id(m)] for m in chats]
    torch.manual_seed(0)
    model = torch_engine.add_lora(device.load_model(folder, "cpu", torch.bfloat16), opts)
    cache = torch_engine.prefix_cache(model)  # as train.run: frozen-block outputs kept for the next epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch_engine.adamw(params, opts.lr, "cpu")
    times, losses = [], []
    with loralinear.packed(model):  # as train.run
        for s in range(opts.iters):
            batch = data.collate(items[s * opts.batch_size:(s + 1) * opts.batch_size], tok.pad_token_id)
            t = time.perf_counter()
            losses.append(torch_engine.lora_step(model, batch, optimizer, params, "cpu", cache)[0])
            times.append(time.perf_counter() - t)
    return dict(times=times, losses=losses, lengths=[len(x.input_ids) for x in items],
                labelled=sum(x.trained_tokens for x in items))


def run_trl(case: dict, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from donkeytune import device
    from donkeytune.train import torch as torch_engine

    folder = model_dir(case["model"])
    device.set_threads()
    steps = case["warmup"] + case["steps"]
    chats = case_examples(case)
    ds = Dataset.from_list([{"prompt": m[:2], "completion": m[2:]} for m in chats])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    n_layers = model.config.num_hidden_layers
    lora = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=torch_engine.block_linear_names(model),
                      layers_to_transform=list(range(n_layers - LORA["num_layers"], n_layers)),
                      task_type="CAUSAL_LM")
    times, starts = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            starts.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - starts[-1])

    class InOrder(SFTTrainer):  # the same examples in the same order as ours
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=case["batch"],
                     gradient_accumulation_steps=1, max_steps=steps, learning_rate=LORA["lr"],
                     bf16=True, use_cpu=True, logging_steps=1,
                     gradient_checkpointing=os.environ.get("TRL_GRADIENT_CHECKPOINTING", "1") != "0",
                     save_strategy="no", report_to="none", max_length=2048,
                     completion_only_loss=True, dataloader_num_workers=0, seed=0)
    trainer = InOrder(model=model, args=args, train_dataset=ds, peft_config=lora,
                      processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(times=times, losses=losses)


# ---------------------------------------------------------------- the driver

def child(engine: str, case_name: str, out: Path) -> dict:
    case = CASES[case_name]
    result = (run_ours if engine == "ours" else run_trl)(case, out)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return result


def measure(engine: str, case_name: str, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--cases", case_name, "--tmp", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        sys.exit(f"{engine} failed on case {case_name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="a,b,c,d")
    p.add_argument("--child", choices=("ours", "trl"))
    p.add_argument("--tmp", default=str(ROOT / "bench" / ".work"))
    p.add_argument("--rounds", type=int, default=2,
                   help="ours, TRL, ours, TRL, ...: each engine's fastest round counts (this machine "
                        "is shared; its speed drifts by 10-20%% within minutes)")
    args = p.parse_args()
    tmp = Path(args.tmp)
    if args.child:
        print(json.dumps(child(args.child, args.cases, tmp / args.child)))
        return
    results = {}
    for name in args.cases.split(","):
        case = CASES[name]
        print(f"\n== case ({name}) {case['title']}: BATCH_SIZE={case['batch']}, "
              f"{case['warmup']} warm-up + {case['steps']} timed steps, fastest of {args.rounds} "
              "rounds", flush=True)
        model_dir(case["model"])  # build shared inputs once, outside the timed children
        w, b = case["warmup"], case["batch"]
        runs = {"ours": [], "trl": []}
        rates = []
        for _ in range(args.rounds):
            for label in runs:
                runs[label].append(measure(label, name, tmp))
            rates.append(matmul_tflops())
        fastest = lambda rs: min(rs, key=lambda r: sum(r["times"][w:]))  # noqa: E731
        ours, trl = fastest(runs["ours"]), fastest(runs["trl"])
        for label, r in (("ours", ours), ("trl", trl)):
            r["peak_rss_gb"] = max(x["peak_rss_gb"] for x in runs[label])
        rate = max(rates)
        tokens = sum(ours["lengths"][w * b:])
        cfg = json.loads((model_dir(case["model"]) / "config.json").read_text())
        fpt = flops_per_token(cfg, ours["labelled"] / sum(ours["lengths"]), case.get("epochs", 1) > 1)
        row = {}
        for label, r in (("ours", ours), ("trl", trl)):
            secs = sum(r["times"][w:])
            row[label] = dict(tokens_per_s=tokens / secs, peak_rss_gb=r["peak_rss_gb"],
                              final_loss=sum(r["losses"][-3:]) / len(r["losses"][-3:]))
        row["mfu"] = row["ours"]["tokens_per_s"] * fpt / (rate * 1e12)
        row["matmul_tflops"] = rate
        row["speedup"] = row["ours"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
        results[name] = row
        for label in ("ours", "trl"):
            r = row[label]
            print(f"   {label:5s} {r['tokens_per_s']:8.1f} tokens/s   peak RSS {r['peak_rss_gb']:.2f} GB"
                  f"   final train loss {r['final_loss']:.3f}")
        print(f"   speed-up {row['speedup']:.2f}x   our MFU {row['mfu'] * 100:.1f}% of "
              f"{rate:.2f} TFLOP/s (bf16 matmul, measured now)", flush=True)
    out = ROOT / "bench" / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")
    print(f"speedup_vs_trl_min={min(r['speedup'] for r in results.values()):.2f}")


if __name__ == "__main__":
    main()
