"""Dataset formats: detection, conversion to chat, training tokens, and a reader that never crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from donkeytune import data
from donkeytune.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
GUIDE = {"role": "system", "content": "You are the Donkey Valley guide."}
MILL = [{"role": "user", "content": "Where is the mill?"},
        {"role": "assistant", "content": "By the river, past the old bridge."}]
OPEN = [{"role": "user", "content": "Is it open today?"},
        {"role": "assistant", "content": "Yes, from nine to five."},
        {"role": "user", "content": "And on Sunday?"},
        {"role": "assistant", "content": "Only in the morning."}]

# fixture file -> (format, the chat messages of its records, plain text?)
EXPECTED = {
    "chat.jsonl": ("chat", [[GUIDE, *MILL], OPEN], False),
    "sharegpt.json": ("sharegpt", [[GUIDE, *MILL], OPEN], False),
    "alpaca.jsonl": ("alpaca", [[GUIDE, *MILL],
                                [{"role": "user", "content": "Translate to French.\n\nThe mill is open."},
                                 {"role": "assistant", "content": "Le moulin est ouvert."}]], False),
    "completion.jsonl": ("completion", [MILL, OPEN[:2]], False),
    "text.jsonl": ("text", [[{"role": "assistant", "content": "The mill of Donkey Valley stands by the "
                                                            "river, past the old bridge."}],
                            [{"role": "assistant", "content": "It is open from nine to five, and on "
                                                             "Sunday mornings."}]], True),
}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from donkeytune import device

    return device.load_tokenizer(smollm2_dir)


@pytest.mark.parametrize("name", EXPECTED)
def test_fixture_is_detected_and_read(name):
    fmt, messages, plain = EXPECTED[name]
    got = data.read_file(FIXTURES / name)
    assert got.problems == []
    assert got.formats == {fmt: len(messages)}
    assert [ex.messages for ex in got.examples] == messages
    assert all(ex.plain == plain for ex in got.examples)
    assert [ex.where for ex in got.examples][0].startswith(f"{FIXTURES / name}:")


@pytest.mark.parametrize("name", EXPECTED)
def test_round_trip_to_chat_and_training_tokens(name, tmp_path, tok):
    """format -> chat records on disk -> the same examples -> tokens with the right loss mask."""
    examples = data.load_file(FIXTURES / name)
    out = data.write_records(tmp_path / "train.jsonl", examples)
    again = data.load_file(out)
    assert [(e.messages, e.plain) for e in again] == [(e.messages, e.plain) for e in examples]
    for ex in again:
        t = data.tokenize(tok, ex.messages, plain=ex.plain)
        trained = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != data.IGNORE])
        if ex.plain:  # every token, the text as is plus EOS: no template around it
            assert t.labels == t.input_ids
            assert trained == ex.messages[0]["content"] + tok.eos_token
        else:  # the answers and their end-of-turn token, nothing of the prompts
            assert trained == "".join(m["content"] + "<|im_end|>\n"
                                      for m in ex.messages if m["role"] == "assistant")
    counted = data.count_tokens(tok, again)
    assert counted == [len(data.tokenize(tok, e.messages, plain=e.plain).input_ids) for e in again]


def test_plain_text_is_trained_in_tokenize_all(tok):
    examples = data.load_file(FIXTURES / "text.jsonl")
    out = data.tokenize_all(tok, examples, max_len=512, train_on_prompt=False, split="train")
    assert all(t.labels == t.input_ids for t in out)


def test_json_and_jsonl_folders_load_the_same(tmp_path):
    for name, fmt_file in (("train", "sharegpt.json"), ("valid", "chat.jsonl")):
        suffix = Path(fmt_file).suffix
        (tmp_path / f"{name}{suffix}").write_bytes((FIXTURES / fmt_file).read_bytes())
    ds = data.load_dir(tmp_path)
    assert [e.messages for e in ds.train] == [e.messages for e in ds.valid]
    assert [p.name for p in ds.files] == ["train.json", "valid.jsonl"]


def test_both_json_and_jsonl_is_an_error(tmp_path):
    for name in ("train.jsonl", "train.json"):
        (tmp_path / name).write_bytes((FIXTURES / "chat.jsonl").read_bytes())
    with pytest.raises(DataError, match="both train.jsonl and train.json"):
        data.load_dir(tmp_path)


def test_forced_format_reports_against_it(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_file(FIXTURES / "alpaca.jsonl", "chat")
    assert f"{FIXTURES / 'alpaca.jsonl'}:1: missing \"messages\" (keys found: instruction" in str(e.value)
    assert len(data.load_file(FIXTURES / "chat.jsonl", "chat")) == 2


BAD_RECORDS = {
    "sharegpt unknown from": ({"conversations": [{"from": "bot", "value": "x"}]}, "turn 1: unknown \"from\" 'bot'"),
    "sharegpt value": ({"conversations": [{"from": "human", "value": 1}]}, '"value" must be a string'),
    "sharegpt empty": ({"conversations": []}, '"conversations" must be a non-empty list'),
    "alpaca empty output": ({"instruction": "x", "output": " "}, '"output" is empty'),
    "alpaca input": ({"instruction": "x", "input": 3, "output": "y"}, '"input" must be a string'),
    "completion type": ({"prompt": ["x"], "completion": "y"}, '"prompt" must be a string, got list'),
    "text null": ({"text": None}, '"text" must be a string, got null'),
    "surrogate": ({"text": "\ud800"}, "not valid Unicode"),
    "system later": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                   {"role": "assistant", "content": "c"}]}, "a system message must come first"),
    "sharegpt no answer": ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_record_of_each_format_is_located(tmp_path, case):
    record, expected = BAD_RECORDS[case]
    good = {"messages": MILL}  # formats are detected per record: a file may mix them
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    got = data.read_file(path)
    assert [(p.line, p.severity) for p in got.problems] == [(2, "error")]
    assert expected in got.problems[0].message


def test_json_array_elements_are_located(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n   "completion": 5},\n'
                    '  {"text": "t"}\n]\n')
    got = data.read_file(path)
    assert [ex.where for ex in got.examples] == [f"{path}:2", f"{path}:6"]
    assert [(p.line, p.message) for p in got.problems] == [(4, '"completion" must be a string, got int')]


@pytest.mark.parametrize("text, line, message", [
    ('[\n{"text": "a"},\n{"text": "b"\n', 4, "invalid JSON"),
    ('[\n{"text": "a"} {"text": "b"}]', 2, "expected , or ]"),
    ('[{"text": "a"}]\nmore', 2, "text after the closing ]"),
    ('\ufeff[ ]\n', None, "the JSON array is empty"),
])
def test_broken_json_array_is_located(tmp_path, text, line, message):
    path = tmp_path / "valid.json"
    path.write_text(text, encoding="utf-8")
    got = data.read_file(path)
    assert got.problems[-1].line == line and message in got.problems[-1].message


# ---------------------------------------------------------------- the reader never crashes

def _assert_located(got: data.FileData, path: Path) -> None:
    for p in got.problems:
        assert p.severity == "error" and p.path == str(path) and p.message
        assert p.line is None or p.line >= 1
        assert p.where.startswith(str(path))
    assert all(ex.where.startswith(f"{path}:") for ex in got.examples)


FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["messages", "role", "content", "conversations", "from", "value", "instruction",
                         "input", "output", "prompt", "completion", "text", "system", "x"]),
        children, max_size=4),
    max_leaves=12)


@FAST
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json"]))
def test_random_bytes_never_crash(tmp_path, raw, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(raw)
    _assert_located(data.read_file(path), path)


@FAST
@given(records=st.lists(json_values, min_size=1, max_size=6), bom=st.booleans(),
       newline=st.sampled_from(["\n", "\r\n"]), suffix=st.sampled_from([".jsonl", ".json"]),
       as_array=st.booleans())
def test_random_records_never_crash(tmp_path, records, bom, newline, suffix, as_array):
    """Wrong shapes of every format, BOMs, CRLF, JSON arrays: located errors, never a traceback."""
    body = (json.dumps(records, indent=1) if as_array else
            newline.join(json.dumps(r) for r in records) + newline)
    path = tmp_path / f"train{suffix}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.replace("\n", newline).encode("utf-8"))
    got = data.read_file(path)
    _assert_located(got, path)
    if not as_array and not (suffix == ".json" and isinstance(records[0], list)):
        # one record per line: each is an example or an error (a .json starting with [ is an array)
        assert len(got.examples) + len(got.problems) == len(records)


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(min_value=1, max_value=200_000), length=st.integers(0, 1_000_000))
@example(depth=200_000, length=1_000_000)
def test_deep_json_and_long_lines(tmp_path, depth, length):
    path = tmp_path / "train.jsonl"
    deep = "[" * depth + "]" * depth
    long = json.dumps({"messages": [{"role": "user", "content": "x" * length},
                                    {"role": "assistant", "content": "y"}]})
    path.write_text(deep + "\n" + long + "\n")
    got = data.read_file(path)
    _assert_located(got, path)
    assert [p.line for p in got.problems] == ([1, 2] if length == 0 else [1])
    assert len(got.examples) == (length > 0)
