"""The `quantize` command and the function under it: a GGUF quantized by llama.cpp's own quantizer,
through llama-cpp-python (no CLI needed).

K-quants (Q4_K_M...) exist only in llama.cpp's C code, so this is the one way to make them
without a llama.cpp checkout. Tokenizer and chat template metadata are copied as they are.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..config import QuantizeOptions
from ..errors import ConfigError, ModelError
from ..files import DEFAULT_QUANT, QUANT_TYPES, UNQUANTIZED, atomic, check_not_input, output_lock
from ..progress import say, status

# llama_ftype values (llama.h); names as llama-quantize and Ollama spell them.
QTYPES = {name: ftype for name, (ftype, _bytes) in QUANT_TYPES.items()}
_SOURCE_FTYPES = {0, *(QTYPES[t] for t in UNQUANTIZED if t in QTYPES)}  # 0: F32, not a QUANTIZE


def run(opts: QuantizeOptions) -> Path:
    """The `quantize` command: a 16- or 32-bit GGUF quantized to TYPE."""
    with output_lock(opts.output, "quantize"):  # into a run's folder: not while it is written
        return _run(opts)


def _run(opts: QuantizeOptions) -> Path:
    from ..train import memory  # noqa: PLC0415

    check_not_input(opts.output, opts.input, "quantized GGUF")
    memory.check_model_write(Path(opts.input), Path(opts.output).parent, [opts.type],
                             "the quantized GGUF")
    with status(f"Quantizing {opts.input} to {opts.type}"):
        out = quantize(Path(opts.input), Path(opts.output), opts.type)
    say(f"  {out}  {out.stat().st_size / 1e6:.1f} MB")
    return out


def quantize(in_gguf: Path, out_gguf: Path, qtype: str = DEFAULT_QUANT, threads: int | None = None,
             imatrix: dict | None = None) -> Path:
    """Write `in_gguf` (an f32/f16/bf16 export) quantized to `qtype` at `out_gguf`.

    `imatrix`: {GGUF tensor name: mean squared input per column} (llama-imatrix's importance
    weights): llama.cpp then rounds each tensor to keep its output on such inputs closest.
    """
    in_gguf, out_gguf = Path(in_gguf), Path(out_gguf)
    ftype = QTYPES.get(qtype.upper())
    if ftype is None:
        raise ConfigError(f"unknown quantization type {qtype!r}", "use one of: " + ", ".join(QTYPES))
    _check_source(in_gguf)

    import llama_cpp  # noqa: PLC0415 - loads the C library, only when quantizing

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    keep = _imatrix_param(llama_cpp, params, imatrix) if imatrix else None  # noqa: F841 - alive until done
    log = None
    try:
        with atomic(out_gguf) as tmp:
            with _c_stderr_captured() as log:
                rc = llama_cpp.llama_model_quantize(str(in_gguf).encode(), str(tmp).encode(),
                                                    ctypes.byref(params))
            if rc != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
                raise ModelError(f"llama.cpp failed to quantize {in_gguf} to {qtype} (status {rc}):\n"
                                 f"{tail}", "check the file loads in llama.cpp; disk space in "
                                 f"{out_gguf.parent}")
            fallbacks = log.read_text(errors="replace").count("falling back to")
    finally:
        if log:
            log.unlink(missing_ok=True)
    if fallbacks:
        say(f"  {fallbacks} tensors have rows that are not a multiple of 256 and use Q5_0/Q8_0 "
            f"instead of a K-quant (expected for this model's width)")
    return out_gguf


def _imatrix_param(llama_cpp, params, imatrix: dict):
    """Point `params.imatrix` at a NULL-terminated array of (name, data, size); returns what
    must stay alive while llama.cpp reads it."""
    arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
    table = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for entry, name, arr in zip(table, imatrix, arrays):
        entry.name = name.encode()
        entry.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = arr.size
    params.imatrix = ctypes.cast(table, type(params.imatrix))
    return table, arrays


@contextmanager
def _c_stderr_captured():
    """llama.cpp logs every tensor to the C stderr: keep that in a file, not on the screen."""
    fd, name = tempfile.mkstemp(prefix="donkeytune-quantize-", suffix=".log")
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(fd, 2)
    try:
        yield Path(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _check_source(path: Path) -> None:
    """Refuse inputs llama.cpp would refuse or degrade (already-quantized files)."""
    import gguf  # noqa: PLC0415

    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found")
    try:
        field = gguf.GGUFReader(path).get_field(gguf.Keys.General.FILE_TYPE)
    except (ValueError, OSError) as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    ftype = int(field.contents()) if field is not None else 0
    if ftype not in _SOURCE_FTYPES:
        raise ConfigError(f"{path} is already quantized (file type {ftype}); quantizing it "
                          "again would lose quality", "export the model as f16 and quantize that")
