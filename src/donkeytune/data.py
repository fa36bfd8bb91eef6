"""Chat data: reading and validating JSONL, tokenizing with the model's chat template, batching.

Every problem in the data is reported with file:line before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .progress import warn

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of tokens the loss skips
MAX_SHOWN = 10  # problems listed in one error message

# Used when a model has no chat template of its own (base models): ChatML.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass
class Example:
    messages: list[dict]
    where: str  # "file:line", for messages about this example


@dataclass
class Dataset:
    train: list[Example]
    valid: list[Example]
    files: list[Path]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files)

    @property
    def system_prompt(self) -> str | None:
        """The system prompt of the training data when all examples share one."""
        prompts = {ex.messages[0]["content"] for ex in self.train if ex.messages[0]["role"] == "system"}
        return prompts.pop() if len(prompts) == 1 else None


def fingerprint(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def load_dir(data_dir: str | Path) -> Dataset:
    """Read train.jsonl (required) and valid.jsonl (optional, a warning when missing)."""
    data_dir = Path(data_dir)
    train_path = data_dir / "train.jsonl"
    if not data_dir.is_dir():
        raise DataError(data_dir, None, "data folder not found",
                        "set DATA_DIR to a folder with train.jsonl and valid.jsonl "
                        "(make demo uses examples/facts)")
    if not train_path.is_file():
        raise DataError(train_path, None, "train.jsonl not found",
                        "put your training examples there, one JSON object per line: "
                        '{"messages": [{"role": "user", "content": "..."}, '
                        '{"role": "assistant", "content": "..."}]}')
    train = load_file(train_path)
    valid_path = data_dir / "valid.jsonl"
    files = [train_path]
    if valid_path.is_file():
        valid = load_file(valid_path)
        files.append(valid_path)
    else:
        valid = []
        warn(f"{valid_path} not found: training runs without validation loss, so you will not "
             "see overfitting. Put 10-20% of your examples there.")
    return Dataset(train, valid, files)


def load_file(path: Path) -> list[Example]:
    """Parse and validate one JSONL file; all problems are reported together."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, None, "the file is empty", "add one JSON object per line")
    examples, problems = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        if not line.strip():
            continue
        try:
            messages = parse_line(line)
        except ValueError as e:
            problems.append((number, str(e)))
            if len(problems) > MAX_SHOWN:
                break
            continue
        examples.append(Example(messages, f"{path}:{number}"))
    if problems:
        first_line, first = problems[0]
        more = "".join(f"\n  {path}:{n}: {msg}" for n, msg in problems[1:MAX_SHOWN])
        if len(problems) > MAX_SHOWN:
            more += "\n  ... (more problems not shown)"
        raise DataError(path, first_line, first + more,
                        'each line must be {"messages": [{"role": "system"|"user"|"assistant", '
                        '"content": "..."}, ...]} with at least one assistant turn')
    return examples


def parse_line(line: bytes) -> list[dict]:
    """One JSONL line -> validated messages; ValueError says what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}: save the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        raise ValueError(f"missing \"messages\" (keys found: {', '.join(map(str, obj)) or 'none'})")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("\"messages\" must be a non-empty list")
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): \"content\" must be a string")
        if not content.strip():
            raise ValueError(f"message {i} ({role}): empty content")
        if role == "system" and i != 1:
            raise ValueError(f"message {i}: a system message must come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: there is nothing to learn from this example")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_questions(data_dir: str | Path) -> list[dict]:
    """Held-out questions ({"question", "keyword"}) shipped next to the data, if any."""
    path = Path(data_dir) / "questions.jsonl"
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
                out.append({"question": str(row["question"]), "keyword": row.get("keyword")})
            except (ValueError, KeyError, TypeError):
                raise DataError(path, number, 'expected {"question": "...", "keyword": "..."}') from None
    return out


# ---------------------------------------------------------------- tokenization

@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not look

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def ensure_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        warn("the model has no chat template: using ChatML (<|im_start|>role ... <|im_end|>)")
        tokenizer.chat_template = CHATML


def render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tokenize(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> Tokenized:
    """Token ids of the chat-templated conversation, labels on assistant turns only.

    An assistant turn spans from the end of the prompt the template renders for it (with
    the generation header) to the end of the conversation rendered up to that turn, so the
    end-of-turn token is learned too: without it the model never stops.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))  # the template already wrote BOS
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        return Tokenized(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a < e for s, e in spans):
            labels[k] = ids[k]
    return Tokenized(ids, labels)


def tokenize_all(tokenizer, examples: list[Example], max_len: int, train_on_prompt: bool,
                 split: str) -> list[Tokenized]:
    """Tokenize a split; truncation and examples left with nothing to learn are counted."""
    out, truncated, lost, empty = [], 0, 0, 0
    for ex in examples:
        t = tokenize(tokenizer, ex.messages, train_on_prompt)
        if len(t.input_ids) > max_len:
            truncated += 1
            lost += len(t.input_ids) - max_len
            t = Tokenized(t.input_ids[:max_len], t.labels[:max_len])
        if t.trained_tokens == 0:
            empty += 1
            continue
        out.append(t)
    if truncated:
        warn(f"{split}: {truncated} of {len(examples)} examples are longer than max_seq_length="
             f"{max_len} tokens and were truncated ({lost} tokens lost); raise --max-seq-length "
             "or shorten them")
    if empty:
        warn(f"{split}: {empty} examples have no assistant tokens left after truncation and "
             "were skipped")
    if examples and not out:
        raise DataError(split, None, "no example has assistant tokens to train on",
                        "check that assistant turns are not cut off by --max-seq-length")
    return out


def batches(items: list[Tokenized], batch_size: int, seed: int, pad_id: int, *, start_step: int = 0):
    """Endless seeded epochs of padded batches: (input_ids, attention_mask, labels) lists."""
    step = 0
    epoch = 0
    while True:
        order = list(range(len(items)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chunk = [items[j] for j in order[i:i + batch_size]]
            if step >= start_step:
                yield collate(chunk, pad_id)
            step += 1
        epoch += 1


def collate(chunk: list[Tokenized], pad_id: int):
    width = max(len(t.input_ids) for t in chunk)
    ids = [t.input_ids + [pad_id] * (width - len(t.input_ids)) for t in chunk]
    mask = [[1] * len(t.input_ids) + [0] * (width - len(t.input_ids)) for t in chunk]
    labels = [t.labels + [IGNORE] * (width - len(t.labels)) for t in chunk]
    return ids, mask, labels
