"""Answering prompts with the base and the fine-tuned model, side by side.

After `convert`, the quantized GGUF runs in llama.cpp with its own chat template and stop
tokens: what a user of llama.cpp, Ollama or LM Studio will see. Before it (or with
--adapter), the base model + adapter run in torch.
"""

from __future__ import annotations

from pathlib import Path

from .. import data, device, models, runinfo
from ..config import TestOptions
from ..errors import ConfigError
from ..data.load import keyword_hit as hit
from ..gguf.runtime import chat_gguf
from ..files import QUANT_TYPES, REPORT_DIR, TEST_FILE, UNQUANTIZED, folder_lock, type_in_name
from ..progress import say, status
from .chat import converted_gguf


def default_prompts(data_dir: str | None, n: int) -> list[dict]:
    """Held-out questions shipped with the data, else the validation (or train) prompts."""
    if not data_dir:
        return []
    questions = data.load_questions(data_dir)
    if not questions:
        ds = data.load_dir(data_dir)
        seen = []
        for ex in ds.valid or ds.train:
            first_user = next((m["content"] for m in ex.messages if m["role"] == "user"), None)
            if first_user and first_user not in seen:
                seen.append(first_user)
        questions = [{"question": q, "keyword": None} for q in seen]
    return questions if n == -1 else questions[:n]


CONTEXT = 2048  # the context llama.cpp runs the GGUFs with here


def run(opts: TestOptions) -> list[dict]:
    """Answer the prompts with base and fine-tuned model; returns one dict per prompt."""
    with folder_lock(opts.output_dir, "test"):  # its report/test.json, and no adapter in flux
        return _run(opts)


def _run(opts: TestOptions) -> list[dict]:
    run_info = runinfo.read_run(opts.run_dir)
    base_dir = runinfo.base_model_of(run_info, opts.model, trust_remote_code=opts.trust_remote_code,
                                     allow_pickle=opts.allow_pickle)
    prompts = ([{"question": opts.prompt, "keyword": None}] if opts.prompt
               else default_prompts(opts.data_dir or run_info.get("data_dir"), opts.num_prompts))
    if not prompts:
        raise ConfigError("no prompts to test with", 'pass PROMPT="..." (make test-prompt)')
    system = run_info.get("system_prompt")
    gguf_file = None if opts.adapter else _converted_gguf(opts)
    _check_lengths(prompts, system, base_dir, opts, CONTEXT if gguf_file else None)
    if gguf_file:
        answer_tuned, answer_base = _gguf_answerers(gguf_file, base_dir, run_info, opts)
        engine = f"llama.cpp, {gguf_file.name}"
    else:
        answer_tuned, answer_base = _torch_answerers(base_dir, run_info, opts)
        engine = "torch, base + adapter"
    results = []
    for p in prompts:
        messages = chat_messages(p["question"], system)
        row = {"question": p["question"], "keyword": p["keyword"]}
        row["finetuned"] = answer_tuned(messages)
        if opts.base:
            row["base"] = answer_base(messages)
        results.append(row)
        show(row)
    counts = summarize(results)
    runinfo.write_json(Path(opts.output_dir) / REPORT_DIR / TEST_FILE,
                       dict(engine=engine, results=results, **counts))
    return results


def _check_lengths(prompts, system, base_dir: Path, opts: TestOptions, context: int | None) -> None:
    """Every prompt fits the context it will run in (llama.cpp's, else the model's), said before
    any model loads."""
    if context is None:
        context = models.read_config(base_dir).get("max_position_embeddings") or 1 << 30
    tok = device.load_tokenizer(base_dir, trust_remote_code=opts.trust_remote_code)
    for p in prompts:
        n = len(prompt_ids(tok, chat_messages(p["question"], system)))
        if n >= context:
            short = p["question"][:60] + ("..." if len(p["question"]) > 60 else "")
            raise ConfigError(f"the prompt {short!r} is {n} tokens: longer than the model's "
                              f"context of {context} tokens", "shorten the prompt")


def chat_messages(question: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]


QUESTION_TOKENS = 32  # the held-out questions scored during training want short answers


def score_questions(answer, questions: list[dict], system: str | None) -> int:
    """How many of the questions' keywords `answer(messages) -> str` gives (training's
    --eval-questions and the fidelity check score as `test` does)."""
    return sum(bool(hit(answer(chat_messages(q["question"], system)), q["keyword"]))
               for q in questions if q.get("keyword"))


# ---------------------------------------------------------------- llama.cpp (GGUF)

def _converted_gguf(opts: TestOptions) -> Path | None:
    if opts.gguf:
        path = Path(opts.gguf)
    else:
        path, _ = converted_gguf(opts.output_dir)
        if path is None or not path.is_file():
            return None
    runinfo.check_gguf_current(path, opts.output_dir)  # a GGUF of an earlier training: refused
    return path


def base_gguf(base_dir: Path, qtype: str, data_dir: str | None = None) -> Path:
    """The base model exported and quantized like the fine-tuned one (with importance weights
    measured on `data_dir`, as `convert` quantizes), cached."""
    from .. import gguf  # noqa: PLC0415
    from ..gguf import quantize  # noqa: PLC0415

    suffix = "-imatrix" if data_dir and qtype not in UNQUANTIZED else ""
    target = models.cache_dir() / "gguf" / f"{runinfo.model_fingerprint(base_dir)}-{qtype}{suffix}.gguf"
    if not target.is_file():
        full = target.with_name(target.stem + "-f16.gguf")
        with status(f"Exporting the base model to GGUF for comparison ({target})"):
            gguf.export(base_dir, full, "f16")
            imatrix = None
            if suffix:
                from ..gguf import fidelity  # noqa: PLC0415

                imatrix = fidelity.reference(base_dir, data_dir, conversations=1, tokens=1,
                                             questions=False).imatrix_for(full)
            quantize.quantize(full, target, qtype, imatrix=imatrix)
            full.unlink()
    return target


def _gguf_type(path: Path) -> str:
    """The quantization type in a GGUF file's name (…-Q4_K_M.gguf), F16 when unknown."""
    return type_in_name(path, QUANT_TYPES) or "F16"


def _gguf_answerers(gguf_file: Path, base_dir: Path, run_info: dict, opts: TestOptions):
    from ..gguf.runtime import load_llama  # noqa: PLC0415

    say(f"Testing the GGUF {gguf_file} in llama.cpp (its own chat template and stop tokens)")
    tuned = load_llama(gguf_file, n_ctx=CONTEXT)
    data_dir = opts.data_dir or run_info.get("data_dir")
    base = (load_llama(base_gguf(base_dir, _gguf_type(gguf_file), data_dir), n_ctx=CONTEXT)
            if opts.base else None)

    def answer(llm):
        return lambda messages: chat_gguf(llm, messages, opts.max_tokens)

    return answer(tuned), (answer(base) if base else None)


# ---------------------------------------------------------------- torch (base + adapter)

def _torch_answerers(base_dir: Path, run_info: dict, opts: TestOptions):
    from peft import PeftModel  # noqa: PLC0415

    dev = device.pick_device("auto")
    tok = device.load_tokenizer(base_dir, trust_remote_code=opts.trust_remote_code)
    with status(f"Loading {run_info['base_model']} with the adapter from {opts.chosen_adapter}"):
        base = device.load_model(base_dir, dev, device.pick_dtype("auto", dev),
                                 trust_remote_code=opts.trust_remote_code)
        model = PeftModel.from_pretrained(base, opts.chosen_adapter).eval()

    def tuned(messages):
        return generate(model, tok, messages, opts.max_tokens, dev)

    def plain(messages):
        with model.disable_adapter():
            return generate(model, tok, messages, opts.max_tokens, dev)

    return tuned, plain


def generate(model, tok, messages, max_tokens: int, dev: str) -> str:
    import torch  # noqa: PLC0415

    ids = torch.tensor([prompt_ids(tok, messages)], device=dev)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def prompt_ids(tok, messages) -> list[int]:
    """The chat template's prompt as token ids, with BOS once (the template's or the tokenizer's)."""
    text = data.render(tok, messages, add_generation_prompt=True)
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))
    return tok(text, add_special_tokens=add_special)["input_ids"]


# ---------------------------------------------------------------- output

def show(row: dict) -> None:
    print(f"\nQ: {row['question']}")
    if "base" in row:
        print(f"  base:       {row['base']}")
    mark = {True: "  [keyword found]", False: "  [keyword missing]", None: ""}[hit(row["finetuned"], row["keyword"])]
    print(f"  fine-tuned: {row['finetuned']}{mark}", flush=True)


def summarize(results: list[dict]) -> dict:
    """Print and return how often the expected keyword is in the answers."""
    scored = [r for r in results if r["keyword"]]
    if not scored:
        return {}
    counts = {"keywords_total": len(scored),
              "keywords_finetuned": sum(hit(r["finetuned"], r["keyword"]) for r in scored)}
    line = f"\nKeywords found: fine-tuned {counts['keywords_finetuned']}/{len(scored)}"
    if all("base" in r for r in scored):
        counts["keywords_base"] = sum(hit(r["base"], r["keyword"]) for r in scored)
        line += f", base {counts['keywords_base']}/{len(scored)}"
    say(line)
    return counts
