"""Merging a trained adapter into its base model's weights: output/fused/ (HF safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import device, models, runinfo
from .train import memory
from .config import FuseOptions
from .errors import ModelError
from .files import folder_lock
from .progress import say, status


def run(opts: FuseOptions) -> Path:
    """Fuse output/adapters into its base model; returns the fused folder."""
    with folder_lock(opts.output_dir, "fuse"):
        return _run(opts)


def _run(opts: FuseOptions) -> Path:
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415

    run_info = runinfo.read_run(opts.run_dir)
    base_dir = runinfo.base_model_of(run_info, opts.model, trust_remote_code=opts.trust_remote_code,
                                     allow_pickle=opts.allow_pickle)
    out = opts.fused_dir
    dtype = opts.dtype if opts.dtype != "auto" else base_dtype(base_dir)
    memory.check_model_write(base_dir, out.parent, [dtype], "the fused model")
    adapter = opts.chosen_adapter  # adapters/best unless --use-last
    with status(f"Fusing {adapter} ({_which(adapter)}) into {run_info['base_model']}"):
        # Merge in float32: a small LoRA delta added to bf16 weights would be rounded away.
        base = device.load_model(base_dir, "cpu", torch.float32,
                                 trust_remote_code=opts.trust_remote_code)
        before = {k: v.clone() for k, v in base.state_dict().items() if "layers" in k}
        model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        changed = sum(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
        if changed == 0:
            raise ModelError(f"fusing {adapter} changed no weight: the adapter is empty "
                             "(all-zero lora_B) or was not applied",
                             "train for more iterations, or check RESUME_FROM")
        model.to(getattr(torch, dtype))
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok = device.load_tokenizer(base_dir, trust_remote_code=opts.trust_remote_code)
        tok.save_pretrained(tmp)
        # tokenizer.model: llama.cpp's converter reads SentencePiece vocabularies (Gemma) from it
        for extra in ("generation_config.json", "tokenizer.model"):
            if (base_dir / extra).exists() and not (tmp / extra).exists():
                shutil.copyfile(base_dir / extra, tmp / extra)
        runinfo.write_json(tmp / runinfo.RUN_FILE, runinfo.run_record(
            "fuse", opts, base_model=run_info["base_model"], base_model_path=str(base_dir),
            base_fingerprint=run_info["base_fingerprint"], adapter=str(adapter),
            adapter_iteration=runinfo.read_run(adapter).get("iteration"),
            adapter_fingerprint=runinfo.adapter_fingerprint(adapter),
            dtype=dtype, changed_tensors=changed, system_prompt=run_info.get("system_prompt"),
            data_dir=run_info.get("data_dir")))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    say(f"Fused model written to {out}/ ({dtype}, {changed} weight tensors changed)")
    if adapter != opts.adapter_dir:
        say("  (the adapter of the lowest validation loss; --use-last / USE_LAST=1 fuses the last one)")
    return out


def base_dtype(folder: Path) -> str:
    """The dtype the base model's weights are stored in (its config says), float32 if unknown."""
    cfg = models.text_config(models.read_config(folder))
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _which(adapter: Path) -> str:
    """Which adapter it is, for the message: the lowest validation loss or the last."""
    run = runinfo.read_run(adapter)
    if run.get("best"):
        return f"lowest validation loss {run.get('best_val_loss', float('nan')):.3f}, iteration {run.get('iteration')}"
    return f"last, iteration {run.get('iteration')}"
