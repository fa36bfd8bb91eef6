"""`donkeytune data`: check (exit 0/1/2), stats, split, merge, convert, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from donkeytune import data
from donkeytune.data import tools as datatools
from donkeytune.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
SYSTEM = {"role": "system", "content": "You are a helpful guide."}


def chat(q: str, a: str, system=SYSTEM) -> dict:
    return {"messages": ([system] if system else []) + [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]}


def clean_rows(n: int, prefix: str = "q") -> list[dict]:
    return [chat(f"{prefix} question number {i}?", f"The answer to {prefix} {i} is {i * 7}.") for i in range(n)]


def write(folder: Path, train, valid=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    if valid is not None:
        (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid), encoding="utf-8")
    return folder


def check_json(capsys, *args) -> tuple[int, dict]:
    status = main(["data", "check", *map(str, args), "--json"])
    return status, json.loads(capsys.readouterr().out)


def kinds(report: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in report["problems"]:
        out.setdefault(p["kind"], []).append(p["where"])
    return out


# ---------------------------------------------------------------- check

def test_clean_data_exits_0(tmp_path, capsys):
    d = write(tmp_path, clean_rows(40), clean_rows(10, "v"))
    assert main(["data", "check", str(d), "--no-tokenizer"]) == 0
    out = capsys.readouterr().out
    assert "data check: no problems (40 train, 10 valid examples)" in out


def test_shipped_example_is_clean_with_the_real_tokenizer(capsys, smollm2_dir):
    status, report = check_json(capsys, Path(__file__).parents[1] / "examples" / "facts")
    assert (status, report["problems"], report["skipped"]) == (0, [], [])


def test_every_warning_kind_with_location(tmp_path, capsys, smollm2_dir):
    rows = clean_rows(20)
    train = rows + [
        rows[0],                                                          # 21 duplicate of 1
        chat("Q QUESTION number 1", "the answer to q 1 is 7"),             # 22 near-duplicate of 2
        chat("Another thing?", "ok"),                                      # 23 short answer
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c d"},
                      {"role": "user", "content": "and?"}]},               # 24 no system, unanswered
        chat("Tell me everything. " * 40, "Here it is. " * 40),            # 25 too long
    ]
    valid = [rows[5], chat("Fresh?", "Yes, quite fresh.")]                # 1 leak of train 6
    d = write(tmp_path, train, valid)
    status, report = check_json(capsys, d, "--max-seq-length", 64)
    assert status == 1
    found = kinds(report)
    t, v = d / "train.jsonl", d / "valid.jsonl"
    assert found["duplicate"] == [f"{t}:21"]
    assert found["near-duplicate"] == [f"{t}:22"]
    assert found["short-answer"] == [f"{t}:23"]
    assert found["unanswered-turn"] == [f"{t}:24"]
    assert found["system-prompt"] == [f"{t}:24"]
    assert found["leak"] == [f"{v}:1"]
    assert found["small-valid"] == [str(v)]
    assert found["too-long"] == [str(t), f"{t}:25"]  # the file's total, then the example
    too_long = next(p for p in report["problems"] if p["where"] == f"{t}:25")
    assert "the last" in too_long["message"] and "from assistant answers" in too_long["message"]
    assert all(p["fix"] for p in report["problems"])
    assert [p["severity"] for p in report["problems"]] == ["warning"] * len(report["problems"])


def test_errors_of_all_files_in_one_pass_and_sorted_first(tmp_path, capsys):
    d = write(tmp_path, clean_rows(3) + [chat("x", "y")] * 2)
    with open(d / "train.jsonl", "ab") as f:
        f.write(b'{"messages": [{"role": "bot", "content": "x"}]}\nnot json\n\xff\xfe\n')
    (d / "valid.jsonl").write_text('{"prompt": "a", "completion": ""}\n')
    status, report = check_json(capsys, d, "--no-tokenizer")
    assert status == 2
    severities = [p["severity"] for p in report["problems"]]
    assert severities == sorted(severities)  # "error" < "warning": errors first
    errors = [(p["where"], p["message"]) for p in report["problems"] if p["severity"] == "error"]
    assert [w for w, _ in errors] == [f"{d / 'train.jsonl'}:6", f"{d / 'train.jsonl'}:7",
                                      f"{d / 'train.jsonl'}:8", f"{d / 'valid.jsonl'}:1"]
    assert "unknown role 'bot'" in errors[0][1] and "invalid UTF-8" in errors[2][1]
    assert '"completion" is empty' in errors[3][1]
    assert "duplicate" in kinds(report)  # warnings are still found next to errors


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "train.jsonl not found"),
    (lambda d: (d / "train.jsonl").write_text("\n \n"), "the file is empty"),
])
def test_missing_and_empty_files_are_errors(tmp_path, capsys, setup, message):
    setup(tmp_path)
    status = main(["data", "check", str(tmp_path), "--no-tokenizer"])
    out = capsys.readouterr().out
    assert status == 2 and message in out and "fix:" in out


def test_one_file_and_human_output(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(chat("a?", "b")) + "\n")
    assert main(["data", "check", str(path), "--no-tokenizer"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: very short assistant answer" in out and "fix: " in out
    assert "no valid" not in out  # a single file has no splits to compare


def test_unavailable_tokenizer_skips_the_length_check(tmp_path, capsys):
    d = write(tmp_path, clean_rows(20), clean_rows(10, "v"))
    status, report = check_json(capsys, d, "--model", str(tmp_path / "no-such-model"))
    assert status == 0 and "token lengths not checked" in report["skipped"][0]


def test_format_option_and_env_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DONKEYTUNE_DATA_DIR", str(write(tmp_path, clean_rows(20), clean_rows(10, "v"))))
    assert main(["data", "check", "--no-tokenizer"]) == 0
    assert main(["data", "check", "--no-tokenizer", "--format", "alpaca"]) == 2
    assert 'missing "instruction", "output"' in capsys.readouterr().out


FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
lines = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"{", b"[]", b"null", b'{"messages": []}', b'{"text": ""}', b"\xef\xbb\xbf{}",
                     json.dumps(chat("q", "a")).encode(), json.dumps({"text": "t"}).encode(),
                     json.dumps({"conversations": [{"from": "gpt", "value": "v"}]}).encode(),
                     b"[" * 5000 + b"]" * 5000]))


@FAST
@given(train=st.lists(lines, max_size=6), valid=st.none() | st.lists(lines, max_size=3),
       newline=st.sampled_from([b"\n", b"\r\n"]))
def test_check_on_random_data_never_crashes(tmp_path_factory, capsys, train, valid, newline):
    d = tmp_path_factory.mktemp("rand")
    (d / "train.jsonl").write_bytes(newline.join(train))
    if valid is not None:
        (d / "valid.jsonl").write_bytes(newline.join(valid))
    status, report = check_json(capsys, d, "--no-tokenizer")
    problems = report["problems"]
    assert status == (2 if any(p["severity"] == "error" for p in problems) else 1 if problems else 0)
    for p in problems:
        assert p["where"].startswith(str(d)) and p["message"] and p["fix"]


# ---------------------------------------------------------------- stats

def test_stats_counts_tokens_and_advises(tmp_path, capsys, smollm2_dir):
    d = write(tmp_path, clean_rows(50), clean_rows(10, "v"))
    main(["data", "stats", str(d), "--json"])
    result = json.loads(capsys.readouterr().out)
    tokens = result["tokens"]["train"]
    assert tokens["min"] <= tokens["median"] <= tokens["p95"] <= tokens["max"]
    assert sum(c for _, _, c in tokens["histogram"]) == 50
    training = result["training"]
    assert (training["iters"], training["batch_size"], training["epochs"]) == (600, 4, 48.0)
    assert "lower ITERS" in training["warnings"][0]
    assert main(["data", "stats", str(d), "--iters", "10", "--no-tokenizer"]) == 0
    out = capsys.readouterr().out
    assert "0.8 epochs" in out and "raise ITERS" in out and "tokens per example" not in out


def test_recommended_iters_follow_the_seed_table():
    assert datatools.epoch_advice(100, 600, 4)["recommended_iters"] == 650
    assert datatools.epoch_advice(2000, 600, 4)["recommended_iters"] == 3000
    assert 3000 < datatools.epoch_advice(8000, 600, 4)["recommended_iters"] < 12000


def test_stats_on_bad_data_is_a_located_error(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("oops\n")
    assert main(["data", "stats", str(tmp_path), "--no-tokenizer"]) == 2
    assert "train.jsonl:1: invalid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------- split

def test_split_is_seeded_stratified_and_never_leaks(tmp_path):
    rows = clean_rows(40) + [chat(f"other {i}?", f"Other answer {i}.", system={"role": "system", "content": "B"})
                             for i in range(10)] + [chat("same?", "Same answer.")] * 5
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "split", str(src), "--out", str(tmp_path / "a")]) == 0
    assert main(["data", "split", str(src), "--out", str(tmp_path / "b")]) == 0
    assert main(["data", "split", str(src), "--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    a, b, c = (data.load_dir(tmp_path / x) for x in "abc")
    assert [e.messages for e in a.valid] == [e.messages for e in b.valid]
    assert [e.messages for e in a.valid] != [e.messages for e in c.valid]
    assert len(a.train) + len(a.valid) == len(rows)
    assert sum(e.messages[0]["content"] == "B" for e in a.valid) == 2  # 20% of that prompt's 10
    train_keys = {datatools.exact_key(e) for e in a.train}
    assert not any(datatools.exact_key(e) in train_keys for e in a.valid)


def test_writers_refuse_to_overwrite_without_force(tmp_path, capsys):
    d = write(tmp_path / "d", clean_rows(10))
    before = (d / "train.jsonl").read_bytes()
    assert main(["data", "split", str(d), "--out", str(d)]) == 2
    assert "already exists (it is one of the inputs)" in capsys.readouterr().err
    assert (d / "train.jsonl").read_bytes() == before
    assert main(["data", "split", str(d), "--out", str(d), "--force"]) == 0
    assert len(data.load_dir(d).train) == 8
    assert not list(d.glob(".*tmp"))  # atomic writes leave no temporary file


# ---------------------------------------------------------------- merge

def merged(tmp_path, *inputs, out="out") -> tuple[list, list, dict]:
    assert main(["data", "merge", *map(str, inputs), "--out", str(tmp_path / out)]) == 0
    ds = data.load_dir(tmp_path / out)
    prov = json.loads((tmp_path / out / "provenance.json").read_text())
    return [e.messages for e in ds.train], [e.messages for e in ds.valid], prov


def test_merge_concatenates_dedups_and_says_where_from(tmp_path):
    a = write(tmp_path / "a", clean_rows(5), clean_rows(2, "va"))
    b = write(tmp_path / "b", clean_rows(5)[3:] + clean_rows(2, "b"), clean_rows(1))  # b's valid is in a's train
    train, valid, prov = merged(tmp_path, a, b)
    assert train == [r["messages"] for r in clean_rows(5) + clean_rows(2, "b")]
    assert valid == [r["messages"] for r in clean_rows(2, "va")]
    assert prov["train"][:2] == [f"{a / 'train.jsonl'}:1", f"{a / 'train.jsonl'}:2"]
    assert prov["train"][5:] == [f"{b / 'train.jsonl'}:3", f"{b / 'train.jsonl'}:4"]
    assert prov["removed"] == {"duplicates": [f"{b / 'train.jsonl'}:1", f"{b / 'train.jsonl'}:2"],
                               "leaks": [f"{b / 'valid.jsonl'}:1"]}


def test_merge_of_a_with_a_is_a_and_provenance_survives(tmp_path):
    a = write(tmp_path / "a", clean_rows(6), clean_rows(2, "v"))
    once = merged(tmp_path, a, a, out="m")
    assert once[:2] == merged(tmp_path, a)[:2] == ([r["messages"] for r in clean_rows(6)],
                                                   [r["messages"] for r in clean_rows(2, "v")])
    again = merged(tmp_path, tmp_path / "m", tmp_path / "m", out="m")  # a merge folder may be rewritten
    assert again[:2] == once[:2]
    assert again[2]["train"] == once[2]["train"] == [f"{a / 'train.jsonl'}:{i}" for i in range(1, 7)]


def test_make_variables_reach_merge(tmp_path, monkeypatch):
    a = write(tmp_path / "a", clean_rows(3))
    b = write(tmp_path / "b", clean_rows(2, "b"), [{"text": "plain words"}])
    monkeypatch.setenv("DONKEYTUNE_INPUTS", f"{a} {b}")
    monkeypatch.setenv("DONKEYTUNE_DATA_DIR", str(tmp_path / "m"))
    assert main(["data", "merge"]) == 0
    ds = data.load_dir(tmp_path / "m")
    assert len(ds.train) == 5 and ds.valid[0].plain


def test_merge_without_inputs_says_how(capsys, monkeypatch):
    monkeypatch.delenv("DONKEYTUNE_INPUTS", raising=False)
    assert main(["data", "merge"]) == 2
    assert "make merge-data INPUTS=" in capsys.readouterr().err


examples = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.booleans()), max_size=12)


@FAST
@given(parts=st.lists(st.tuples(examples, examples), min_size=1, max_size=3))
def test_merge_is_idempotent_order_stable_and_leak_free(parts):
    """Random folders (train, valid) of a few possibly shared examples."""
    def ex(name, plain, where):
        return data.Example([{"role": "assistant", "content": name}] if plain else
                            [{"role": "user", "content": name}, {"role": "assistant", "content": name * 2}],
                            where, plain)
    datasets = [{split: [ex(n, p, f"{i}/{split}:{k}") for k, (n, p) in enumerate(rows)]
                 for split, rows in zip(("train", "valid"), part)} for i, part in enumerate(parts)]
    train, valid, _ = datatools.merge_examples(datasets)
    keys = [datatools.exact_key(e) for e in train + valid]
    assert len(keys) == len(set(keys))  # no duplicates, nothing in both splits
    every_train = [e for ds in datasets for e in ds["train"]]
    assert [datatools.exact_key(e) for e in train] == list(dict.fromkeys(map(datatools.exact_key, every_train)))
    assert [e.where for e in train] == sorted((e.where for e in train), key=[e.where for e in every_train].index)
    once = {"train": train, "valid": valid}
    assert datatools.merge_examples([once, once])[:2] == (train, valid)
    assert datatools.merge_examples([once])[:2] == (train, valid)


# ---------------------------------------------------------------- convert

@pytest.mark.parametrize("name", ["sharegpt.json", "alpaca.jsonl", "completion.jsonl", "chat.jsonl", "text.jsonl"])
def test_convert_writes_chat_that_loads_the_same(tmp_path, name):
    assert main(["data", "convert", str(FIXTURES / name), "--out", str(tmp_path)]) == 0
    out = tmp_path / (Path(name).stem + ".jsonl")
    before = data.load_file(FIXTURES / name)
    after = data.read_file(out)
    assert [(e.messages, e.plain) for e in after.examples] == [(e.messages, e.plain) for e in before]
    assert set(after.formats) <= {"chat", "text"} and ("text" in after.formats) == (name == "text.jsonl")


def test_convert_a_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.json").write_bytes((FIXTURES / "sharegpt.json").read_bytes())
    (src / "valid.jsonl").write_bytes((FIXTURES / "alpaca.jsonl").read_bytes())
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "dst")]) == 0
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["train.jsonl", "valid.jsonl"]
    assert data.read_file(tmp_path / "dst" / "train.jsonl").formats == {"chat": 2}
