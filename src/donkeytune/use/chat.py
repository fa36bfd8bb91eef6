"""`donkeytune chat`: talk to the GGUF in the terminal, through llama.cpp, as a user would.

Multi-turn, with the training data's system prompt by default, answers streamed token by
token. Reads plain lines from stdin, so it also runs scripted (`printf 'Hi\\n' | donkeytune chat`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import runinfo
from ..config import ChatOptions, RunGGUFOptions
from ..errors import ConfigError, ModelError
from ..files import read_json
from ..progress import say

HELP = "/reset starts over, /exit (or Ctrl-D) leaves"


def converted_gguf(output_dir: str | Path) -> tuple[Path | None, dict]:
    """The quantized GGUF `convert` wrote in OUTPUT_DIR/gguf (None when it recorded none), and
    its record."""
    meta_file = Path(output_dir) / "gguf" / runinfo.RUN_FILE
    meta = read_json(meta_file, missing={})
    return (meta_file.parent / meta["quantized"] if meta.get("quantized") else None), meta


def resolve_gguf(opts: RunGGUFOptions) -> tuple[Path, str | None]:
    """The GGUF to run and the system prompt: --gguf / --system, else what `convert` recorded."""
    converted, meta = converted_gguf(opts.output_dir)
    path = Path(opts.gguf) if opts.gguf else converted
    if path is None:
        raise ModelError(f"no converted model in {Path(opts.output_dir) / 'gguf'}",
                         "run `make convert` first, or pass --gguf FILE")
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found", "run `make convert`, or pass --gguf FILE")
    runinfo.check_gguf_current(path, opts.output_dir)  # chat and serve: never an earlier training
    system = opts.system if opts.system is not None else meta.get("system_prompt")
    return path, (system or None)


def run(opts: ChatOptions) -> None:
    """An interactive chat until /exit or end of input."""
    from ..gguf.runtime import load_llama  # noqa: PLC0415

    path, system = resolve_gguf(opts)
    say(f"Loading {path}")
    llm = load_llama(path, n_ctx=opts.n_ctx)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401, PLC0415 - line editing where the platform has it
        except ImportError:
            pass
    say(f"Chatting with {path.name}" + (f" (system prompt: {system!r})" if system else "") + f". {HELP}")
    # scripted (stdin not a terminal): the first error ends the chat with its status, as `sh -e`
    converse(llm, system, opts.max_tokens, opts.temperature, prompt=">>> " if interactive else "",
             stop_on_error=not interactive)


def converse(llm, system: str | None, max_tokens: int, temperature: float, prompt: str = "",
             stop_on_error: bool = False) -> list[dict]:
    """The chat loop on stdin/stdout; returns the conversation (for tests and callers). A turn
    that fails is dropped, or, with `stop_on_error`, its error ends the chat."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = input(prompt)
        except EOFError:
            if prompt:
                print()
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            messages = list(start)
            say("(conversation reset)")
            continue
        if text in ("/help", "/?"):
            say(HELP)
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = _stream_answer(llm, messages, max_tokens, temperature)
        except ConfigError as e:
            if stop_on_error:
                raise
            say(f"error: {e}")
            answer = None
        if answer is None:
            messages.pop()  # not answered: the turn is dropped
        else:
            messages.append({"role": "assistant", "content": answer})
    return messages


def _stream_answer(llm, messages, max_tokens: int, temperature: float) -> str | None:
    parts = []
    try:
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        print()
        say("(stopped)")
        return None
    except ValueError as e:  # llama.cpp: the prompt does not fit the context window
        raise ConfigError(f"the conversation does not fit the model's context of {llm.n_ctx()} "
                          f"tokens (llama.cpp: {e})", "/reset to start over, or a larger --n-ctx") from None
    print(flush=True)
    return "".join(parts)
