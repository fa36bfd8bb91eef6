"""The `convert` command: fuse when needed -> GGUF export -> llama.cpp quantization -> fidelity
check -> Ollama Modelfile. (`export`, `quantize` and `export-adapter` on their own: exporters.py,
quantize.py, adapter.py.)

`convert` writes output/gguf/<model>-finetuned-f16.gguf and <model>-finetuned-<QUANT>.gguf, the
names the seed's Makefile used, so scripts written for it find them. The f16 file is kept:
re-quantizing to another type starts from it, and a quantized file cannot be quantized again
without losing quality.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import runinfo
from ..config import AUTO_TYPES, ConvertOptions
from ..errors import ModelError
from ..files import REPORT_DIR, folder_lock, model_name, read_json, safetensors_header
from ..progress import say, status, warn
from ..train import memory
from .exporters import export, usable_plan


def gguf_paths(opts: ConvertOptions, run: dict) -> tuple[Path, Path]:
    stem = f"{model_name(run['base_model'])}-finetuned"
    return opts.gguf_dir / f"{stem}-{opts.outtype}.gguf", opts.gguf_dir / f"{stem}-{opts.quantize}.gguf"


def run(opts: ConvertOptions) -> Path:
    """Fuse + export + quantize the trained adapter; returns the quantized GGUF."""
    with folder_lock(opts.output_dir, "convert"):
        return _run(opts)


def _run(opts: ConvertOptions) -> Path:
    from .. import fuse  # noqa: PLC0415
    from . import fidelity  # noqa: PLC0415

    run_info = runinfo.read_run(opts.run_dir)
    full, quant = gguf_paths(opts, run_info)
    if not _fused_is_current(opts):
        fuse.run(opts)
    memory.check_model_write(opts.fused_dir, opts.gguf_dir,
                             [opts.outtype, AUTO_TYPES[-1] if opts.quantize == "AUTO" else opts.quantize],
                             "the GGUF files")
    timings = []
    t = time.perf_counter()
    say(usable_plan(opts.fused_dir, opts.exporter).line)
    with status(f"Exporting {opts.fused_dir} to {full.name}"):
        export(opts.fused_dir, full, opts.outtype, exporter=opts.exporter)
    timings.append((full, time.perf_counter() - t))
    t = time.perf_counter()
    ref = (fidelity.reference_for(opts, opts.fused_dir, run_info.get("data_dir"),
                                  run_info.get("system_prompt"), opts.trust_remote_code)
           if opts.fidelity else None)
    with status(f"Quantizing to {opts.quantize} with llama.cpp"
                + (" (and checking fidelity)" if ref else "")):
        quant = fidelity.quantize_and_check(full, quant.name.removesuffix(f"-{opts.quantize}.gguf"),
                                            opts.quantize, ref)
    timings.append((quant, time.perf_counter() - t))
    made_from = dict(adapter_fingerprint=runinfo.adapter_fingerprint(opts.adapter_dir),
                     base_fingerprint=run_info["base_fingerprint"])
    runinfo.write_json(opts.gguf_dir / runinfo.RUN_FILE, runinfo.run_record(
        "convert", opts, base_model=run_info["base_model"], base_model_path=run_info["base_model_path"],
        full=full.name, quantized=quant.name, files={full.name: made_from, quant.name: made_from},
        **made_from,
        system_prompt=run_info.get("system_prompt"), data_dir=run_info.get("data_dir")))
    from ..use import ollama  # noqa: PLC0415

    modelfile = ollama.write_modelfile(quant, opts.fused_dir, run_info.get("system_prompt"))
    fidelity.report_markdown(opts.gguf_dir, Path(opts.output_dir) / REPORT_DIR)
    for path, seconds in timings:
        say(f"  {path}  {path.stat().st_size / 1e6:.1f} MB  ({seconds:.1f}s)")
    say(f"  Ollama: {ollama.create_command(modelfile, quant.stem.rsplit('-', 1)[0])}")
    return quant


def _fused_is_current(opts: ConvertOptions) -> bool:
    """The fused folder was made from the adapter as it is now, and is whole (a copy or a full
    disk may have truncated it: then it is fused again)."""
    fused_run = opts.fused_dir / runinfo.RUN_FILE
    if not fused_run.is_file():
        return False
    try:
        recorded = read_json(fused_run)
        for weights in sorted(opts.fused_dir.glob("*.safetensors")):
            safetensors_header(weights)
    except ModelError as e:
        warn(f"{e.message}: fusing again")
        return False
    return (recorded.get("adapter_fingerprint") == runinfo.adapter_fingerprint(opts.chosen_adapter)
            and recorded.get("options", {}).get("dtype") == opts.dtype)
