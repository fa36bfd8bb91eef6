"""Tokenizing with the model's chat template, labels on the assistant's tokens only."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import DataError, ModelError
from ..progress import warn
from .load import Example

IGNORE = -100  # label of tokens the loss skips

# Used when a model has no chat template of its own (base models): ChatML.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not look

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def ensure_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        warn("the model has no chat template: using ChatML (<|im_start|>role ... <|im_end|>)")
        tokenizer.chat_template = CHATML


RENDER_SECONDS = 2.0  # one conversation renders in milliseconds; a hostile template loops for ever
MAX_OUTPUT = 4_000_000  # characters one rendering may produce


class TemplateTimeout(Exception):
    pass


@contextmanager
def bounded(seconds: float = RENDER_SECONDS):
    """Stop a Jinja template that runs past `seconds`: a line tracer on the template's own frames
    (compiled templates run as code from "<template>"), so nested loops cannot hang the tool."""
    deadline = time.monotonic() + seconds
    old = sys.gettrace()

    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateTimeout(f"the template ran longer than {seconds:g} s")
        return line

    def call(frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            return line(frame, event, arg)
        if time.monotonic() > deadline:
            raise TemplateTimeout(f"the template ran longer than {seconds:g} s")
        return None

    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(old)


def unsafe(reason) -> ModelError:
    return ModelError(f"the model's chat template tried something unsafe and was stopped: {reason}",
                      "use a model whose tokenizer_config.json / chat_template.jinja you trust")


def render(tokenizer, messages, add_generation_prompt=False) -> str:
    """The model's chat template applied to `messages` (transformers renders it in a sandbox;
    time, range sizes and output length are bounded here)."""
    import jinja2  # noqa: PLC0415

    try:
        with bounded():
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
    except TemplateTimeout as e:
        raise unsafe(e) from None
    except jinja2.exceptions.SecurityError as e:
        raise unsafe(e) from None
    except (OverflowError, MemoryError, RecursionError) as e:
        raise unsafe(str(e) or type(e).__name__) from None
    except TypeError as e:
        if "loader" in str(e):  # {% include %} / {% import %}: the sandbox has no files to give
            raise unsafe("it includes or imports other templates") from None
        raise
    except jinja2.exceptions.TemplateError as e:
        raise ModelError(f"the model's chat template failed on a conversation: {e}",
                         "check the roles of the conversation (some templates require "
                         "user/assistant alternation), or fix the template") from None
    if isinstance(text, str) and len(text) > MAX_OUTPUT:
        raise unsafe(f"it produced more than {MAX_OUTPUT:,} characters for one conversation")
    return text


def tokenize(tokenizer, messages: list[dict], train_on_prompt: bool = False,
             plain: bool = False) -> Tokenized:
    """Token ids of the chat-templated conversation, labels on assistant turns only.

    An assistant turn spans from the end of the prompt the template renders for it (with
    the generation header) to the end of the conversation rendered up to that turn, so the
    end-of-turn token is learned too: without it the model never stops. A plain-text
    example (one assistant turn) is tokenized as is, with EOS, and trained on every token.
    """
    if plain:
        ids = tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids = ids + [tokenizer.eos_token_id]
        return Tokenized(ids, list(ids))
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))  # the template already wrote BOS
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        return Tokenized(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a < e for s, e in spans):
            labels[k] = ids[k]
    return Tokenized(ids, labels)


def count_tokens(tokenizer, examples: list[Example], chunk: int = 2048) -> list[int]:
    """Tokens per example as `tokenize` makes them, counted in batches (fast for length checks)."""
    extra = len(tokenizer("", add_special_tokens=True)["input_ids"])  # the BOS/EOS it adds
    bos, eos = tokenizer.bos_token, tokenizer.eos_token_id
    counts = []
    for i in range(0, len(examples), chunk):
        part = examples[i:i + chunk]
        texts = [ex.messages[-1]["content"] if ex.plain else render(tokenizer, ex.messages)
                 for ex in part]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for ex, text, ids in zip(part, texts, encoded):
            if ex.plain:  # tokenize adds the special tokens, then EOS unless it is there
                ids = tokenizer(text, add_special_tokens=True)["input_ids"] if extra else ids
                counts.append(len(ids) + (eos is not None and ids[-1:] != [eos]))
            else:
                counts.append(len(ids) + (0 if bos and text.startswith(bos) else extra))
    return counts


def tokenize_all(tokenizer, examples: list[Example], max_len: int, train_on_prompt: bool,
                 split: str) -> list[Tokenized]:
    """Tokenize a split; truncation and examples left with nothing to learn are counted."""
    out, truncated, lost, empty = [], 0, 0, 0
    for ex in examples:
        t = tokenize(tokenizer, ex.messages, train_on_prompt, plain=ex.plain)
        if len(t.input_ids) > max_len:
            truncated += 1
            lost += len(t.input_ids) - max_len
            t = Tokenized(t.input_ids[:max_len], t.labels[:max_len])
        if t.trained_tokens == 0:
            empty += 1
            continue
        out.append(t)
    if truncated:
        warn(f"{split}: {truncated} of {len(examples)} examples are longer than max_seq_length="
             f"{max_len} tokens and were truncated ({lost} tokens lost); raise --max-seq-length "
             "or shorten them")
    if empty:
        warn(f"{split}: {empty} examples have no assistant tokens left after truncation and "
             "were skipped")
    if examples and not out:
        raise DataError(split, None, "no example has assistant tokens to train on",
                        "check that assistant turns are not cut off by --max-seq-length")
    return out
