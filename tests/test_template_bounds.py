"""A chat template cannot hang the tool (issue 20, item 6): time, range size and includes are bounded."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from donkeytune import data, device
from donkeytune.cli import main
from donkeytune.errors import ModelError
from donkeytune.gguf.vocab import render_turn

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
NESTED = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
          "{% endfor %}{% endfor %}{% endfor %}")
HOSTILE = {
    "nested loops": NESTED,
    "range(10**9)": "{% for i in range(10**9) %}x{% endfor %}",
    "include": "{% include 'other.jinja' %}",
    "import": "{% import 'other.jinja' as o %}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_is_a_clear_error_quickly(tiny_model, name):
    tok = device.load_tokenizer(tiny_model("llama"))
    tok.chat_template = HOSTILE[name]
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="tried something unsafe") as e:
        data.render(tok, MESSAGES)
    assert time.monotonic() - t0 < 5


def test_export_template_reading_does_not_hang():
    t0 = time.monotonic()
    assert render_turn(NESTED) is None  # export falls back to a text search
    assert time.monotonic() - t0 < 5


def test_a_normal_template_still_renders(tiny_model):
    tok = device.load_tokenizer(tiny_model("llama"))
    assert "hello" in data.render(tok, MESSAGES)


def test_data_check_stops_on_a_looping_template(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    (model / "chat_template.jinja").write_text(NESTED, encoding="utf-8")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"messages": MESSAGES}) + "\n")
    t0 = time.monotonic()
    assert main(["data", "check", str(folder), "--model", str(model)]) == 2
    assert "unsafe" in capsys.readouterr().err
    assert time.monotonic() - t0 < 10
