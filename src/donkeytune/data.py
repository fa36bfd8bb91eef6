"""Chat data: reading and validating JSONL or JSON (several formats, see formats.py), tokenizing
with the model's chat template, batching.

Every problem in the data is reported with file:line before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import formats
from .errors import DataError, ModelError
from .progress import warn

IGNORE = -100  # label of tokens the loss skips
MAX_SHOWN = 10  # problems listed in one error message
SPLIT_FILES = ("{}.jsonl", "{}.json")  # train.jsonl, else train.json (JSON array or JSONL)

# Used when a model has no chat template of its own (base models): ChatML.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass
class Example:
    messages: list[dict]
    where: str  # "file:line", for messages about this example
    plain: bool = False  # plain text: tokenized as is (no chat template), every token trained


@dataclass
class Problem:
    """Something wrong with the data, located; `data check` lists them, loading raises the errors."""

    severity: str  # "error" or "warning"
    path: str
    line: int | None
    message: str
    fix: str = ""
    kind: str = "invalid"  # what sort of problem: invalid (record), empty-file, duplicate, ...

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line else str(self.path)


@dataclass
class FileData:
    path: Path
    examples: list[Example]
    problems: list[Problem]  # errors only: reading never warns
    formats: dict[str, int]  # records per detected format


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


def split_file(data_dir: str | Path, split: str) -> Path | None:
    """DIR/train.jsonl or DIR/train.json, None when neither is there."""
    found = [Path(data_dir) / name.format(split) for name in SPLIT_FILES]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise DataError(found[1], None, f"both {found[0].name} and {found[1].name} are here",
                        "keep one of them")
    return found[0] if found else None


def load_dir(data_dir: str | Path, fmt: str | None = None) -> Dataset:
    """Read train.jsonl (required) and valid.jsonl (optional, a warning when missing).

    `.json` files (a JSON array of records) are read too; each file's format is detected
    (see formats.py) unless `fmt` forces one.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, None, "data folder not found",
                        "set DATA_DIR to a folder with train.jsonl and valid.jsonl "
                        "(make demo uses examples/facts)")
    train_path = split_file(data_dir, "train")
    if train_path is None:
        raise DataError(data_dir / "train.jsonl", None, "train.jsonl not found",
                        "put your training examples there, one JSON object per line: "
                        '{"messages": [{"role": "user", "content": "..."}, '
                        '{"role": "assistant", "content": "..."}]} (train.json, a JSON array, '
                        "works too; `donkeytune data check` lists the formats)")
    train = load_file(train_path, fmt)
    valid_path = split_file(data_dir, "valid")
    files = [train_path]
    if valid_path is not None:
        valid = load_file(valid_path, fmt)
        files.append(valid_path)
    else:
        valid = []
        warn(f"{data_dir / 'valid.jsonl'} not found: training runs without validation loss, so you "
             "will not see overfitting. Put 10-20% of your examples there "
             "(`donkeytune data split` does it).")
    return Dataset(train, valid, files)


def load_file(path: Path, fmt: str | None = None) -> list[Example]:
    """Parse and validate one file; its problems are reported together, as one DataError."""
    got = read_file(Path(path), fmt, limit=MAX_SHOWN + 1)
    if got.problems:
        first = got.problems[0]
        more = "".join(f"\n  {p.where}: {p.message}" for p in got.problems[1:MAX_SHOWN])
        if len(got.problems) > MAX_SHOWN:
            more += "\n  ... (more problems not shown; `donkeytune data check` lists them all)"
        raise DataError(first.path, first.line, first.message + more, first.fix)
    return got.examples


def read_file(path: Path, fmt: str | None = None, limit: int | None = None) -> FileData:
    """Read one JSONL file (or JSON array) into examples and located errors; never raises on bad data.

    Each record's format is detected from its keys unless `fmt` forces one; a record of no
    known format is reported against the file's main format. `limit` stops after that many errors.
    """
    path = Path(path)
    out = FileData(path, [], [], {})
    try:
        raw = path.read_bytes()
    except OSError as e:
        out.problems.append(Problem("error", str(path), None, f"cannot read the file ({e.strerror})",
                                    kind="unreadable"))
        return out
    if not raw.removeprefix(b"\xef\xbb\xbf").strip():
        out.problems.append(Problem("error", str(path), None, "the file is empty",
                                    "add one JSON object per line", "empty-file"))
        return out
    records = list(_records(raw, path.suffix.lower() == ".json"))
    if not records:
        out.problems.append(Problem("error", str(path), None, "the JSON array is empty",
                                    "put the examples in it: [{...}, {...}]", "empty-file"))
    detected = [fmt or formats.detect(obj) for _, obj in records]
    counts = Counter(f for f in detected if f)
    main = fmt or (counts.most_common(1)[0][0] if counts else "chat")
    for (number, obj), kind in zip(records, detected):
        try:
            if isinstance(obj, ValueError):
                raise obj
            messages, plain = formats.to_messages(obj, kind or main)
        except ValueError as e:
            out.problems.append(Problem("error", str(path), number, str(e), _fix(kind or main)))
            if limit and len(out.problems) >= limit:
                break
            continue
        out.examples.append(Example(messages, f"{path}:{number}", plain))
        out.formats[kind or main] = out.formats.get(kind or main, 0) + 1
    return out


def _fix(fmt: str) -> str:
    if fmt == "chat":
        return ('each line must be {"messages": [{"role": "system"|"user"|"assistant", '
                '"content": "..."}, ...]} with at least one assistant turn')
    return f"each {fmt} record must be {formats.SHAPES[fmt]}"


def _records(raw: bytes, json_file: bool):
    """(line, object) per record, or (line, ValueError) for a record that is not JSON.

    A .json file holding a JSON array is read element by element (each located at the line
    it starts on); anything else is JSONL, one record per line.
    """
    body = raw.removeprefix(b"\xef\xbb\xbf")
    if json_file and body.lstrip().startswith(b"["):
        yield from _array_records(body)
        return
    for number, line in enumerate(raw.splitlines(), start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        if line.strip():
            try:
                yield number, _decode(line)
            except ValueError as e:
                yield number, e


def _decode(line: bytes):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}: save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None


def _array_records(body: bytes):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        yield body.count(b"\n", 0, e.start) + 1, ValueError(
            f"invalid UTF-8 at byte {e.start}: save the file as UTF-8")
        return
    decoder = json.JSONDecoder()
    pos, line, counted = _skip_ws(text, text.index("[") + 1), 1, 0

    def line_at(p: int) -> int:  # line numbers counted incrementally: one pass over the text
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    if text.startswith("]", pos):
        pos = _skip_ws(text, pos + 1)
    else:
        while True:
            start = line_at(pos)
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                yield e.lineno, ValueError(f"invalid JSON at column {e.colno}: {e.msg} "
                                           "(the rest of the array is not read)")
                return
            except RecursionError:
                yield start, ValueError("invalid JSON: nested too deeply "
                                        "(the rest of the array is not read)")
                return
            yield start, obj
            pos = _skip_ws(text, pos)
            if text.startswith(",", pos):
                pos = _skip_ws(text, pos + 1)
            elif text.startswith("]", pos):
                pos = _skip_ws(text, pos + 1)
                break
            else:
                yield line_at(pos), ValueError("invalid JSON: expected , or ] after an array element "
                                               "(the rest of the array is not read)")
                return
    if pos < len(text):
        yield line_at(pos), ValueError("invalid JSON: text after the closing ] of the array")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def parse_line(line: bytes) -> list[dict]:
    """One chat JSONL line -> validated messages; ValueError says what is wrong."""
    return formats.to_messages(_decode(line), "chat")[0]


def write_records(path: Path, examples: list[Example]) -> Path:
    """Write examples as JSONL (chat records; plain text as text records), atomically."""
    lines = (json.dumps(formats.to_record(ex.messages, ex.plain), ensure_ascii=False) + "\n"
             for ex in examples)
    return write_atomic(path, "".join(lines))


def write_atomic(path: Path, text: str) -> Path:
    """Write to a temporary name in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    """The model's chat template applied to `messages` (transformers renders it in a sandbox)."""
    import jinja2  # noqa: PLC0415

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.SecurityError as e:
        raise ModelError(f"the model's chat template tried something unsafe and was stopped: {e}",
                         "use a model whose tokenizer_config.json / chat_template.jinja you trust") from None
    except jinja2.exceptions.TemplateError as e:
        raise ModelError(f"the model's chat template failed on a conversation: {e}",
                         "check the roles of the conversation (some templates require "
                         "user/assistant alternation), or fix the template") from None


def tokenize(tokenizer, messages: list[dict], train_on_prompt: bool = False,
             plain: bool = False) -> Tokenized:
    """Token ids of the chat-templated conversation, labels on assistant turns only.

    An assistant turn spans from the end of the prompt the template renders for it (with
    the generation header) to the end of the conversation rendered up to that turn, so the
    end-of-turn token is learned too: without it the model never stops. A plain-text
    example (one assistant turn) is tokenized as is, with EOS, and trained on every token.
    """
    if plain:
        ids = tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids = ids + [tokenizer.eos_token_id]
        return Tokenized(ids, list(ids))
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


def count_tokens(tokenizer, examples: list[Example], chunk: int = 2048) -> list[int]:
    """Tokens per example as `tokenize` makes them, counted in batches (fast for length checks)."""
    extra = len(tokenizer("", add_special_tokens=True)["input_ids"])  # the BOS/EOS it adds
    bos, eos = tokenizer.bos_token, tokenizer.eos_token_id
    counts = []
    for i in range(0, len(examples), chunk):
        part = examples[i:i + chunk]
        texts = [ex.messages[-1]["content"] if ex.plain else render(tokenizer, ex.messages)
                 for ex in part]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for ex, text, ids in zip(part, texts, encoded):
            if ex.plain:  # tokenize adds the special tokens, then EOS unless it is there
                ids = tokenizer(text, add_special_tokens=True)["input_ids"] if extra else ids
                counts.append(len(ids) + (eos is not None and ids[-1:] != [eos]))
            else:
                counts.append(len(ids) + (0 if bos and text.startswith(bos) else extra))
    return counts


def tokenize_all(tokenizer, examples: list[Example], max_len: int, train_on_prompt: bool,
                 split: str) -> list[Tokenized]:
    """Tokenize a split; truncation and examples left with nothing to learn are counted."""
    out, truncated, lost, empty = [], 0, 0, 0
    for ex in examples:
        t = tokenize(tokenizer, ex.messages, train_on_prompt, plain=ex.plain)
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


PACK_ROW = 1024  # tokens per packed row: short examples share a row, long ones get their own


@dataclass
class Batch:
    """Examples packed into rows. Position ids restart at every example, and no attention
    mask is passed: transformers then builds a block-diagonal causal mask from them, so
    no token attends across an example boundary."""

    input_ids: list[list[int]]
    position_ids: list[list[int]]
    labels: list[list[int]]
    tokens: int  # real (non-padding) tokens
    segments: list[tuple[int, int, int, int]]  # (example key, row, start, length)


def batches(items: list[Tokenized], batch_size: int, seed: int, pad_id: int, *, start_step: int = 0,
            shard: tuple[int, int] = (0, 1)):
    """Endless seeded epochs of BATCH_SIZE examples each, packed; skips the first `start_step`.

    With shard=(rank, workers), each worker gets every workers-th example of each batch.
    """
    rank, world = shard
    step = 0
    epoch = 0
    while True:
        order = list(range(len(items)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            if step >= start_step:
                yield collate([items[j] for j in order[i:i + batch_size]][rank::world], pad_id)
            step += 1
        epoch += 1


def collate(chunk: list[Tokenized], pad_id: int, row_tokens: int = PACK_ROW) -> Batch:
    """Pack examples into rows of at most max(row_tokens, longest) tokens (first fit, longest first)."""
    cap = max(row_tokens, max(len(t.input_ids) for t in chunk))
    rows: list[list[Tokenized]] = []
    for t in sorted(chunk, key=lambda t: -len(t.input_ids)):
        row = next((r for r in rows if sum(len(x.input_ids) for x in r) + len(t.input_ids) <= cap), None)
        if row is None:
            rows.append([t])
        else:
            row.append(t)
    width = max(sum(len(x.input_ids) for x in r) for r in rows)
    ids, pos, labels, segments = [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for x in row:
            segments.append((id(x), r, start, len(x.input_ids)))
            start += len(x.input_ids)
        pad = width - start
        ids.append([i for x in row for i in x.input_ids] + [pad_id] * pad)
        pos.append([k for x in row for k in range(len(x.input_ids))] + list(range(pad)))
        # an example's first token is never predicted (nothing precedes it in its own sequence)
        labels.append([lab for x in row for lab in [IGNORE] + x.labels[1:]] + [IGNORE] * pad)
    return Batch(ids, pos, labels, sum(len(t.input_ids) for t in chunk), segments)
