"""What a whole run produced and how to use it: the last thing `make demo` / `make all` print."""

from __future__ import annotations

import json
from pathlib import Path

from .. import runinfo
from ..gguf import fidelity
from ..config import ModelOptions
from ..files import METRICS_FILE, REPORT_DIR, TEST_FILE, model_name, read_json


def read(path: Path) -> dict | None:
    return read_json(path, missing=None)


def run(opts: ModelOptions) -> str:
    out = Path(opts.output_dir)
    trained = runinfo.read_run(out / "adapters")
    converted = read(out / "gguf" / runinfo.RUN_FILE)
    tested = read(out / REPORT_DIR / TEST_FILE)
    o = trained["options"]
    lines = ["", "=" * 72, "DonkeyTune run summary", "=" * 72,
             f"Trained   {trained['base_model']} on {trained['data_dir']} "
             f"({trained['train_examples']} examples): {o['iters']} iterations x {o['batch_size']} "
             f"examples, LoRA rank {o['rank']} on the last {o['num_layers']} blocks, lr {o['lr']:g}",
             f"Adapter   {out / 'adapters'}/ (PEFT format; adapters.safetensors for RESUME_FROM)"]
    val = _last_val_losses(out / REPORT_DIR / METRICS_FILE)
    if val:
        lines.append(f"Val loss  {val[0]:.3f} at the start -> {val[-1]:.3f} at the end")
    if converted:
        gguf = out / "gguf" / converted["quantized"]
        name = f"{model_name(converted['base_model'])}-finetuned"
        lines += [f"GGUF      {gguf}  ({gguf.stat().st_size / 1e6:.0f} MB)",
                  f"          {out / 'gguf' / converted['full']}  (f16, kept for re-quantizing)",
                  "", "Run it:",
                  f"  llama.cpp   llama-cli -m {gguf} -cnv",
                  f"  Ollama      ollama create {name} -f {out / 'gguf' / 'Modelfile'} && "
                  f"ollama run {name}",
                  f"  chat here   donkeytune chat --output-dir {out}    (make chat)",
                  f"  server      donkeytune serve --output-dir {out}   (OpenAI API on 127.0.0.1:8000)"]
    checked = fidelity.read(out / "gguf") if converted else None
    if checked:
        lines += ["", *fidelity.table(checked)]
    if tested:
        lines += ["", f"Answers ({tested['engine']}):"]
        for row in tested["results"][:3]:
            lines += [f"  Q: {row['question']}", f"     base:       {row.get('base', '-')[:100]}",
                      f"     fine-tuned: {row['finetuned'][:100]}"]
        if tested.get("keywords_total"):
            lines.append(f"  Held-out facts answered: fine-tuned {tested['keywords_finetuned']}/"
                         f"{tested['keywords_total']}, base {tested.get('keywords_base', '-')}/"
                         f"{tested['keywords_total']}")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def _last_val_losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["val_loss"] for r in rows if "val_loss" in r]
