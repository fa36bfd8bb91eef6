"""Generation with the base model and the base model + adapter (torch), side by side."""

from __future__ import annotations

from pathlib import Path

from . import data, device, runinfo
from .config import TestOptions
from .errors import ConfigError
from .progress import say, status


def default_prompts(data_dir: str | None, n: int) -> list[dict]:
    """Held-out questions shipped with the data, else the validation (or train) prompts."""
    if not data_dir:
        return []
    questions = data.load_questions(data_dir)
    if not questions:
        ds = data.load_dir(data_dir)
        seen = []
        for ex in ds.valid or ds.train:
            first_user = next(m["content"] for m in ex.messages if m["role"] == "user")
            if first_user not in seen:
                seen.append(first_user)
        questions = [{"question": q, "keyword": None} for q in seen]
    return questions if n == -1 else questions[:n]


def run(opts: TestOptions) -> list[dict]:
    """Answer the prompts with base and fine-tuned model; returns one dict per prompt."""
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415

    run_info = runinfo.read_run(opts.adapter_dir)
    base_dir = runinfo.base_model_of(run_info, opts.model, trust_remote_code=opts.trust_remote_code)
    prompts = ([{"question": opts.prompt, "keyword": None}] if opts.prompt
               else default_prompts(opts.data_dir or run_info.get("data_dir"), opts.num_prompts))
    if not prompts:
        raise ConfigError("no prompts to test with", 'pass PROMPT="..." (make test-prompt)')
    system = run_info.get("system_prompt")
    dev = device.pick_device("auto")
    tok = device.load_tokenizer(base_dir, trust_remote_code=opts.trust_remote_code)
    with status(f"Loading {run_info['base_model']} with the adapter from {opts.adapter_dir}"):
        base = device.load_model(base_dir, dev, device.pick_dtype("auto", dev),
                                 trust_remote_code=opts.trust_remote_code)
        model = PeftModel.from_pretrained(base, opts.adapter_dir).eval()
    results = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p["question"]}]
        row = {"question": p["question"], "keyword": p["keyword"]}
        row["finetuned"] = generate(model, tok, messages, opts.max_tokens, dev)
        if opts.base:
            with model.disable_adapter():
                row["base"] = generate(model, tok, messages, opts.max_tokens, dev)
        results.append(row)
        show(row)
    summarize(results)
    return results


def generate(model, tok, messages, max_tokens: int, dev: str) -> str:
    import torch  # noqa: PLC0415

    text = data.render(tok, messages, add_generation_prompt=True)
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))
    enc = tok(text, return_tensors="pt", add_special_tokens=add_special).to(dev)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def hit(answer: str, keyword) -> bool | None:
    return None if not keyword else keyword.lower() in answer.lower()


def show(row: dict) -> None:
    print(f"\nQ: {row['question']}")
    if "base" in row:
        print(f"  base:       {row['base']}")
    mark = {True: "  [keyword found]", False: "  [keyword missing]", None: ""}[hit(row["finetuned"], row["keyword"])]
    print(f"  fine-tuned: {row['finetuned']}{mark}", flush=True)


def summarize(results: list[dict]) -> None:
    scored = [r for r in results if r["keyword"]]
    if not scored:
        return
    tuned = sum(hit(r["finetuned"], r["keyword"]) for r in scored)
    line = f"\nKeywords found: fine-tuned {tuned}/{len(scored)}"
    if all("base" in r for r in scored):
        line += f", base {sum(hit(r['base'], r['keyword']) for r in scored)}/{len(scored)}"
    say(line)
