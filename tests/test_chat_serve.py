"""`donkeytune chat` (scripted stdin) and `donkeytune serve` (real HTTP, openai client) on a tiny GGUF."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You answer in one short sentence."


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory) -> Path:
    """An output folder as `convert` leaves it: a quantized tiny GGUF and donkeytune.json."""
    from donkeytune import gguf
    from donkeytune.gguf import quantize

    out = tmp_path_factory.mktemp("out")
    gguf_dir = out / "gguf"
    full = gguf.export(tiny_model("llama"), gguf_dir / "tiny-finetuned-f16.gguf", "f16")
    quantize.quantize(full, gguf_dir / "tiny-finetuned-Q8_0.gguf", "Q8_0")
    (gguf_dir / "donkeytune.json").write_text(json.dumps(
        {"quantized": "tiny-finetuned-Q8_0.gguf", "system_prompt": SYSTEM}))
    return out


@pytest.fixture(scope="module")
def complete(converted):
    """Greedy answers of the same GGUF in this process: what chat and serve must reproduce."""
    from donkeytune.gguf.runtime import load_llama

    llm = load_llama(converted / "gguf" / "tiny-finetuned-Q8_0.gguf", n_ctx=2048)

    def answer(messages, max_tokens=6):
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
        return out["choices"][0]["message"]["content"]

    return answer


def donkeytune(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "donkeytune", *args], input=stdin, text=True,
                          capture_output=True, timeout=120, cwd=ROOT)


# ---------------------------------------------------------------- chat

def test_chat_multi_turn_reset_and_exit(converted, complete):
    p = donkeytune("chat", "--output-dir", str(converted), "--max-tokens", "6", "--temperature", "0",
                   stdin="What is a donkey?\nAnd a mule?\n/reset\n\nWhat is a donkey?\n/exit\nnot read\n")
    assert p.returncode == 0, p.stderr
    sys_msg = {"role": "system", "content": SYSTEM}
    first = complete([sys_msg, {"role": "user", "content": "What is a donkey?"}])
    second = complete([sys_msg, {"role": "user", "content": "What is a donkey?"},
                       {"role": "assistant", "content": first}, {"role": "user", "content": "And a mule?"}])
    # streamed answers, each on its line; after /reset the history is gone, so the answer repeats
    assert p.stdout == f"{first}\n{second}\n{first}\n"
    assert "(conversation reset)" in p.stderr and f"system prompt: {SYSTEM!r}" in p.stderr
    assert "tiny-finetuned-Q8_0.gguf" in p.stderr


def test_chat_system_override_and_end_of_input(converted, complete):
    p = donkeytune("chat", "--output-dir", str(converted), "--max-tokens", "6", "--temperature", "0",
                   "--system", "", stdin="Hello?\n")  # no /exit: end of input ends the chat
    assert p.returncode == 0, p.stderr
    assert p.stdout == complete([{"role": "user", "content": "Hello?"}]) + "\n"
    assert "system prompt" not in p.stderr


def test_chat_without_a_converted_model_says_what_to_do(tmp_path):
    p = donkeytune("chat", "--output-dir", str(tmp_path), stdin="Hi\n")
    assert p.returncode == 2
    assert "no converted model" in p.stderr and "make convert" in p.stderr


# ---------------------------------------------------------------- serve

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(converted):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "donkeytune", "serve", "--output-dir", str(converted),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:  # ready when /v1/models answers
        try:
            with urllib.request.urlopen(base + "/models", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start: {proc.communicate()[1]}")
            time.sleep(0.2)
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_openai_client_ask_stream_bad_requests_and_stop(server, complete):
    from openai import BadRequestError, OpenAI

    proc, base = server
    client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-finetuned-Q8_0"]

    question = [{"role": "user", "content": "What is a donkey?"}]
    greedy = dict(max_tokens=6, temperature=0, extra_body={"repeat_penalty": 1.0})  # the server's is 1.1
    reply = client.chat.completions.create(model="tiny-finetuned-Q8_0", messages=question, **greedy)
    answer = reply.choices[0].message.content
    # the training data's system prompt is added, as Ollama's SYSTEM would
    assert answer == complete([{"role": "system", "content": SYSTEM}, *question])
    assert reply.model == "tiny-finetuned-Q8_0" and reply.usage.completion_tokens <= 6

    stream = client.chat.completions.create(model="tiny-finetuned-Q8_0", messages=question,
                                            stream=True, **greedy)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == answer  # token by token, same text

    url = base + "/chat/completions"
    for body, says in [(b"{not json", "not valid JSON"),
                       (b'{"model": "x"}', "'messages' must be a non-empty list"),
                       (b'{"messages": "hi"}', "'messages' must be a non-empty list"),
                       (b'{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
                       (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
                        "max_tokens"),
                       (b"[1, 2]", "must be a JSON object")]:
        status, error = post(url, body)
        assert status == 400, (body, status, error)
        assert says in error["error"]["message"] and error["error"]["type"] == "invalid_request_error"
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="x", messages=[{"role": "wizard", "content": "hi"}])
    assert client.models.list().data  # still serving after the bad requests

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = proc.stderr.read()
    assert "Serving tiny-finetuned-Q8_0.gguf" in log and "Server stopped" in log


# ---------------------------------------------------------------- hostile requests (issue 20)

def _byte_token(tiny_model) -> int:
    """A token that is the lone byte 0xFF: it never decodes as UTF-8."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("llama")).convert_tokens_to_ids("ÿ")


def test_serve_hostile_requests_get_400_and_the_server_lives(server, tiny_model):
    proc, base = server
    for path, body, says in [
            ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                   "grammar": "root ::= ( "}, "grammar"),
            ("/completions", {"prompt": "hi", "grammar": "root ::= root \"a\""}, "grammar"),
            ("/completions", {"prompt": "hi", "grammar": "start ::= \"a\""}, "grammar"),
            ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                   "logit_bias": {"abc": 5}}, "not a token id"),
            ("/completions", {"prompt": "hi", "logit_bias": {"99999999": 5}}, "not a token id"),
            ("/embeddings", {"input": "hi"}, "embeddings are not served")]:
        status, error = post(base + path, json.dumps(body).encode())
        assert status == 400, (body, status, error)
        assert says in error["error"]["message"]
    ok, answer = post(base + "/completions", json.dumps(
        {"prompt": "hi", "max_tokens": 3, "grammar": 'root ::= "yes" | "no"'}).encode())
    assert ok == 200 and answer["choices"][0]["text"] in ("yes", "no")
    assert proc.poll() is None


def _stream_request(base, byte, max_tokens):
    body = json.dumps({"prompt": "hi", "max_tokens": max_tokens, "stream": True, "temperature": 0,
                       "logit_bias": {str(byte): 100.0}}).encode()
    return urllib.request.Request(base + "/completions", data=body,
                                  headers={"Content-Type": "application/json"})


def test_serve_byte_tokens_stream_models_answers_disconnect_and_sigterm(server, tiny_model):
    proc, base = server
    byte = _byte_token(tiny_model)
    start = time.monotonic()  # 1,000 lone 0xFF bytes: minutes in llama-cpp-python's stream
    with urllib.request.urlopen(_stream_request(base, byte, 1000), timeout=60) as r:
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert time.monotonic() - start < 30 and events[-1] == "data: [DONE]"
    final = json.loads(events[-2][6:])["choices"][0]
    assert final["finish_reason"] in ("length", "stop")

    # a long stream runs; /v1/models answers at once; the client leaves: the generation stops
    r = urllib.request.urlopen(_stream_request(base, byte, 1800), timeout=60)
    r.readline()
    start = time.monotonic()
    with urllib.request.urlopen(base + "/models", timeout=5) as m:
        assert json.loads(m.read())["data"][0]["id"] == "tiny-finetuned-Q8_0"
    assert time.monotonic() - start < 1
    r.close()
    start = time.monotonic()  # the next request gets the model: the left stream stopped
    status, answer = post(base + "/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200 and time.monotonic() - start < 10

    # SIGTERM during a request: the process ends within 5 s
    r = urllib.request.urlopen(_stream_request(base, byte, 1800), timeout=60)
    r.readline()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert time.monotonic() - start < 5
    r.close()
