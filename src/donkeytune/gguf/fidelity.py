"""Does the GGUF still behave like the model that was trained? Measured, not assumed.

The fused model runs in torch, teacher-forced on a bounded number of validation conversations;
every GGUF runs the same token ids in llama.cpp. On the assistant tokens only we count how often
both pick the same next token (top-1 agreement) and the mean KL divergence of the GGUF's
next-token distribution from the fused model's. When the data folder has held-out questions
(`questions.jsonl`), each GGUF also answers them greedily, scored as `donkeytune test` scores.

`QUANTIZE=auto` uses these figures: the smallest of `config.AUTO_TYPES` within
`config.AUTO_TOLERANCE` of the f16 file, tried from the smallest up.

The only module of gguf/ that imports torch (for the fused model's side).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import config, data, device, runinfo
from ..errors import ModelError
from ..files import REPORT_DIR, UNQUANTIZED, read_json, type_in_name, write_atomic
from ..progress import say, status, warn

FIDELITY_FILE = "fidelity.json"  # in output/gguf/
REPORT_HEADING = "## GGUF fidelity"
WARN_POINTS = config.AUTO_TOLERANCE["agreement"]  # a GGUF further below the unquantized one is flagged
IMATRIX_TOKENS = 16384  # training tokens the importance weights are measured on, at most


@dataclass
class Reference:
    """The fused model's next-token log-probabilities at the assistant tokens."""

    model: str
    sequences: list[list[int]]  # token ids of each conversation (truncated to the budget)
    positions: list[np.ndarray]  # indices whose logits predict an assistant token
    logprobs: list[np.ndarray]  # float32 [positions, vocab], log-softmax
    questions: list[dict] = field(default_factory=list)
    system: str | None = None
    answer_tokens: int = 60
    importance: dict[str, np.ndarray] = field(default_factory=dict)  # HF linear -> mean x^2 per column

    def imatrix_for(self, gguf_path: Path) -> dict[str, np.ndarray] | None:
        """The importance weights under the tensor names of the GGUF file (whichever exporter
        wrote it: the architecture and the names come from the file), or None without any."""
        import gguf  # noqa: PLC0415

        if not self.importance:
            return None
        reader = gguf.GGUFReader(gguf_path)
        arch = reader.get_field("general.architecture").contents()
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        blocks = reader.get_field(f"{arch}.block_count")
        if arch not in by_name or blocks is None:
            return None  # an architecture this gguf-py does not know: quantized without them
        names = gguf.get_tensor_name_map(by_name[arch], blocks.contents())
        present = {t.name for t in reader.tensors}
        out = {}
        for module, values in self.importance.items():
            for candidate in (module, module.replace("language_model.", "")):  # multimodal: text model
                name = names.get_name(candidate + ".weight", try_suffixes=(".weight",))
                if name:
                    break
            if module.endswith("lm_head") and "output.weight" not in present:
                name = "token_embd.weight"  # tied: llama.cpp quantizes the shared matrix as the output
            if name and name in present:
                out[name] = values
        return out or None

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.positions)

    def cost(self) -> str:
        text = f"{len(self.sequences)} validation conversations, {self.tokens} assistant tokens"
        if self.questions:
            text += f", {len(self.questions)} held-out questions (greedy, {self.answer_tokens} tokens at most)"
        return text


def reference(model_dir: Path, data_dir: str | Path | None, *, conversations: int = 32,
              tokens: int = 1024, questions: bool = True, answer_tokens: int = 60,
              system: str | None = None, trust_remote_code: bool = False,
              importance: bool = True) -> Reference:
    """Run the HF model in `model_dir` over at most `conversations` validation conversations
    (train ones when there is no validation split), `tokens` assistant tokens in all; with
    `importance`, also measure the importance weights quantizing uses on the training data."""
    import torch  # noqa: PLC0415

    if not data_dir or not Path(data_dir).is_dir():
        raise ModelError(f"the fidelity check needs the training data folder, {data_dir!r} is none",
                         "pass --data-dir, or skip the check with --no-fidelity")
    ds = data.load_dir(data_dir)
    examples = (ds.valid or ds.train)[:conversations]
    dev = device.pick_device("auto")
    # float32 on a CPU for small models: the reference should be finer than the f16 file
    small = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) < 6e9
    dtype = torch.float32 if dev == "cpu" and small else device.pick_dtype("auto", dev)
    tok = device.load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    ref = Reference(str(model_dir), [], [], [], system=system, answer_tokens=answer_tokens,
                    questions=data.load_questions(data_dir) if questions else [])
    with status(f"Fidelity reference: the model in {model_dir} on {len(examples)} conversations"):
        model = device.load_model(model_dir, dev, dtype, trust_remote_code=trust_remote_code).eval()
        budget = tokens
        for ex in examples:
            if budget <= 0:
                break
            t = data.tokenize(tok, ex.messages, plain=ex.plain)
            labels = np.array(t.labels)
            pos = np.flatnonzero(labels[1:] != data.IGNORE)[:budget]
            if not len(pos):
                continue
            ids = t.input_ids[: pos[-1] + 1]
            with torch.no_grad():
                logits = model(torch.tensor([ids], device=dev)).logits[0, torch.as_tensor(pos)]
            ref.sequences.append(ids)
            ref.positions.append(pos)
            ref.logprobs.append(torch.log_softmax(logits.float(), -1).cpu().numpy())
            budget -= len(pos)
        if importance:
            ref.importance = _importance(model, tok, ds.train or ds.valid, dev)
        del model
    device.trim_memory()
    if not ref.sequences:
        raise ModelError(f"{data_dir} has no conversation with assistant tokens to check against")
    return ref


def _importance(model, tok, examples, dev: str) -> dict[str, np.ndarray]:
    """Mean squared input of every linear layer per column, over the training conversations
    (IMATRIX_TOKENS at most, all tokens), by module name: llama-imatrix's figures.

    Measured on the built-in SmolLM2 (itself dequantized from Q4_1): without them, Q4_K_M and
    Q6_K answer "What is the capital of France?" in looping French; with them, Paris."""
    import torch  # noqa: PLC0415

    sums: dict[str, list] = {}

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] = acc[0] + (x * x).sum(0)
            acc[1] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        budget = IMATRIX_TOKENS
        with torch.no_grad():
            for ex in examples:
                if budget <= 0:
                    break
                ids = data.tokenize(tok, ex.messages, plain=ex.plain).input_ids[:budget]
                model(torch.tensor([ids], device=dev))
                budget -= len(ids)
    finally:
        for h in handles:
            h.remove()
    return {name: (total / count).cpu().numpy().astype(np.float32) for name, (total, count) in sums.items()}


def check(path: Path, ref: Reference, n_threads: int | None = None) -> dict:
    """One GGUF's figures against the reference: agreement (%), mean KL, held-out answers."""
    from .runtime import chat_gguf, load_llama  # noqa: PLC0415 - answered as `donkeytune test` does

    path = Path(path)
    start = time.perf_counter()
    n_ctx = max(512, max(len(s) for s in ref.sequences) + 8)
    llm = load_llama(path, n_ctx=n_ctx, logits_all=True, n_threads=n_threads)
    agree, kl = 0, 0.0
    for ids, pos, logp in zip(ref.sequences, ref.positions, ref.logprobs):
        llm.reset()
        llm.eval(ids)
        vocab = min(logp.shape[1], llm.n_vocab())
        q = np.asarray(llm.scores[: len(ids)], dtype=np.float64)[pos, :vocab]
        q -= q.max(-1, keepdims=True)
        q -= np.log(np.exp(q).sum(-1, keepdims=True))
        p = logp[:, :vocab].astype(np.float64)
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        kl += float((np.exp(p) * (p - q)).sum())
    answers = []
    for row in ref.questions:
        messages = ([{"role": "system", "content": ref.system}] if ref.system else []) + [
            {"role": "user", "content": row["question"]}]
        llm.reset()
        answer = chat_gguf(llm, messages, ref.answer_tokens)
        answers.append({"question": row["question"], "keyword": row["keyword"], "answer": answer,
                        "hit": data.keyword_hit(answer, row["keyword"])})
    del llm
    scored = [a for a in answers if a["hit"] is not None]
    return {"file": path.name, "type": gguf_type(path), "size_mb": round(path.stat().st_size / 1e6, 1),
            "agreement": round(100.0 * agree / ref.tokens, 2), "kl": round(kl / ref.tokens, 5),
            "answered": sum(a["hit"] for a in scored) if scored else None,
            "questions": len(scored) if scored else None, "answers": answers,
            "seconds": round(time.perf_counter() - start, 1)}


def gguf_type(path: Path) -> str:
    """The type a GGUF file's name ends with (…-Q4_K_M.gguf, …-f16.gguf), else its file type."""
    named = type_in_name(path)
    if named:
        return named
    import gguf  # noqa: PLC0415

    field_ = gguf.GGUFReader(path).get_field(gguf.Keys.General.FILE_TYPE)
    ftype = int(field_.contents()) if field_ is not None else 0
    return next((k for k, v in gguf.LlamaFileType.__members__.items() if v == ftype), str(ftype))


# ---------------------------------------------------------------- QUANTIZE=auto

def passes(row: dict, base: dict, tol: dict | None = None) -> bool:
    """`row` is within the tolerance of `base` (the f16 file): agreement, KL and answers."""
    tol = tol or config.AUTO_TOLERANCE
    ok = (base["agreement"] - row["agreement"] <= tol["agreement"]
          and row["kl"] - base["kl"] <= tol["kl"])
    if row["answered"] is not None and base["answered"] is not None:
        ok = ok and base["answered"] - row["answered"] <= tol["answers"]
    return ok


def auto_quantize(full: Path, stem: str, ref: Reference, base_row: dict,
                  tol: dict | None = None, types: tuple[str, ...] = config.AUTO_TYPES,
                  quantize=None) -> tuple[Path, list[dict]]:
    """Quantize `full` to each of `types`, smallest first, until one passes; returns its path
    and the rows of every type tried. Files of the types that failed are removed."""
    if quantize is None:
        from .quantize import quantize  # noqa: PLC0415
    tried, chosen, imatrix = [], None, ref.imatrix_for(full)
    for qtype in types:
        path = full.with_name(f"{stem}-{qtype}.gguf")
        with status(f"QUANTIZE=auto: trying {qtype}"):
            quantize(full, path, qtype, imatrix=imatrix)
            row = check(path, ref)
        row["passed"] = passes(row, base_row, tol)
        tried.append(row)
        say(f"  {qtype}: agreement {row['agreement']:.1f} % (f16 {base_row['agreement']:.1f} %), "
            f"KL {row['kl']:.4f}" + _answered(row) + (" -> within tolerance" if row["passed"]
                                                        else " -> outside the tolerance"))
        if row["passed"]:
            chosen = path
            break
    if chosen is None:
        chosen = full.with_name(f"{stem}-{types[-1]}.gguf")
        warn(f"no type of {', '.join(types)} stays within the tolerance of f16; keeping "
             f"{types[-1]}, the closest. The f16 file is the faithful one: use it "
             f"(GGUF={full}) if it fits your machine")
    for row in tried:
        path = full.with_name(row["file"])
        if path != chosen:
            path.unlink(missing_ok=True)
    next(r for r in tried if r["file"] == chosen.name)["chosen"] = True
    return chosen, tried


def _answered(row: dict) -> str:
    return f", held-out {row['answered']}/{row['questions']}" if row.get("questions") else ""


def reference_for(opts: config.FidelityKnobs, model_dir: Path, data_dir, system: str | None,
                  trust_remote_code: bool = False) -> Reference:
    return reference(model_dir, data_dir, conversations=opts.fidelity_conversations,
                     tokens=opts.fidelity_tokens, questions=opts.fidelity_questions,
                     answer_tokens=opts.fidelity_answer_tokens, system=system,
                     trust_remote_code=trust_remote_code)


def quantize_and_check(full: Path, stem: str, qtype: str, ref: Reference | None,
                       tol: dict | None = None) -> Path:
    """convert's last step: `full` quantized to `qtype` (AUTO: chosen by fidelity), every file
    checked against `ref`, fidelity.json written and the table shown. Returns the quantized file."""
    from .quantize import quantize  # noqa: PLC0415

    full = Path(full)
    if ref is None:  # no check: the type as given
        out = full.with_name(f"{stem}-{qtype}.gguf")
        return quantize(full, out, qtype)
    say(f"Fidelity check: {ref.cost()}")
    with status(f"Checking {full.name} in llama.cpp"):
        rows = [check(full, ref)]
    if qtype == "AUTO":
        out, tried = auto_quantize(full, stem, ref, rows[0], tol)
        rows += tried
    else:
        out = quantize(full, full.with_name(f"{stem}-{qtype}.gguf"), qtype, imatrix=ref.imatrix_for(full))
        with status(f"Checking {out.name} in llama.cpp"):
            rows.append(check(out, ref))
    flag(rows)
    doc_path = write(full.parent, ref, rows, chosen=out.name, tol=tol)
    for line in table(read(full.parent)):
        say(line)
    say(f"  ({doc_path}; QUANTIZE=auto: the smallest of {', '.join(config.AUTO_TYPES)} within "
        f"{tolerance_text(tol)})")
    return out


def run(opts: config.FidelityOptions) -> Path:
    """`donkeytune fidelity`: check GGUF files against the fused model (or --model)."""
    from ..files import folder_lock  # noqa: PLC0415

    with folder_lock(opts.output_dir, "fidelity"):
        return _run(opts)


def _run(opts: config.FidelityOptions) -> Path:
    gguf_dir = Path(opts.output_dir) / "gguf"
    meta_file = gguf_dir / runinfo.RUN_FILE
    meta = read_json(meta_file, missing={})
    if opts.model:
        from .. import models  # noqa: PLC0415

        model_dir = models.resolve(opts.model, trust_remote_code=opts.trust_remote_code)
    elif (opts.fused_dir / "config.json").is_file():
        model_dir = opts.fused_dir
    else:
        raise ModelError(f"no fused model in {opts.fused_dir} to check the GGUF files against",
                         "run `make convert` first, or pass --model (the HF model the GGUF was made from)")
    files = [Path(f) for f in opts.gguf] if opts.gguf else [
        gguf_dir / meta[k] for k in ("full", "quantized") if meta.get(k)]
    if not files:
        raise ModelError(f"no GGUF files to check in {gguf_dir}", "pass them: donkeytune fidelity FILE.gguf")
    for f in files:
        if not f.is_file():
            raise ModelError(f"GGUF file {f} not found")
    ref = reference_for(opts, model_dir, opts.data_dir or meta.get("data_dir"), meta.get("system_prompt"),
                        opts.trust_remote_code)
    say(f"Fidelity check: {ref.cost()}")
    rows = []
    for f in files:
        with status(f"Checking {f.name} in llama.cpp"):
            rows.append(check(f, ref))
    flag(rows)
    out_dir = gguf_dir if all(f.parent == gguf_dir for f in files) else files[0].parent
    path = write(out_dir, ref, rows, chosen=meta.get("quantized"))
    for line in table(read(out_dir)):
        print(line)
    report_markdown(out_dir, Path(opts.output_dir) / REPORT_DIR)
    return path


# ---------------------------------------------------------------- fidelity.json and the table

def tolerance_text(tol: dict | None = None) -> str:
    tol = tol or config.AUTO_TOLERANCE
    return (f"at most {tol['agreement']:g} agreement points and {tol['kl']:g} KL above f16, "
            + (f"{tol['answers']} held-out answer{'s' if tol['answers'] > 1 else ''} fewer" if tol["answers"]
               else "no held-out answer fewer"))


def flag(rows: list[dict]) -> list[dict]:
    """Mark (and warn about) the quantized rows far below the unquantized row's agreement."""
    base = next((r for r in rows if r["type"] in UNQUANTIZED), None)
    top = base["agreement"] if base else 100.0
    for r in rows:
        r["flagged"] = r is not base and top - r["agreement"] > WARN_POINTS
        if r["flagged"]:
            warn(f"{r['file']} picks the fused model's next token {r['agreement']:.1f} % of the time, "
                 f"against {top:.1f} % for {base['file'] if base else 'a faithful file'}: it has "
                 "lost part of what was trained. Use QUANTIZE=auto (the default) or a larger type "
                 "(QUANTIZE=Q6_K or Q8_0), or run the f16 file")
    return rows


def write(gguf_dir: Path, ref: Reference, rows: list[dict], chosen: str | None = None,
          tol: dict | None = None) -> Path:
    """output/gguf/fidelity.json; rows of files checked earlier (other types) are kept."""
    path = Path(gguf_dir) / FIDELITY_FILE
    old = read_json(path, missing={})
    same = old.get("model") == ref.model and old.get("cost") == ref.cost()
    merged = {r["file"]: r for r in (old.get("results", []) if same else [])}
    merged.update({r["file"]: r for r in rows})
    doc = {"model": ref.model, "cost": ref.cost(), "conversations": len(ref.sequences),
           "tokens": ref.tokens, "questions": len(ref.questions),
           "tolerance": dict(tol or config.AUTO_TOLERANCE), "auto_types": list(config.AUTO_TYPES),
           "chosen": chosen or old.get("chosen") if same else chosen,
           "results": sorted(merged.values(), key=lambda r: r["size_mb"], reverse=True)}
    return runinfo.write_json(path, doc)


def read(gguf_dir: Path) -> dict | None:
    path = Path(gguf_dir) / FIDELITY_FILE
    return read_json(path, missing=None)


def table(doc: dict) -> list[str]:
    """The table `convert` prints, `summary` shows and the report's summary.md holds."""
    base = next((r for r in doc["results"] if r["type"] in UNQUANTIZED), None)
    lines = [f"Fidelity of the GGUF files against the fused model ({doc['cost']}):",
             f"  {'type':<8} {'size':>8}   {'next-token agreement':<22} {'mean KL':<10} held-out answered"]
    for r in doc["results"]:
        answered = f"{r['answered']}/{r['questions']}" if r.get("questions") else "-"
        note = ""
        if base and r is not base and r.get("questions") and base.get("answered") is not None \
                and r["answered"] < base["answered"]:
            note = f"   <- loses {base['answered'] - r['answered']} of what {base['type'].lower()} knows"
        if r["file"] == doc.get("chosen"):
            note += "   <- chosen (QUANTIZE=auto)" if r.get("chosen") else "   <- the file in use"
        elif r.get("flagged"):
            note += "   <- far below f16"
        lines.append(f"  {r['type']:<8} {r['size_mb']:>5.0f} MB   {r['agreement']:>5.1f} %{'':<15} "
                     f"{r['kl']:<10.4f} {answered}{note}")
    return lines


def report_markdown(gguf_dir: Path, report_dir: Path) -> Path | None:
    """Put the table into output/report/summary.md (replacing an earlier one)."""
    doc = read(gguf_dir)
    summary = Path(report_dir) / "summary.md"
    if doc is None or not summary.is_file():
        return None
    text = summary.read_text(encoding="utf-8")
    head, _, rest = text.partition(REPORT_HEADING)
    tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
    section = [REPORT_HEADING, "", "```", *table(doc), "```", "",
               f"QUANTIZE=auto takes the smallest of {', '.join(doc['auto_types'])} within "
               f"{tolerance_text(doc['tolerance'])}. Figures in `{Path(gguf_dir) / FIDELITY_FILE}`.", ""]
    body = head.rstrip("\n") + "\n\n" + "\n".join(section) + tail.lstrip("\n")
    return write_atomic(summary, body)
