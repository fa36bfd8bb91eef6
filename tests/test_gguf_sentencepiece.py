"""The SentencePiece path of the GGUF exporter (Gemma), on a small tokenizer built offline.

The tokenizer is shaped like Gemma's tokenizer.json: BPE with byte fallback, spaces as "▁",
no dummy prefix, <bos> prepended, 256 `<0xNN>` byte pieces, control tokens for turns and a
user-defined "\\n". It is checked in the GGUF (types, scores, byte pieces, special ids) and
against llama.cpp's own tokenizer. The real Gemma-3 tokenizer: tests/test_gemma3_real.py.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import ROOT, make_tiny_model

from donkeytune.gguf import export
from donkeytune.gguf.runtime import load_llama

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
USER = ["\n", "\n\n"]  # Gemma keeps newline runs as user-defined (non-special) added tokens
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
          "café crème brûlée, naïve façade", "She sells sea shells by the sea shore."]
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.",
         "café crème brûlée, Ångström", "Emoji 🦙🚀 and 中文 fall back to bytes",
         " leading space", "   three spaces", "trailing  ", "line1\nline2\n\n\tTab\t\tx",
         "<start_of_turn>user\nhi<end_of_turn>\n", "<start_of_turn>model\nHello!<end_of_turn>\n",
         "zzz qqq xyzzy", "\n\n\n"]


def gemma_like_tokenizer(dest: Path) -> Path:
    """Write an HF tokenizer folder in the layout of Gemma's tokenizer.json."""
    from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=160, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS * 10, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(trained["vocab"], key=trained["vocab"].get)
    vocab = {p: i for i, p in enumerate(SPECIAL + BYTES + learned + USER)}
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # Gemma's (a no-op)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in USER])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                 unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    hf.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory) -> Path:
    """A tiny random Gemma-3 with the Gemma-like tokenizer and Gemma-3's chat template."""
    tok_dir = gemma_like_tokenizer(tmp_path_factory.mktemp("gemma-tok"))
    folder = make_tiny_model("gemma3", tmp_path_factory.mktemp("tiny-gemma-spm"), tok_dir)
    template = json.loads((ROOT / "tests/fixtures/chat_templates.json").read_text())
    (folder / "chat_template.jinja").write_text(template["templates"]["gemma3"]["chat_template"])
    return folder


def fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {n: f.contents() for n, f in reader.fields.items() if not n.startswith("GGUF.")}


def assert_tokenizes_like_hf(gguf_path: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    llm = load_llama(gguf_path, vocab_only=True)
    try:
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
            assert llm.detokenize(ids[1:], special=True).decode() == tok.decode(ids[1:]), text
    finally:
        llm.close()


def test_gemma_like_tokenizer_json_exports_as_sentencepiece(gemma_folder, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_folder)
    assert tok("hi 🦙")["input_ids"][0] == 2
    assert "<0xF0>" in tok.tokenize("hi 🦙")  # byte fallback
    out = export(gemma_folder, tmp_path / "g.gguf", "f16")
    f = fields(out)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_space_prefix"] is False
    assert f["tokenizer.ggml.add_eos_token"] is False
    kinds = ("bos", "eos", "unknown", "padding", "eot")
    ids = {k: f[f"tokenizer.ggml.{k}_token_id"] for k in kinds}
    assert ids == {"bos": 2, "eos": 1, "unknown": 3, "padding": 0, "eot": 6}  # eot: <end_of_turn>

    tokens, types, scores = (f[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    vocab = tok.get_vocab()
    assert len(tokens) == len(types) == len(scores) == len(vocab)
    assert tokens[: len(SPECIAL)] == SPECIAL and set(types[: len(SPECIAL)]) == {3}  # control
    assert tokens[7:263] == BYTES and set(types[7:263]) == {6}  # byte pieces
    assert [(tokens[vocab[t]], types[vocab[t]]) for t in USER] == [(t, 4) for t in USER]
    learned = range(263, len(vocab) - len(USER))
    assert all(types[i] == 1 for i in learned)
    # merged pieces score minus their merge rank: earlier merges win, as HF's BPE ranks them
    merges = json.loads((gemma_folder / "tokenizer.json").read_text())["model"]["merges"]
    for rank, (a, b) in enumerate(merges[:20]):
        assert scores[vocab[a + b]] == -rank
    assert all(scores[i] == 0 for i in learned if len(tokens[i]) == 1)
    assert_tokenizes_like_hf(out, gemma_folder)


def encode_sentencepiece(pieces: list[tuple[str, float, int]]) -> bytes:
    """A minimal tokenizer.model (ModelProto with only its pieces), protobuf by hand."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def field(num: int, payload: bytes) -> bytes:
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    blob = b""
    for piece, score, kind in pieces:
        body = field(1, piece.encode()) + varint(2 << 3 | 5) + struct.pack("<f", score)
        body += varint(3 << 3) + varint(kind)
        blob += field(1, body)
    return blob


def test_tokenizer_model_supplies_scores_and_types(gemma_folder, tmp_path):
    """With a tokenizer.model next to tokenizer.json, pieces, scores and types come from it."""
    from donkeytune.gguf.vocab import read_sentencepiece

    folder = shutil.copytree(gemma_folder, tmp_path / "with-spm")
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    vocab, merges = tok_json["model"]["vocab"], tok_json["model"]["merges"]
    rank = {a + b: r for r, (a, b) in reversed(list(enumerate(merges)))}
    pieces = []
    for piece in sorted(vocab, key=vocab.get):
        kind = 3 if piece in SPECIAL else 6 if piece in BYTES else 4 if piece in USER else 1
        kind = 2 if piece == "<unk>" else kind
        pieces.append((piece, -0.5 - rank[piece] if piece in rank else 0.0, kind))
    (folder / "tokenizer.model").write_bytes(encode_sentencepiece(pieces))
    assert read_sentencepiece((folder / "tokenizer.model").read_bytes()) == pieces

    f = fields(export(folder, tmp_path / "spm.gguf", "f16"))
    first = next(i for i, (p, _, k) in enumerate(pieces) if k == 1 and p in rank)
    assert f["tokenizer.ggml.scores"][first] == pieces[first][1]  # from the .model, not -rank
    assert f["tokenizer.ggml.token_type"][vocab["<unk>"]] == 3  # added special tokens: control
    assert f["tokenizer.ggml.token_type"][vocab["<0x41>"]] == 6
    assert_tokenizes_like_hf(tmp_path / "spm.gguf", folder)


def test_gemma_turn_end_stops_chat(gemma_folder, tmp_path):
    """llama.cpp ends a chat reply at <end_of_turn> (EOT) and at <eos>, and shows neither."""
    out = export(gemma_folder, tmp_path / "g.gguf", "f16")
    llm = load_llama(out, n_ctx=256, n_threads=2)
    try:
        for stop_id in (6, 1):  # <end_of_turn>, <eos>
            res = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=16,
                                             temperature=0, logit_bias={stop_id: 100.0})
            choice = res["choices"][0]
            assert choice["finish_reason"] == "stop" and res["usage"]["completion_tokens"] <= 1
            assert "<end_of_turn>" not in choice["message"]["content"]
        res = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=8,
                                         temperature=0, logit_bias={6: -100.0, 1: -100.0})
        assert res["choices"][0]["finish_reason"] == "length"  # without them it runs on
        # one <bos>: the template writes it, so llama-cpp-python must not add another
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gemma_folder)
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                      add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        assert ids[:2] == [2, 5] and res["usage"]["prompt_tokens"] == len(ids)
    finally:
        llm.close()


def test_pieces_from_tokenizer_json_edge_cases():
    """Pieces no merge makes score lowest (HF never emits them); vocabulary holes stay unused."""
    from donkeytune.gguf.vocab import _pieces_from_json

    model = {"type": "BPE", "unk_token": "<unk>", "byte_fallback": True,
             "vocab": {"<unk>": 0, "<0x41>": 1, "a": 2, "b": 3, "ab": 4, "ba": 5, "abab": 7},
             "merges": [["a", "b"], ["ab", "ab"]]}
    pieces = _pieces_from_json({"model": model})
    assert pieces[0] == ("<unk>", 0.0, 2) and pieces[1] == ("<0x41>", 0.0, 6)
    assert pieces[2][1] == pieces[3][1] == 0.0  # single characters: never a merge result
    assert pieces[4][1] == 0.0 and pieces[7][1] == -1.0  # minus the merge rank
    assert pieces[5][1] < -1.0  # "ba": no merge makes it, so llama.cpp must prefer the others
    assert pieces[6] == ("[PAD6]", -1000.0, 5)  # id 6 is not in the vocabulary
