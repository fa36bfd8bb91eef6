"""Tiny random models of the families users pick today, built from transformers' own configs.

Each is 2-3 blocks of hidden size 64 with one of two tokenizers: SmolLM2's byte-level BPE, or
a SentencePiece model trained here offline (the Gemma families, whose llama.cpp converter
classes read tokenizer.model). Settings that change the maths (Granite's multipliers, Gemma 2's
soft-capping, sliding windows, partial rotary) are set away from their neutral values, so a
converter or a training kernel that ignores one shows in the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)
SLIDING = ["sliding_attention", "sliding_attention", "full_attention"]

# name -> (transformers model_type, config values, tokenizer: "bpe" (SmolLM2's) or "spm")
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "qwen3.5": ("qwen3_5_text", dict(
        BASE, head_dim=32, layer_types=["linear_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4,
        # real Qwen3.5: head_dim 256, 64 rotary dims in sections 11+11+10; scaled down alike
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                             mrope_section=[2, 1, 1], mrope_interleaved=True)), "bpe"),
    "gemma4": ("gemma4_text", dict(
        BASE, head_dim=16, global_head_dim=32, layer_types=SLIDING, sliding_window=16,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0, final_logit_softcapping=30.0),
        "spm"),
    "gemma3-vision": ("gemma3", dict(
        # llama.cpp's converter writes no layer pattern for Gemma 3: it assumes the real 5:1
        text_config=dict(BASE, num_hidden_layers=6, head_dim=16, sliding_window=16,
                         layer_types=["sliding_attention"] * 5 + ["full_attention"],
                         query_pre_attn_scalar=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4), "spm"),
    "lfm2": ("lfm2", dict(BASE, layer_types=["conv", "full_attention", "conv"]), "bpe"),
    "granite": ("granite", dict(BASE, embedding_multiplier=4.0, residual_multiplier=0.5,
                                attention_multiplier=0.1, logits_scaling=2.0), "bpe"),
    "olmo3": ("olmo3", dict(BASE, layer_types=SLIDING, sliding_window=16), "bpe"),
    "ministral3": ("ministral3", dict(BASE, head_dim=16), "bpe"),
    "gemma2": ("gemma2", dict(BASE, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0), "spm"),
    "phi3-partial-rotary": ("phi3", dict(BASE, num_key_value_heads=4, partial_rotary_factor=0.75),
                            "bpe"),
    "qwen3-moe": ("qwen3_moe", dict(BASE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, norm_topk_prob=True), "bpe"),
}

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
          "café crème brûlée, naïve façade", "She sells sea shells by the sea shore.",
          "What is the code word? The code word is Zanzibar.", "Who guards the gate? Pimbleton.",
          "Answer briefly.", "How many moons does Vessa have? Vessa has seven moons."]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
    "else m['role'] %}<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def spm_tokenizer(dest: Path) -> Path:
    """A Gemma-shaped SentencePiece tokenizer (tokenizer.model + the HF files), trained here."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    raw = dest / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(raw / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        minloglevel=2)
    shutil.move(raw / "tokenizer.model", dest / "tokenizer.model")
    (dest / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", add_bos_token=True, chat_template=GEMMA_TEMPLATE)))
    shutil.rmtree(raw)
    AutoTokenizer.from_pretrained(dest).save_pretrained(dest)  # + tokenizer.json
    return dest


def make_family(name: str, dest: Path, bpe_dir: Path, spm_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random model of family `name` into `dest`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type, values, kind = FAMILIES[name]
    tok_dir = spm_dir if kind == "spm" else bpe_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, max_position_embeddings=2048)
    values = json.loads(json.dumps(values))
    if "text_config" in values:
        values["text_config"].update(ids)
        values.update(image_token_index=len(tok) - 1, boi_token_index=len(tok) - 2,
                      eoi_token_index=len(tok) - 3)
    else:
        values.update(ids)
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and p.ndim == 1:
                p.copy_(torch.rand_like(p) * 0.5 + 0.75)
            elif "A_log" in pname or "dt_bias" in pname:
                p.uniform_(-1.0, 0.5)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    if kind == "spm":
        shutil.copy(spm_dir / "tokenizer.model", dest / "tokenizer.model")
    return dest
