"""Loading a GGUF into llama-cpp-python so that it runs on every CPU we meet.

On CPUs with AMX, llama.cpp repacks quantized weights into extra buffer types, and running
small quantized models that way crashed (segfault). Loading with `use_extra_bufts=False`
avoids the repacking. `llama_cpp.Llama` does not expose that field, so we set it on the
default model parameters it starts from, while it is being constructed.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelError

_lock = threading.Lock()


@contextmanager
def _no_weight_repacking():
    import llama_cpp.llama_cpp as lib  # noqa: PLC0415 - heavy import, only when running

    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    with _lock:
        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def load_llama(path: Path, n_ctx: int = 2048, lora_path: Path | None = None,
               logits_all: bool = False, n_threads: int | None = None, verbose: bool = False,
               **kwargs):
    """A `llama_cpp.Llama` for the GGUF at `path` (plus an optional GGUF LoRA adapter)."""
    from llama_cpp import Llama  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found")
    with _no_weight_repacking():
        try:
            return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all,
                         lora_path=str(lora_path) if lora_path else None, n_threads=n_threads,
                         n_threads_batch=n_threads, verbose=verbose, **kwargs)
        except ValueError as e:  # llama-cpp-python reports load failures as ValueError
            raise ModelError(f"llama.cpp cannot load {path}"
                             + (f" with adapter {lora_path}" if lora_path else "") + f": {e}",
                             "rerun with verbose=True to see llama.cpp's reason") from None


def chat_gguf(llm, messages, max_tokens: int) -> str:
    """A greedy answer to `messages`, with the GGUF's own chat template and stop tokens."""
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
    return (out["choices"][0]["message"]["content"] or "").strip()
