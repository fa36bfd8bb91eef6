"""Safe by default: chat templates run sandboxed; a hostile template is a clear error."""

from __future__ import annotations

import pytest

from donkeytune import data, device
from donkeytune.errors import ModelError

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_hostile_chat_template_is_stopped(tiny_model, tmp_path):
    tok = device.load_tokenizer(tiny_model("llama"))
    marker = tmp_path / "pwned"
    tok.chat_template = ("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                         "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}")
    with pytest.raises(ModelError, match="tried something unsafe"):
        data.tokenize(tok, MESSAGES)
    assert not marker.exists()


def test_broken_chat_template_is_a_clear_error(tiny_model):
    tok = device.load_tokenizer(tiny_model("llama"))
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ModelError, match="Conversation roles must alternate"):
        data.tokenize(tok, MESSAGES)
