"""Bad data stops before any model loads: exit status 2, file:line, what is wrong, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from donkeytune import data
from donkeytune.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def bad_train(tmp_path, second_line: bytes) -> str:
    (tmp_path / "train.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + second_line + b"\n")
    (tmp_path / "valid.jsonl").write_text(json.dumps(GOOD) + "\n")
    return str(tmp_path)


CASES = {
    "invalid JSON": (b'{"messages": [', "invalid JSON"),
    "not an object": (b'[1, 2]', "expected a JSON object, got list"),
    "missing messages": (b'{"conversation": []}', 'missing "messages"'),
    "unknown role": (b'{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                     "unknown role 'bot'"),
    "empty content": (b'{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}',
                      "empty content"),
    "no assistant": (b'{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    "invalid utf-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid UTF-8"),
    "content not a string": (b'{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
                             '"content" must be a string'),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_line_is_located(tmp_path, capsys, case):
    line, expected = CASES[case]
    # A model that does not exist proves the data is checked before any model is looked at.
    status = main(["train", "--data-dir", bad_train(tmp_path, line), "--model", "no/such-model",
                   "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{tmp_path / 'train.jsonl'}:2: " in err
    assert expected in err
    assert "Traceback" not in err


def test_every_problem_is_listed(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("nope\n" + json.dumps(GOOD) + "\n[]\n")
    assert main(["train", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1: invalid JSON" in err and "train.jsonl:3: expected a JSON object" in err


def test_empty_file(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("\n\n")
    assert main(["train", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'train.jsonl'}: the file is empty" in capsys.readouterr().err


def test_missing_train(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl not found" in err and "fix:" in err


def test_missing_folder(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path)]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_missing_valid_is_a_warning(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    ds = data.load_dir(tmp_path)
    assert len(ds.train) == 1 and ds.valid == []
    assert "valid.jsonl not found" in capsys.readouterr().err


def test_bom_and_crlf_are_accepted(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n"
                                           + json.dumps(GOOD).encode() + b"\r\n")
    assert len(data.load_file(tmp_path / "train.jsonl")) == 2


def test_real_entry_point_prints_no_traceback(tmp_path):
    """The console script itself, as a user runs it."""
    d = bad_train(tmp_path, b'{"messages": 5}')
    proc = subprocess.run([sys.executable, "-m", "donkeytune", "train", "--data-dir", d,
                           "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'train.jsonl:2: "messages" must be a non-empty list' in proc.stderr
    assert "Traceback" not in proc.stderr
