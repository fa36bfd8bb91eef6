"""The documented commands do what they say: stale GGUFs refused, RESUME_FROM's own base model,
the seed's Method A (merge into a filled ./data), the fused model in the base model's dtype."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from donkeytune import config, runinfo
from donkeytune.errors import ModelError
from donkeytune.use import chat
from donkeytune.use import test as use_test

from conftest import write_jsonl
from test_train import chat as chat_row


def converted_run(out: Path) -> Path:
    """An output folder as `convert` leaves it: an adapter, a GGUF and the record of both."""
    (out / "adapters").mkdir(parents=True)
    (out / "adapters" / "adapter_model.safetensors").write_bytes(b"adapter one")
    gguf = out / "gguf" / "m-finetuned-Q4_K_M.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    made_from = dict(adapter_fingerprint=runinfo.adapter_fingerprint(out / "adapters"),
                     base_fingerprint="b")
    runinfo.write_json(out / "gguf" / "donkeytune.json", dict(
        quantized=gguf.name, full="m-finetuned-f16.gguf", files={gguf.name: made_from}, **made_from))
    return gguf


def test_a_gguf_of_an_earlier_training_is_refused_with_the_fix(tmp_path):
    out = tmp_path / "out"
    gguf = converted_run(out)
    opts = config.resolve(config.ChatOptions, {"output_dir": str(out)}, environ={})
    assert chat.resolve_gguf(opts)[0] == gguf
    test_opts = config.resolve(config.TestOptions, {"output_dir": str(out)}, environ={})
    assert use_test._converted_gguf(test_opts) == gguf
    (out / "adapters" / "adapter_model.safetensors").write_bytes(b"adapter two")  # trained again
    for call in (lambda: chat.resolve_gguf(opts), lambda: use_test._converted_gguf(test_opts)):
        with pytest.raises(ModelError, match="converted from an earlier adapter") as e:
            call()
        assert "make convert" in e.value.fix
    # a GGUF of the user's own is theirs to run
    own = tmp_path / "own.gguf"
    own.write_bytes(b"GGUF")
    assert chat.resolve_gguf(config.resolve(config.ChatOptions, {"output_dir": str(out),
                                                                "gguf": str(own)}, environ={}))[0] == own


def test_a_gguf_converted_before_fingerprints_is_judged_by_time(tmp_path):
    out = tmp_path / "out"
    gguf = converted_run(out)
    meta = json.loads((out / "gguf" / "donkeytune.json").read_text())
    runinfo.write_json(out / "gguf" / "donkeytune.json", {"quantized": meta["quantized"]})
    opts = config.resolve(config.ChatOptions, {"output_dir": str(out)}, environ={})
    assert chat.resolve_gguf(opts)[0] == gguf
    later = time.time() + 5
    import os

    os.utime(out / "adapters" / "adapter_model.safetensors", (later, later))
    with pytest.raises(ModelError, match="earlier adapter"):
        chat.resolve_gguf(opts)


def test_resume_from_takes_model_from_the_adapters_run(tmp_path):
    from donkeytune import train

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat_row("q", "a")] * 4)
    adapter = tmp_path / "old" / "adapters"
    adapter.mkdir(parents=True)
    (adapter / "adapters.safetensors").write_bytes(b"x")
    runinfo.write_json(adapter / "donkeytune.json", dict(base_model="some/base-model"))
    opts = config.resolve(config.TrainOptions, dict(data_dir=str(data), output_dir=str(tmp_path / "new"),
                          resume_from=str(adapter / "adapters.safetensors")), environ={})
    assert train._checked(opts)[0].model == "some/base-model"
    # mlx-lm's adapter_config.json names it too
    mlx = tmp_path / "mlx"
    mlx.mkdir()
    (mlx / "adapters.safetensors").write_bytes(b"x")
    (mlx / "adapter_config.json").write_text(json.dumps({"model": "unsloth/gemma-3-270m-it"}))
    assert train.adapter_base_model(mlx / "adapters.safetensors") == "unsloth/gemma-3-270m-it"
    # a MODEL you give is kept (a different base is then the resume check's clear error)
    given = config.resolve(config.TrainOptions, dict(data_dir=str(data), model="other/model",
                           output_dir=str(tmp_path / "n2"), resume_from=str(adapter)), environ={})
    assert train._checked(given)[0].model == "other/model"


def test_merge_into_a_filled_folder_backs_the_old_files_up(tmp_path, capsys):
    from donkeytune.data import tools

    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "data"
    write_jsonl(a / "train.jsonl", [chat_row("qa", "aa")])
    write_jsonl(b / "train.jsonl", [chat_row("qb", "ab")])
    write_jsonl(dest / "train.jsonl", [chat_row("old", "old")])
    write_jsonl(dest / "valid.jsonl", [chat_row("oldv", "oldv")])
    old_train = (dest / "train.jsonl").read_text()
    tools.merge(config.resolve(config.DataMergeOptions, {"inputs": [str(a), str(b)],
                                                         "out": str(dest)}, environ={}))
    backups = sorted(dest.glob("backup-*"))
    assert len(backups) == 1 and (backups[0] / "train.jsonl").read_text() == old_train
    assert (backups[0] / "valid.jsonl").is_file() and not (dest / "valid.jsonl").exists()
    assert "qa" in (dest / "train.jsonl").read_text() and "old" not in (dest / "train.jsonl").read_text()
    assert f"moved train.jsonl, valid.jsonl to {backups[0]}/" in capsys.readouterr().err
    # merging again into the merge's own output replaces it (its inputs still hold everything)
    tools.merge(config.resolve(config.DataMergeOptions, {"inputs": [str(b)], "out": str(dest)},
                               environ={}))
    assert len(sorted(dest.glob("backup-*"))) == 1
