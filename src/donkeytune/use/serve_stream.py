"""The server's requests as cancellable generations, and streaming in linear time.

llama-cpp-python's streaming re-decodes all pending tokens at every token and retries every
prefix while bytes do not decode: 1,000 byte tokens took minutes. Here the completion runs
once without streaming in a worker thread (under the model lock) while each generated token's
bytes go through an incremental UTF-8 decoder; text that could begin a stop sequence is held
back, and the final text comes from the completion itself.
"""

from __future__ import annotations

import codecs
import contextvars
import queue
import threading
import time
import uuid

import anyio

# The cancel event of the request being served; set when its client disconnects.
CANCEL: contextvars.ContextVar[threading.Event] = contextvars.ContextVar(
    "donkeytune_cancel", default=threading.Event())


async def run_cancellable(app, scope, receive, send, body: bytes) -> None:
    """Run `app` on an already read `body`; the client's disconnect sets the request's cancel
    event (also after a non-streamed answer started, which llama_cpp.server never notices)."""
    cancel = threading.Event()
    token = CANCEL.set(cancel)
    left = anyio.Event()
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def watch():
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                left.set()
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await app(scope, replay, send)
            tg.cancel_scope.cancel()
    finally:
        cancel.set()  # whatever still generates for this request stops
        CANCEL.reset(token)


def _finish(result, bound):
    """finish_reason "length" when our bound, not a stop, ended it."""
    if bound.max_tokens is not None and bound.calls > bound.max_tokens:
        for choice in result.get("choices", []):
            choice["finish_reason"] = "length"
    return result


def stream(llama, original, prompt, kw: dict, model_lock: threading.Lock, bound):
    """Chunks like llama-cpp-python's streamed completion, in time linear in the tokens."""

    pieces: queue.Queue = queue.Queue()
    kw = dict(kw, stream=False)
    stops = kw.get("stop") or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    result: dict = {}

    def work():
        generate = llama.generate

        def observed(*args, **kwargs):
            for tok in generate(*args, **kwargs):
                pieces.put(llama.detokenize([tok]))
                yield tok

        with model_lock:
            llama.generate = observed
            try:
                result["done"] = original(prompt, **kw)
            except Exception as e:  # noqa: BLE001 - raised again in the streaming thread
                result["error"] = e
            finally:
                del llama.generate
                pieces.put(None)

    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(work,), daemon=True).start()

    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    model = kw.get("model") or llama.model_path

    def chunk(text: str, finish=None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    try:
        while (piece := pieces.get()) is not None:
            text += decoder.decode(piece)
            found = [i for i in (text.find(s) for s in stops) if i >= 0]
            safe = min(found) if found else len(text) - hold
            if safe > sent:
                yield chunk(text[sent:safe])
                sent = safe
        if "error" in result:
            raise result["error"]
        final = _finish(result["done"], bound)["choices"][0]
        if final["text"].startswith(text[:sent]) and len(final["text"]) > sent:
            yield chunk(final["text"][sent:])
        yield chunk("", final["finish_reason"])
    finally:
        bound.cancel.set()  # closed early: the generation stops at its next token
