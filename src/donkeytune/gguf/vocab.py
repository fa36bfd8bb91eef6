"""Tokenizer metadata for GGUF: tokens, types, merges or scores, special ids, chat template.

Two tokenizer families: byte-level BPE (`gpt2` in llama.cpp: SmolLM, Qwen, Llama 3) and
SentencePiece (`llama` in llama.cpp: Gemma). Uses the `tokenizers` library, never torch.
"""

from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelError
from ..files import read_json
from ..progress import warn
from .archs import Arch

T = gguf.TokenType

# llama.cpp's convert_hf_to_gguf.py names the pre-tokenizer by hashing the token ids of this
# text (get_vocab_base_pre); llama.cpp then applies its own split regex for that name.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Hashes copied from llama.cpp's table, for the tokenizers of the architectures we export.
PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM 1/2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5-2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen 3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
}
# Token texts that end a chat turn in the templates of the families we support.
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def add_vocab(w: gguf.GGUFWriter, folder: Path, cfg: dict, arch: Arch) -> dict[str, int]:
    """Write the tokenizer, special tokens and chat template of an HF folder into `w`.

    Returns the vocabulary (token text -> id).
    """
    from tokenizers import Tokenizer  # noqa: PLC0415 - only needed on export

    tok_json = read_json(folder / "tokenizer.json", missing={})
    if not tok_json:
        raise ModelError(f"{folder} has no tokenizer.json", "save the tokenizer with the model "
                         "(tokenizer.save_pretrained(folder))")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_cfg = read_json(folder / "tokenizer_config.json", missing={})
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= cfg["vocab_size"]:
        raise ModelError(f"{folder}: the tokenizer has ids up to {max(vocab.values())} but the "
                         f"model's vocab_size is {cfg['vocab_size']}",
                         "resize the embeddings (model.resize_token_embeddings) and save again")

    model = tok_json["model"]
    if (folder / "tokenizer.model").exists() or model.get("byte_fallback"):
        _add_sentencepiece(w, folder, tok_json, cfg["vocab_size"])
        if arch.gguf_arch == gguf.MODEL_ARCH.GEMMA3:
            w.add_add_space_prefix(False)
    else:
        _add_bpe(w, tok, tok_json, cfg["vocab_size"])
    ids = _special_ids(folder, cfg, tok_cfg, vocab)
    template = chat_template(folder, tok_cfg)
    if template and arch.template_fix:
        template = arch.template_fix(template)
    _add_special(w, ids, tok_cfg, tok, template, vocab)
    if template:
        w.add_chat_template(template)
    return vocab


# ---- byte-level BPE ----

def _add_bpe(w: gguf.GGUFWriter, tok, tok_json: dict, vocab_size: int) -> None:
    tokens, types = _bpe_tokens(tok, tok_json, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tok, tok_json))
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = tok_json["model"].get("merges") or []
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


def _bpe_tokens(tok, tok_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # pad to the embedding rows
    types = [T.UNUSED] * vocab_size
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        types[i] = T.NORMAL
        if i in added:
            text, types[i] = _added_token(tok, added[i])
        tokens[i] = text
    return tokens, types


def _added_token(tok, info: dict) -> tuple[str, int]:
    """Added tokens as llama.cpp expects them: pre-normalized, control if special."""
    text = info["content"]
    if not info.get("normalized", False):
        text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
    if info.get("special") or _looks_special(text):
        return text, T.CONTROL
    return text.replace("\u2581", " "), T.USER_DEFINED


def _looks_special(text: str) -> bool:
    return (text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def pre_tokenizer(tok, tok_json: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (see CHKTXT)."""
    chkhsh = sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
    if chkhsh in PRE_BY_HASH:
        return PRE_BY_HASH[chkhsh]
    # Unknown hash (e.g. a tokenizer with extra tokens): recognise the split regex instead.
    pattern = json.dumps(tok_json.get("pre_tokenizer") or {})
    guess = ("llama-bpe" if r"\\p{N}{1,3}" in pattern else
             "qwen2" if r"\\p{L}+|\\p{N}|" in pattern else "default")
    warn(f"tokenizer pre-tokenizer not recognised (hash {chkhsh[:12]}), using {guess!r}")
    return guess


# ---- SentencePiece ----

def _add_sentencepiece(w: gguf.GGUFWriter, folder: Path, tok_json: dict, vocab_size: int) -> None:
    spm = folder / "tokenizer.model"
    pieces = read_sentencepiece(spm.read_bytes()) if spm.exists() else _pieces_from_json(tok_json)
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [T.UNUSED] * vocab_size
    for i, (piece, score, kind) in enumerate(pieces[:vocab_size]):
        tokens[i], scores[i], types[i] = piece.encode(), score, kind
    for info in tok_json.get("added_tokens", []):
        i = info["id"]
        if i < vocab_size:
            text = info["content"]
            special = info.get("special") or _looks_special(text)
            tokens[i] = (text if special else text.replace("\u2581", " ")).encode()
            scores[i], types[i] = -1000.0, T.CONTROL if special else T.USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def read_sentencepiece(blob: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) from a tokenizer.model, without the sentencepiece package.

    ModelProto field 1 repeats SentencePiece{1: piece, 2: score, 3: type}; the type enum
    (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) is GGUF's.
    """
    pieces = []
    for field, value in _proto_fields(blob):
        if field == 1:
            piece, score, kind = "", 0.0, 1
            for f, v in _proto_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = float(np.frombuffer(v, "<f4")[0])
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
    return pieces


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a protobuf message: varints as int, others as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ModelError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        yield field, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _pieces_from_json(tok_json: dict) -> list[tuple[str, float, int]]:
    """SentencePiece-style pieces from a tokenizer.json BPE with byte fallback.

    llama.cpp merges the adjacent pair whose joined piece scores highest; HF merges by rank,
    so a piece's score is minus the rank of the merge that makes it. Single characters and
    byte tokens are never the result of a merge (score 0); a longer piece that no merge
    makes cannot appear in HF's output, so it gets the lowest score, merged last if at all.
    Ids the model vocabulary skips stay `[PAD<id>]`/unused, like the padding rows.
    """
    model = tok_json["model"]
    rank = {}
    for r, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    lowest = -float(len(rank) + 1)
    unk = model.get("unk_token")
    pieces = [(f"[PAD{i}]", -1000.0, T.UNUSED) for i in range(max(model["vocab"].values()) + 1)]
    for piece, i in model["vocab"].items():
        kind = (T.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else
                T.UNKNOWN if piece == unk else T.NORMAL)
        score = (-float(rank[piece]) if piece in rank else
                 0.0 if kind != T.NORMAL or len(piece) == 1 else lowest)
        pieces[i] = (piece, score, kind)
    return pieces


# ---- special tokens and chat template ----

def chat_template(folder: Path, tok_cfg: dict) -> str | list | None:
    """The template transformers would use: chat_template.jinja (transformers 5) first."""
    path = folder / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    return read_json(folder / "chat_template.json", missing={}).get("chat_template") or tok_cfg.get("chat_template")


def _token_id(value, vocab: dict[str, int]) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    return vocab.get(value) if isinstance(value, str) else None


def _first(value) -> int | None:
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def _special_ids(folder: Path, cfg: dict, tok_cfg: dict, vocab: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad: tokenizer_config first, then generation_config, then config."""
    gen = read_json(folder / "generation_config.json", missing={})
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        found = _token_id(tok_cfg.get(f"{kind}_token"), vocab)
        for source in (gen, cfg):
            if found is None:
                found = _first(source.get(f"{kind}_token_id"))
        if found is not None:
            ids[kind] = found
    lists = [src["eos_token_id"] for src in (gen, cfg) if isinstance(src.get("eos_token_id"), list)]
    ids["_extra_eos"] = [i for ids_ in lists for i in ids_ if i != ids.get("eos")]
    return ids


def _add_special(w: gguf.GGUFWriter, ids: dict, tok_cfg: dict, tok, template, vocab) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        if kind in ids:
            getattr(w, f"add_{kind}_token_id")(ids[kind])
    # The turn-end token must stop generation: make it EOT when it is not already EOS.
    eot = turn_end_id(template, vocab)
    if eot is None and ids["_extra_eos"]:
        eot = ids["_extra_eos"][0]
    if eot is not None and eot != ids.get("eos"):
        w.add_eot_token_id(eot)
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:  # no explicit setting: see whether the post-processor prepends BOS
        add_bos = "bos" in ids and tok.encode("a").ids[:1] == [ids["bos"]]
    w.add_add_bos_token(bool(add_bos))
    w.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))


def turn_end_id(template, vocab: dict[str, int]) -> int | None:
    """The special token that closes an assistant turn in the chat template, if any."""
    text = render_turn(template)
    candidates = [t for t in TURN_ENDS if t in vocab]
    if text is not None:
        after = text.split("ASSISTANT_REPLY", 1)[-1].lstrip()
        for t in candidates:
            if after.startswith(t):
                return vocab[t]
    if isinstance(template, str):  # template did not render: first turn-end it mentions
        found = sorted((template.find(t), t) for t in candidates if t in template)
        return vocab[found[0][1]] if found else None
    return None


def render_turn(template) -> str | None:
    """Render a one-exchange conversation with the template (jinja2, as transformers does)."""
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        return None
    try:
        from jinja2.ext import loopcontrols  # noqa: PLC0415
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
        env.globals["strftime_now"] = lambda fmt: "01 Jan 2025"
        messages = [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "ASSISTANT_REPLY"}]
        from ..data.template import bounded  # noqa: PLC0415 - a hostile template must not hang export

        with bounded():
            return env.from_string(template).render(messages=messages, add_generation_prompt=False,
                                                    bos_token="", eos_token="")
    except Exception:  # noqa: BLE001 - any template failure falls back to a text search
        return None
