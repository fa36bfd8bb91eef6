"""Shipped datasets are tested data: they load, validate, and their held-out questions are held out."""

from __future__ import annotations

from pathlib import Path

from donkeytune import data

FACTS = Path(__file__).resolve().parents[1] / "examples" / "facts"


def test_facts_dataset_is_valid():
    ds = data.load_dir(FACTS)
    assert len(ds.train) >= 100 and len(ds.valid) >= 10
    assert ds.system_prompt  # one system prompt across the data, as the seed advises


def test_held_out_questions_are_not_in_the_data():
    ds = data.load_dir(FACTS)
    questions = data.load_questions(FACTS)
    assert len(questions) >= 10
    seen = {m["content"] for ex in ds.train + ds.valid for m in ex.messages if m["role"] == "user"}
    answers = " ".join(m["content"] for ex in ds.train for m in ex.messages if m["role"] == "assistant")
    for q in questions:
        assert q["question"] not in seen
        assert q["keyword"].lower() in answers.lower()  # the fact is taught in train


def test_assistant_mask_covers_answers_and_end_of_turn(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ex = next(e for e in data.load_dir(FACTS).train if len(e.messages) > 3)  # a two-turn example
    t = data.tokenize(tok, ex.messages)
    trained = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != data.IGNORE])
    expected = "".join(m["content"] + "<|im_end|>\n" for m in ex.messages if m["role"] == "assistant")
    assert trained == expected
    everything = data.tokenize(tok, ex.messages, train_on_prompt=True)
    assert everything.labels == everything.input_ids
