"""Chat data: reading and validating JSONL or JSON (several formats, see formats.py).

Every problem in the data is reported with file:line before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import formats
from ..errors import DataError
from ..files import write_atomic
from ..progress import warn

MAX_SHOWN = 10  # problems listed in one error message
SPLIT_FILES = ("{}.jsonl", "{}.json")  # train.jsonl, else train.json (JSON array or JSONL)


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


TOO_LONG_NUMBER = f"invalid JSON: a number of more than {sys.get_int_max_str_digits()} digits"


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
    except ValueError:  # a number of more than 4300 digits (Python's limit)
        raise ValueError(TOO_LONG_NUMBER) from None


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
            except ValueError:  # a number of more than 4300 digits (Python's limit)
                yield start, ValueError(f"{TOO_LONG_NUMBER} (the rest of the array is not read)")
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


def write_records(path: Path, examples: list[Example]) -> Path:
    """Write examples as JSONL (chat records; plain text as text records), atomically."""
    lines = (json.dumps(formats.to_record(ex.messages, ex.plain), ensure_ascii=False) + "\n"
             for ex in examples)
    return write_atomic(path, "".join(lines))


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


def keyword_hit(answer: str, keyword) -> bool | None:
    """A held-out question's score: its keyword is in the answer (None: no keyword to look for)."""
    return None if not keyword else keyword.lower() in answer.lower()
