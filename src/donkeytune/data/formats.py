"""The dataset formats people have, each turned into chat messages (and back, for writing).

A record is one JSON object. `detect` names its format from its keys; `to_messages`
turns it into validated chat messages. Errors are ValueError with a message that names
the field, so the reader can put file:line in front of it.
"""

from __future__ import annotations

FORMATS = ("chat", "sharegpt", "alpaca", "completion", "text")
ROLES = ("system", "user", "assistant")
# OpenAI's and ShareGPT's names of tool calls and their results
TOOL_ROLES = ("tool", "function", "function_call", "observation", "tool_call", "tool_response")
TOOLS_UNSUPPORTED = ("tool calls are not supported (a tool or function message, or \"tool_calls\"): "
                     "DonkeyTune trains on system, user and assistant text; leave these examples "
                     "out, or write the call into the assistant's text")

# The key that identifies each format, in the order detection tries them.
KEYS = {"chat": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
        "completion": ("prompt", "completion"), "text": ("text",)}

SHAPES = {
    "chat": '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}',
    "sharegpt": '{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}',
    "alpaca": '{"instruction": "...", "input": "...", "output": "...", "system": "..."} '
              "(input and system optional)",
    "completion": '{"prompt": "...", "completion": "..."}',
    "text": '{"text": "..."} (plain text, trained on every token)',
}

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant"}


def detect(obj) -> str | None:
    """The format of one record, or None when no format's keys are there."""
    if not isinstance(obj, dict):
        return None
    for name, keys in KEYS.items():
        if all(k in obj for k in keys):
            return name
    return None


def to_messages(obj, fmt: str) -> tuple[list[dict], bool]:
    """(messages, plain) of a record of format `fmt`; plain text records are one assistant turn."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type(obj)}")
    missing = [k for k in KEYS[fmt] if k not in obj]
    if missing:
        found = ", ".join(map(str, obj)) or "none"
        raise ValueError(f"missing {', '.join(map(repr_key, missing))} (keys found: {found})")
    if fmt == "chat":
        return check_messages(_chat(obj["messages"])), False
    if fmt == "sharegpt":
        return check_messages(_sharegpt(obj["conversations"])), False
    if fmt == "text":
        return [{"role": "assistant", "content": _text(obj, "text")}], True
    if fmt == "completion":
        return [{"role": "user", "content": _text(obj, "prompt")},
                {"role": "assistant", "content": _text(obj, "completion")}], False
    # alpaca: the optional input follows the instruction, as in the Alpaca prompt
    user = _text(obj, "instruction")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError('"input" must be a string')
    if extra and extra.strip():
        user += "\n\n" + extra
    messages = [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(obj, "output")}]
    if obj.get("system") is not None:
        messages.insert(0, {"role": "system", "content": _text(obj, "system")})
    return messages, False


def to_record(messages: list[dict], plain: bool) -> dict:
    """The record written for an example: chat, or text for plain text (the chat format cannot say
    "no template, train on every token")."""
    if plain:
        return {"text": messages[-1]["content"]}
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def check_messages(messages: list) -> list[dict]:
    """Validate chat messages: known roles, non-empty text, system first, an assistant turn."""
    for i, m in enumerate(messages, start=1):
        role, content = m.get("role"), m.get("content")
        if role in TOOL_ROLES or m.get("tool_calls") or m.get("function_call"):
            raise ValueError(f"message {i}: {TOOLS_UNSUPPORTED}")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): \"content\" must be a string")
        if not content.strip():
            raise ValueError(f"message {i} ({role}): empty content")
        if not _encodable(content):
            raise ValueError(f"message {i} ({role}): text that is not valid Unicode (a lone surrogate "
                             "such as \\ud800)")
        if role == "system" and i != 1:
            raise ValueError(f"message {i}: a system message must come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: there is nothing to learn from this example")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def repr_key(key: str) -> str:
    return f'"{key}"'


def _chat(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("\"messages\" must be a non-empty list")
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
    return messages


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError("\"conversations\" must be a non-empty list")
    out = []
    for i, t in enumerate(turns, start=1):
        if not isinstance(t, dict):
            raise ValueError(f"turn {i} is not an object")
        who = t.get("from")
        if isinstance(who, str) and who.lower() in TOOL_ROLES:
            raise ValueError(f"turn {i}: {TOOLS_UNSUPPORTED}")
        if not isinstance(who, str) or who.lower() not in SHAREGPT_ROLES:
            raise ValueError(f"turn {i}: unknown \"from\" {who!r} (use system, human or gpt)")
        value = t.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {i} ({who}): \"value\" must be a string")
        out.append({"role": SHAREGPT_ROLES[who.lower()], "content": value})
    return out


def _text(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {_type(value)}')
    if not value.strip():
        raise ValueError(f'"{key}" is empty')
    if not _encodable(value):
        raise ValueError(f'"{key}": text that is not valid Unicode (a lone surrogate such as \\ud800)')
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)
