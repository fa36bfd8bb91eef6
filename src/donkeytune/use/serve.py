"""`donkeytune serve`: an OpenAI-compatible HTTP server for the GGUF, on llama-cpp-python's own.

llama_cpp.server (FastAPI + uvicorn) gives /v1/models, /v1/chat/completions (streaming too),
/v1/completions and /v1/embeddings with the GGUF's chat template. Two things are added here:
the model is loaded without CPU weight repacking (see gguf/runtime.py), and requests are
checked before they reach it: llama_cpp.server answers malformed JSON or wrong types with a
500, we answer with a 400 and an OpenAI-style JSON error. A chat request without a system
message gets the training data's system prompt, as Ollama's SYSTEM does.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import threading

from .chat import resolve_gguf
from ..config import ServeOptions
from ..errors import ConfigError, ModelError
from ..files import check_gguf
from ..progress import say, warn

# Set by SIGTERM/SIGINT: every generation stops at its next token, so shutdown is quick.
STOPPING = threading.Event()
MAX_BODY = 4 << 20  # bytes of one request; chat prompts are far smaller
ROLES = ("system", "user", "assistant")


def run(opts: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM."""
    path, system = resolve_gguf(opts)
    check_gguf(path)  # chat and test: llama.cpp's load error says it (the server's would not)
    try:
        import uvicorn  # noqa: PLC0415
    except ImportError:
        raise ConfigError("the server needs llama-cpp-python's server packages",
                          "pip install 'donkeytune[serve]'") from None
    _check_port_free(opts.host, opts.port)
    if opts.host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"listening on {opts.host}: anyone who can reach it can use the model (no API key)")
    alias = path.stem
    app = build_app(path, alias, system, opts.n_ctx)
    say(f"Serving {path.name} as model {alias!r} at http://{opts.host}:{opts.port}/v1 "
        "(OpenAI API: /v1/models, /v1/chat/completions); Ctrl-C stops")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: let that
    # second one end the process normally (exit 0) instead of killing it.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            STOPPING.set()  # a running generation ends at its next token
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning",
                            timeout_graceful_shutdown=3)
    try:
        Server(config).run()
        with app.model_lock:  # a generation thread still in llama.cpp ends before the model goes
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("Server stopped")


def build_app(path, alias: str, system: str | None, n_ctx: int = 2048):
    """The llama_cpp.server app for one GGUF, behind the request checks."""
    try:
        from llama_cpp.server.app import create_app  # noqa: PLC0415
        from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: PLC0415
    except ImportError:
        raise ConfigError("the server needs llama-cpp-python's server packages",
                          "pip install 'donkeytune[serve]'") from None
    from ..gguf.runtime import _no_weight_repacking  # noqa: PLC0415 - same protection as load_llama

    import llama_cpp.server.app as server_app  # noqa: PLC0415

    with _no_weight_repacking():  # create_app loads the model
        try:
            app = create_app(server_settings=ServerSettings(),
                             model_settings=[ModelSettings(model=str(path), model_alias=alias,
                                                           n_ctx=n_ctx, verbose=False)])
        except ValueError as e:  # llama-cpp-python reports load failures as ValueError
            raise ModelError(f"llama.cpp cannot load {path}: {e}",
                             "check the file (donkeytune fidelity, or llama-cli -m FILE)") from None
    llama = server_app._llama_proxy(alias)
    checked = CheckRequests(app, alias, system, llama)
    _bound_generation(llama, checked.model_lock)
    return checked


class _Bound:
    """A stopping criterion: ends a generation when its client left, the server stops, or the
    context is full (llama-cpp-python skips its max_tokens check while bytes are incomplete)."""

    def __init__(self, cancel: threading.Event, n_ctx: int, max_tokens):
        self.cancel, self.n_ctx, self.calls = cancel, n_ctx, 0
        self.max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None

    def __call__(self, input_ids, logits) -> bool:
        self.calls += 1
        return (self.cancel.is_set() or STOPPING.is_set() or len(input_ids) >= self.n_ctx - 1
                or (self.max_tokens is not None and self.calls > self.max_tokens))


def _bound_generation(llama, model_lock: threading.Lock) -> None:
    """Every completion of `llama` (chat ones too, which come through create_completion) runs
    under one thread lock, stops when its request is cancelled, and streams in linear time."""
    import llama_cpp  # noqa: PLC0415

    original = llama.create_completion

    def create_completion(prompt, **kw):
        from .serve_stream import CANCEL, stream  # noqa: PLC0415

        cancel = CANCEL.get()
        bound = _Bound(cancel, llama.n_ctx(), kw.get("max_tokens", 16))
        kw["stopping_criteria"] = llama_cpp.StoppingCriteriaList(
            [bound, *(kw.get("stopping_criteria") or [])])
        if kw.get("stream") and kw.get("logprobs") is None and not kw.get("echo"):
            return stream(llama, original, prompt, kw, model_lock, bound)
        with model_lock:
            from .serve_stream import _finish  # noqa: PLC0415

            return _finish(original(prompt, **kw), bound)

    llama.create_completion = create_completion


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}",
                              "choose another port: --port 8001 (make serve PORT=8001)") from None


# ---------------------------------------------------------------- request checks

def check_chat(body) -> str | None:
    """What is wrong with a chat completion request, or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    if body.get("tools") or body.get("functions") or any(
            isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls")
                                     or m.get("function_call")) for m in messages):
        return ("tool calls are not supported by this server (\"tools\", \"functions\", tool "
                "messages or \"tool_calls\"): it answers with text only")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"messages[{i}] must be an object whose 'role' is one of {', '.join(ROLES)}"
        content = m.get("content")
        if not (isinstance(content, str) or isinstance(content, list)
                or (content is None and m["role"] == "assistant")):
            return f"messages[{i}].content must be a string"
    return None


def check_completion(body) -> str | None:
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("prompt"), (str, list)):
        return "'prompt' must be a string or a list of strings"
    return None


CHECKS = {"/v1/chat/completions": check_chat, "/v1/completions": check_completion}


class CheckRequests:
    """ASGI middleware: malformed requests get a 400 with a JSON error before they reach the model."""

    def __init__(self, app, alias: str, system: str | None, llama=None):
        self.app, self.alias, self.system, self.llama = app, alias, system, llama
        self.model_lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/models":
            # answered here: llama_cpp.server makes it wait for the model lock
            return await _json(send, 200, {"object": "list", "data": [
                {"id": self.alias, "object": "model", "owned_by": "me", "permissions": []}]})
        if scope["type"] == "http" and scope["path"] == "/v1/embeddings":
            return await _error(send, 400, "embeddings are not served: the model is loaded for "
                                "chat and completions only")
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CHECKS:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await _error(send, 413, f"request body over {MAX_BODY} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return await _error(send, 400, f"the request body is not valid JSON: {e}")
        problem = CHECKS[scope["path"]](payload)
        if problem is None:
            problem = self._check_types(scope["path"], payload)
        if problem is None and self.llama is not None:
            problem = check_logit_bias(payload, self.llama.n_vocab()) or check_grammar(payload, self.llama)
        if problem:
            return await _error(send, 400, problem)
        payload.setdefault("model", self.alias)  # answers name the model as /v1/models does
        if scope["path"] == "/v1/chat/completions" and self.system and not any(
                m["role"] == "system" for m in payload["messages"]):
            payload["messages"].insert(0, {"role": "system", "content": self.system})
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        from .serve_stream import run_cancellable  # noqa: PLC0415

        await run_cancellable(self.app, scope, receive, send, body)

    @staticmethod
    def _check_types(path: str, payload: dict) -> str | None:
        """The server's own request model checks every other field (temperature, stream, ...)."""
        import pydantic  # noqa: PLC0415
        from llama_cpp.server.types import (  # noqa: PLC0415
            CreateChatCompletionRequest,
            CreateCompletionRequest,
        )

        model = CreateChatCompletionRequest if path == "/v1/chat/completions" else CreateCompletionRequest
        try:
            model.model_validate(payload)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"][:2])
            return f"{where}: {first['msg']}"
        return None


def check_logit_bias(payload: dict, n_vocab: int) -> str | None:
    """llama_cpp.server answers keys that are not token ids with a 500."""
    bias = payload.get("logit_bias")
    if not bias or payload.get("logit_bias_type") == "tokens":
        return None
    for key, value in bias.items():
        if not (key.strip().isdigit() and int(key) < n_vocab):
            return (f"logit_bias: {key[:40]!r} is not a token id (0 to {n_vocab - 1}); "
                    "to bias text, add \"logit_bias_type\": \"tokens\"")
        if not math.isfinite(value):
            return f"logit_bias[{key}]: {value} is not a finite number"
    return None


def check_grammar(payload: dict, llama) -> str | None:
    """llama.cpp's parser is asked first: a grammar it refuses would crash the process (a null
    sampler in the chain), so it gets a 400 instead."""
    grammar = payload.get("grammar")
    if grammar is None:
        return None
    import llama_cpp  # noqa: PLC0415

    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, grammar.encode("utf-8"),
                                                   b"root")
    if not sampler:
        return ("grammar: llama.cpp cannot parse it (GBNF with a 'root' rule, no left recursion; "
                "see llama.cpp's grammars/README.md)")
    llama_cpp.llama_sampler_free(sampler)
    return None


async def _error(send, status: int, message: str) -> None:
    await _json(send, status, {"error": {"message": message, "type": "invalid_request_error",
                                         "param": None, "code": None}})


async def _json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
