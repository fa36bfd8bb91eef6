"""Lazy, torch-free reading of safetensors files, and choosing each tensor's GGUF type.

The safetensors format is an 8-byte header length, a JSON header (dtype, shape, byte range
per tensor), then raw little-endian data. Reading it with np.memmap loads one tensor at a
time, and handles bf16, which numpy has no dtype for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelError
from ..files import OUT_TYPES, read_json, safetensors_header

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
Q = gguf.GGMLQuantizationType
GGML_TYPES = {t: Q[t.upper()] for t in OUT_TYPES}  # OUTTYPE -> the tensor type it writes
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies in a safetensors file; `load()` reads just that tensor."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    def load(self) -> np.ndarray:
        """The tensor as float32 (a fresh array, safe to modify)."""
        if self.dtype not in _NUMPY:
            raise ModelError(f"{self.file}: tensor dtype {self.dtype} cannot be exported",
                             "save the model in float32, float16 or bfloat16")
        raw = np.memmap(self.file, dtype=_NUMPY[self.dtype], mode="r", offset=self.offset,
                        shape=self.shape or (1,))
        out = np.empty(raw.shape, np.float32)
        if self.dtype == "BF16":  # bf16 is the top half of a float32; shift in place
            bits = out.view(np.uint32)
            bits[...] = raw
            bits <<= 16
        else:
            out[...] = raw
        del raw  # unmap before the caller converts, so the file pages can go
        return out.reshape(self.shape)


def read_header(file: Path) -> dict[str, TensorRef]:
    n, header = safetensors_header(file)  # a truncated file: the clear error, before any export
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, _ = info["data_offsets"]
        refs[name] = TensorRef(file, info["dtype"], tuple(info["shape"]), 8 + n + start)
    return refs


def index(folder: Path, stem: str = "model") -> dict[str, TensorRef]:
    """All tensors of a (possibly sharded) safetensors checkpoint, by name, unread."""
    index_file = folder / f"{stem}.safetensors.index.json"
    if index_file.exists():
        files = sorted(set(read_json(index_file).get("weight_map", {}).values()))
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob(f"{stem}*.safetensors"))
    if not paths:
        raise ModelError(f"{folder} has no {stem}*.safetensors weights",
                         "point at a Hugging Face model folder saved with safetensors")
    refs: dict[str, TensorRef] = {}
    for path in paths:
        refs.update(read_header(path))
    return refs


def gguf_type(gguf_name: str, shape: tuple[int, ...], outtype: Q) -> Q:
    """Vectors (norms, biases, rope factors) stay F32, as llama.cpp's converter keeps them."""
    if len(shape) < 2 or gguf_name.endswith((".bias", "_norm.weight")):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[outtype][0]
    return outtype if shape[-1] % block == 0 else Q.F16  # rows must fill whole Q8_0 blocks


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 array -> the bytes (as an array) GGUF stores for `qtype`."""
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF keeps each head's rotary halves apart; llama.cpp's llama rope wants them interleaved."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))
