"""`donkeytune data`: check, stats, split, merge and convert datasets.

Reading and validating records is data.py's business; this module finds what is
legal but probably a mistake (duplicates, leaks, prompts that differ, examples too
long for the model), and writes datasets (split, merge, convert) atomically.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .. import __version__, data
from ..config import (DataCheckOptions, DataMergeOptions, DataSplitOptions, DataStatsOptions,
                     DataWriteOptions)
from .load import Example, Problem
from ..errors import DataError
from ..files import write_atomic
from ..progress import say, warn

SPLITS = ("train", "valid")
MIN_VALID = 10  # fewer validation examples make a noisy validation loss
SHOWN_PER_KIND = 20  # problems of one kind printed before "... and N more"
PROVENANCE = "provenance.json"
NEAR = " (up to case, spaces, punctuation and system prompt)"

# The seed's table (README, "ITERS"): dataset size -> epochs it recommends (mid-range, batch 4).
SEED_EPOCHS = ((50, 32.0), (100, 26.0), (500, 12.0), (2000, 6.0))

FIXES = {
    "missing-file": "put the training examples in train.jsonl (or train.json)",
    "no-valid": "put 10-20% of the examples in valid.jsonl: `donkeytune data split FILE`",
    "small-valid": f"give the validation split at least {MIN_VALID} examples (10-20% of the data)",
    "system-prompt": "use one system prompt in every example, the one you will use at inference "
                     "(the seed's advice), or none at all",
    "duplicate": "remove the copy: duplicates weigh an example twice",
    "near-duplicate": "remove one of them, or make them really different",
    "leak": "remove it from valid.jsonl (or from train): a leaked example makes the validation "
            "loss look better than the model is",
    "too-long": "shorten these examples, split them, or raise MAX_SEQ_LENGTH",
    "short-answer": "write the answer you want the model to give; one-word answers teach terse replies",
    "unanswered-turn": "add the assistant's answer or remove the last user turn",
}


# ---------------------------------------------------------------- reading

def read_splits(path: str | Path, fmt: str | None = None):
    """({split: examples}, problems) of a dataset folder (train, valid), or of one file (its name
    as the split).

    Never raises on bad data: every problem comes back, located.
    """
    path = Path(path)
    if path.is_file():
        got = data.read_file(path, fmt)
        return {path.name: got.examples}, got.problems
    if not path.is_dir():
        return {}, [Problem("error", str(path), None, "no such file or folder",
                            "give a dataset folder (train.jsonl + valid.jsonl) or one file",
                            "missing-file")]
    splits, problems = {}, []
    for split in SPLITS:
        try:
            found = data.split_file(path, split)
        except DataError as e:
            message = e.message.removeprefix(f"{e.path}: ")
            problems.append(Problem("error", str(e.path), None, message, e.fix or ""))
            continue
        if found is None:
            if split == "train":
                problems.append(Problem("error", str(path / "train.jsonl"), None,
                                        "train.jsonl not found", FIXES["missing-file"], "missing-file"))
            continue
        got = data.read_file(found, fmt)
        splits[split] = got.examples
        problems += got.problems
    return splits, problems


def load_examples(path: str | Path, fmt: str | None = None) -> dict[str, list[Example]]:
    """Like read_splits, but bad data is a DataError (the first problems, located)."""
    splits, problems = read_splits(path, fmt)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        more = "".join(f"\n  {p.where}: {p.message}" for p in errors[1:data.MAX_SHOWN])
        raise DataError(errors[0].path, errors[0].line, errors[0].message + more,
                        f"{errors[0].fix} (`donkeytune data check {path}` lists every problem)")
    return splits


# ---------------------------------------------------------------- check

def check(opts: DataCheckOptions) -> int:
    """`data check`: print every problem; the exit status is 0 clean, 1 warnings only, 2 errors."""
    splits, problems = read_splits(opts.path, opts.format)
    tokenizer, skipped = _tokenizer(opts)
    folder = Path(opts.path) if Path(opts.path).is_dir() else None
    problems += find_warnings(splits, folder=folder, tokenizer=tokenizer,
                              max_len=opts.max_seq_length, min_answer_chars=opts.min_answer_chars)
    problems = sort_problems(problems)
    status = exit_status(problems)
    counts = {name: len(exs) for name, exs in splits.items()}
    if opts.json:
        print(json.dumps({"status": status, "examples": counts, "skipped": skipped,
                          "problems": [dict(asdict(p), where=p.where) for p in problems]}, indent=1))
    else:
        print_problems(problems, counts, skipped)
    return status


def find_warnings(splits: dict[str, list[Example]], *, folder: Path | None = None, tokenizer=None,
                  max_len: int = 2048, min_answer_chars: int = 3) -> list[Problem]:
    """Everything legal but probably a mistake, in one pass over the examples."""
    train = [ex for name, exs in splits.items() if name != "valid" for ex in exs]
    valid = splits.get("valid", [])
    problems = system_prompt_warnings(train + valid) + duplicate_warnings(train, valid)
    problems += example_warnings(train + valid, min_answer_chars)
    if folder is not None and "train" in splits:
        if "valid" not in splits:
            problems.append(Problem("warning", str(folder / "valid.jsonl"), None, "not found: training "
                                    "runs without a validation loss, so overfitting goes unseen",
                                    FIXES["no-valid"], "no-valid"))
        elif len(valid) < MIN_VALID:
            problems.append(Problem("warning", str(data.split_file(folder, "valid")), None,
                                    f"only {len(valid)} validation examples: the validation loss will "
                                    "be noise", FIXES["small-valid"], "small-valid"))
    if tokenizer is not None:
        problems += length_warnings(tokenizer, train + valid, max_len)
    return problems


def system_prompt_warnings(examples: list[Example]) -> list[Problem]:
    """One warning per system prompt that differs from the most common one (no prompt counts too)."""
    first, count = {}, Counter()
    for ex in examples:
        if ex.plain:
            continue
        prompt = ex.messages[0]["content"] if ex.messages[0]["role"] == "system" else None
        count[prompt] += 1
        first.setdefault(prompt, ex)
    if len(count) < 2:
        return []
    common, n_common = count.most_common(1)[0]
    out = []
    for prompt, n in count.items():
        if prompt == common:
            continue
        one = n == 1
        this = (f"{'has' if one else 'have'} no system prompt" if prompt is None else
                f"{'uses' if one else 'use'} the system prompt {_quote(prompt)}")
        most = "none" if common is None else _quote(common)
        out.append(_warn(first[prompt], "system-prompt", f"{n} example{'s' * (not one)} {this}; "
                         f"{n_common} use {most} (this is the first)"))
    return out


def duplicate_warnings(train: list[Example], valid: list[Example]) -> list[Problem]:
    """Exact and near-exact duplicates within each split, and valid examples found in train (leaks)."""
    out = []
    train_exact, train_near = _first_seen(train, out)
    _first_seen(valid, out)
    for ex in valid:
        seen = train_exact.get(exact_key(ex)) or train_near.get(near_key(ex))
        if seen is not None:
            how = "" if exact_key(ex) == exact_key(seen) else NEAR
            out.append(_warn(ex, "leak", f"also in train{how}, at {seen.where}"))
    return out


def _first_seen(examples: list[Example], out: list[Problem]):
    exact, near = {}, {}
    for ex in examples:
        key, loose = exact_key(ex), near_key(ex)
        if key in exact:
            out.append(_warn(ex, "duplicate", f"duplicate of {exact[key].where}"))
        elif loose in near:
            out.append(_warn(ex, "near-duplicate", f"same as {near[loose].where}{NEAR}"))
        exact.setdefault(key, ex)
        near.setdefault(loose, ex)
    return exact, near


def example_warnings(examples: list[Example], min_answer_chars: int) -> list[Problem]:
    """Very short assistant answers; conversations that end with an unanswered user turn."""
    out = []
    for ex in examples:
        if ex.plain:
            continue
        answers = [m["content"].strip() for m in ex.messages if m["role"] == "assistant"]
        short = min(answers, key=len)
        if len(short) < min_answer_chars:
            out.append(_warn(ex, "short-answer", f"very short assistant answer {_quote(short)} "
                             f"({len(short)} character{'s' * (len(short) != 1)})"))
        if ex.messages[-1]["role"] == "user":
            out.append(_warn(ex, "unanswered-turn", "ends with a user turn after the last assistant "
                             "answer: that turn is never answered and teaches nothing"))
    return out


def length_warnings(tokenizer, examples: list[Example], max_len: int) -> list[Problem]:
    """Examples longer than max_len tokens: how many tokens are cut, and how many of the answers'."""
    limit = min(max_len, getattr(tokenizer, "model_max_length", max_len) or max_len)
    out, per_file = [], Counter()
    # A token stands for at least one byte of text (+ BOS/EOS): shorter texts need no tokenizing.
    extra = len(tokenizer("", add_special_tokens=True)["input_ids"]) + 2
    maybe = [ex for ex in examples if len(_text(tokenizer, ex).encode()) + extra > limit]
    for ex, n in zip(maybe, data.count_tokens(tokenizer, maybe)):
        if n <= limit:
            continue
        t = data.tokenize(tokenizer, ex.messages, plain=ex.plain)
        kept = sum(1 for x in t.labels[1:limit] if x != data.IGNORE)
        lost_answer = t.trained_tokens - kept
        message = (f"{n} tokens, over the limit of {limit}: the last {n - limit} are cut in training "
                   f"({lost_answer} of them from assistant answers)")
        if kept == 0:
            message += "; nothing is left to learn, so training skips it"
        out.append(_warn(ex, "too-long", message))
        per_file[ex.where.rsplit(":", 1)[0]] += n - limit
    for path, lost in per_file.items():
        n = sum(1 for p in out if p.path == path)
        out.append(Problem("warning", path, None, f"{n} examples longer than {limit} tokens; "
                           f"{lost} tokens lost in all", FIXES["too-long"], "too-long"))
    return out


def _text(tokenizer, ex: Example) -> str:
    return ex.messages[-1]["content"] if ex.plain else data.render(tokenizer, ex.messages)


def exact_key(ex: Example) -> str:
    return json.dumps([ex.plain] + [[m["role"], m["content"]] for m in ex.messages], ensure_ascii=False)


_PUNCTUATION = re.compile(r"[^\w\s]+")


def near_key(ex: Example) -> str:
    """The example up to case, whitespace, punctuation and system prompt."""
    return "\x00".join(m["role"] + ":" + " ".join(_PUNCTUATION.sub("", m["content"].casefold()).split())
                       for m in ex.messages if m["role"] != "system")


def sort_problems(problems: list[Problem]) -> list[Problem]:
    """Errors first, then warnings; each severity by kind, then by file and line."""
    kinds = {k: i for i, k in enumerate(FIXES)}
    return sorted(problems, key=lambda p: (p.severity != "error", kinds.get(p.kind, -1), p.kind,
                                           p.path, p.line or 0))


def exit_status(problems: list[Problem]) -> int:
    if any(p.severity == "error" for p in problems):
        return 2
    return 1 if problems else 0


def print_problems(problems: list[Problem], counts: dict[str, int], skipped: list[str],
                   out=None) -> None:
    """Human output: problems grouped by kind (at most SHOWN_PER_KIND each), each group with its fix."""
    out = out or sys.stdout
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.severity, p.kind, p.fix), []).append(p)
    for (severity, kind, fix), group in groups.items():
        print(f"{severity}s: {kind} ({len(group)})", file=out)
        for p in group[:SHOWN_PER_KIND]:
            print(f"  {p.where}: {p.message}", file=out)
        if len(group) > SHOWN_PER_KIND:
            print(f"  ... and {len(group) - SHOWN_PER_KIND} more (--json lists them all)", file=out)
        if fix:
            print(f"  fix: {fix}", file=out)
    for note in skipped:
        print(f"note: {note}", file=out)
    errors = sum(p.severity == "error" for p in problems)
    examples = ", ".join(f"{n} {name}" for name, n in counts.items()) or "no"
    warnings = len(problems) - errors
    verdict = ", ".join(([f"{errors} error{'s' * (errors != 1)}"] if errors else [])
                        + ([f"{warnings} warning{'s' * (warnings != 1)}"] if warnings else []))
    print(f"data check: {verdict or 'no problems'} ({examples} examples)", file=out)


def _warn(ex: Example, kind: str, message: str) -> Problem:
    path, _, line = ex.where.rpartition(":")
    return Problem("warning", path, int(line), message, FIXES[kind], kind)


def _quote(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= width else text[:width - 3] + "...", ensure_ascii=False)


def _tokenizer(opts) -> tuple[object | None, list[str]]:
    """The model's tokenizer, or None and why the token checks are skipped."""
    if not opts.tokenizer:
        return None, ["token lengths not checked (--no-tokenizer)"]
    try:
        from .. import device, models  # noqa: PLC0415

        folder = models.resolve(opts.model, trust_remote_code=opts.trust_remote_code)
        return device.load_tokenizer(folder, trust_remote_code=opts.trust_remote_code), []
    except Exception as e:  # noqa: BLE001 - no tokenizer only skips the token checks
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, [f"token lengths not checked: no tokenizer for {opts.model!r} ({reason})"]


# ---------------------------------------------------------------- stats

def stats(opts: DataStatsOptions) -> dict:
    """`data stats`: sizes, tokens per example, and the epochs ITERS x BATCH_SIZE gives, with advice."""
    splits = load_examples(opts.path, opts.format)
    tokenizer, skipped = _tokenizer(opts)
    train = [ex for name, exs in splits.items() if name != "valid" for ex in exs]
    result = {"examples": {name: len(exs) for name, exs in splits.items()}, "skipped": skipped}
    if tokenizer is not None:
        result["tokens"] = {name: token_stats(data.count_tokens(tokenizer, exs))
                            for name, exs in splits.items()}
    result["training"] = epoch_advice(len(train), opts.iters, opts.batch_size)
    if opts.json:
        print(json.dumps(result, indent=1))
    else:
        print_stats(result, opts)
    return result


def token_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"total": 0}
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
            "max": ordered[-1], "total": sum(ordered), "histogram": histogram(ordered)}


def histogram(values: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) per bin, bins of equal width between min and max."""
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = Counter((v - low) // width for v in values)
    return [(low + i * width, low + (i + 1) * width - 1, counts[i])
            for i in range(min(bins, (high - low) // width + 1))]


def recommended_epochs(n: int) -> float:
    """The seed's table, interpolated on a log-log scale, extended past its ends, kept in the
    2-30 epochs that raise no warning."""
    points = SEED_EPOCHS
    for (n0, e0), (n1, e1) in zip(points, points[1:]):
        if n <= n1 or (n1, e1) == points[-1]:
            slope = math.log(e1 / e0) / math.log(n1 / n0)
            return min(30.0, max(2.0, e0 * (max(n, 1) / n0) ** slope))
    return points[-1][1]


def epoch_advice(n_train: int, iters: int, batch_size: int) -> dict:
    epochs = iters * batch_size / max(n_train, 1)
    recommended = max(50, round(recommended_epochs(n_train) * n_train / batch_size / 50) * 50)
    warnings = []
    if epochs > 30:
        warnings.append(f"{epochs:.0f} epochs is a lot: the model may memorise the examples; "
                        f"lower ITERS (about {recommended})")
    elif epochs < 2:
        warnings.append(f"{epochs:.2g} epochs: the model sees each example less than twice; "
                        f"raise ITERS (about {recommended})")
    return {"iters": iters, "batch_size": batch_size, "epochs": round(epochs, 2),
            "recommended_iters": recommended, "warnings": warnings}


def print_stats(result: dict, opts: DataStatsOptions, out=None) -> None:
    out = out or sys.stdout
    print("examples: " + ", ".join(f"{n} {name}" for name, n in result["examples"].items()), file=out)
    for name, t in result.get("tokens", {}).items():
        if not t.get("histogram"):
            continue
        print(f"tokens per example in {name} ({opts.model} tokenizer): min {t['min']}, median "
              f"{t['median']:g}, p95 {t['p95']}, max {t['max']}; {t['total']} in all", file=out)
        top = max(c for _, _, c in t["histogram"])
        for low, high, count in t["histogram"]:
            bar = "#" * max(1 if count else 0, round(30 * count / top))
            print(f"  {low:>6}-{high:<6} {bar} {count}", file=out)
    for note in result["skipped"]:
        print(f"note: {note}", file=out)
    tr = result["training"]
    n = sum(n for name, n in result["examples"].items() if name != "valid")
    print(f"training: ITERS={tr['iters']} x BATCH_SIZE={tr['batch_size']} = {tr['epochs']:g} epochs "
          f"of {n} examples; the seed's table suggests about ITERS={tr['recommended_iters']} "
          f"for this size", file=out)
    for w in tr["warnings"]:
        print(f"warning: {w}", file=out)


# ---------------------------------------------------------------- split, merge, convert

def split(opts: DataSplitOptions) -> list[Path]:
    """Seeded train/valid split, stratified by system prompt when there are several.

    Identical examples stay on the same side, so a split never leaks.
    """
    splits = load_examples(opts.path, opts.format)
    examples = [ex for exs in splits.values() for ex in exs]
    train, valid = split_examples(examples, opts.valid_fraction, opts.seed)
    paths = write_dataset(Path(opts.out), train, valid, force=opts.force, reading=_sources(opts.path))
    say(f"split {len(examples)} examples: {len(train)} train, {len(valid)} valid -> {opts.out}")
    return paths


def split_examples(examples: list[Example], valid_fraction: float, seed: int):
    """(train, valid), each in the input's order; every system prompt group is split on its own."""
    groups: dict[str, dict[str, list[int]]] = {}  # system prompt -> exact key -> indices
    for i, ex in enumerate(examples):
        prompt = ex.messages[0]["content"] if ex.messages[0]["role"] == "system" and not ex.plain else ""
        groups.setdefault(prompt, {}).setdefault(exact_key(ex), []).append(i)
    rng = random.Random(seed)
    in_valid = set()
    for units in groups.values():
        order = list(units.values())
        rng.shuffle(order)
        target = round(valid_fraction * sum(len(u) for u in order))
        taken = 0
        for unit in order:
            if taken >= target:
                break
            in_valid.update(unit)
            taken += len(unit)
    train = [ex for i, ex in enumerate(examples) if i not in in_valid]
    valid = [ex for i, ex in enumerate(examples) if i in in_valid]
    return train, valid


def merge(opts: DataMergeOptions) -> list[Path]:
    """Concatenate the train and valid splits of several folders, without exact duplicates and
    without any example in both splits; provenance.json says where each example came from."""
    inputs = [(d, load_examples(d, opts.format)) for d in opts.inputs]
    for d, splits in inputs:
        if "train" not in splits:
            raise DataError(d, None, "not a dataset folder", "give folders holding train.jsonl")
    train, valid, removed = merge_examples([s for _, s in inputs])
    origins = {k: v for d, _ in inputs for k, v in _provenance(Path(d)).items()}

    def origin(where: str) -> str:  # through earlier merges, back to the first file
        return origins.get(where, where)

    if not opts.force:
        backup_data(Path(opts.out))  # the seed's Method A merges into a filled ./data
    paths = write_dataset(Path(opts.out), train, valid, force=opts.force,
                          reading=[p for d, _ in inputs for p in _sources(d)],
                          provenance={"made_by": f"donkeytune {__version__} data merge",
                                      "inputs": [str(d) for d in opts.inputs],
                                      "removed": {k: list(map(origin, v)) for k, v in removed.items()},
                                      "train": [origin(ex.where) for ex in train],
                                      "valid": [origin(ex.where) for ex in valid]})
    say(f"merged {len(opts.inputs)} folder{'s' * (len(opts.inputs) != 1)}: {len(train)} train, "
        f"{len(valid)} valid ({len(removed['duplicates'])} duplicates and "
        f"{len(removed['leaks'])} valid examples also in train left out) -> {opts.out}")
    return paths


def merge_examples(datasets: list[dict[str, list[Example]]]):
    """(train, valid, removed): all trains then all valids in input order, first copy kept."""
    train, valid, seen = [], [], {}
    removed = {"duplicates": [], "leaks": []}
    for split, out in (("train", train), ("valid", valid)):
        for ds in datasets:
            for ex in ds.get(split, []):
                key = exact_key(ex)
                if key not in seen:
                    seen[key] = split
                    out.append(ex)
                elif seen[key] == split:
                    removed["duplicates"].append(ex.where)
                else:
                    removed["leaks"].append(ex.where)
    return train, valid, removed


def convert(opts: DataWriteOptions) -> list[Path]:
    """Write a folder's splits (or one file) in the chat format; plain text stays text records."""
    splits = load_examples(opts.path, opts.format)
    out = Path(opts.out)
    if Path(opts.path).is_dir():
        paths = write_dataset(out, splits.get("train", []), splits.get("valid", []), force=opts.force,
                              reading=_sources(opts.path))
    else:
        (name, examples), = splits.items()
        target = out / (Path(name).stem + ".jsonl")
        _refuse_overwrite([target], opts.force, reading=_sources(opts.path))
        paths = [data.write_records(target, examples)]
    plain = sum(ex.plain for exs in splits.values() for ex in exs)
    if plain:
        warn(f"{plain} plain-text records stay {{\"text\": ...}} records: the chat format cannot say "
             "\"no template, train on every token\"")
    say(f"wrote {', '.join(map(str, paths))}")
    return paths


def write_dataset(out: Path, train: list[Example], valid: list[Example], *, force: bool,
                  reading: list[Path], provenance: dict | None = None) -> list[Path]:
    """train.jsonl, valid.jsonl (when there are validation examples) and provenance.json, atomically.

    Existing data files are replaced only with `force`, or when a merge wrote them.
    """
    targets = [out / f"{s}{ext}" for s in SPLITS for ext in (".jsonl", ".json")] + [out / PROVENANCE]
    from_merge = (out / PROVENANCE).is_file() and provenance is not None
    _refuse_overwrite(targets, force or from_merge, reading)
    paths = [data.write_records(out / "train.jsonl", train)]
    if valid:
        paths.append(data.write_records(out / "valid.jsonl", valid))
    if provenance is not None:
        paths.append(write_atomic(out / PROVENANCE, json.dumps(provenance, indent=1) + "\n"))
    for stale in set(targets) - set(paths):  # a train.json or an old valid.jsonl would shadow these
        stale.unlink(missing_ok=True)
    return paths


def backup_data(folder: Path) -> Path | None:
    """Move the data files of a folder no merge wrote into a dated folder inside it; say where."""
    import time  # noqa: PLC0415

    files = [folder / f"{s}{ext}" for s in SPLITS for ext in (".jsonl", ".json")]
    files = [f for f in files if f.is_file()]
    if not files or (folder / PROVENANCE).is_file():  # empty, or a merge's output: replaced
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = folder / f"backup-{stamp}", 1
    while backup.exists():
        n += 1
        backup = folder / f"backup-{stamp}-{n}"
    backup.mkdir()
    for f in files:
        f.rename(backup / f.name)
    say(f"{folder} held data: moved {', '.join(f.name for f in files)} to {backup}/ (nothing is "
        "lost; FORCE=1 replaces without a backup)")
    return backup


def _refuse_overwrite(targets: list[Path], force: bool, reading: list[Path]) -> None:
    there = [t for t in targets if t.exists()]
    if there and not force:
        raise DataError(there[0], None, "already exists" + (" (it is one of the inputs)"
                        if {t.resolve() for t in there} & {r.resolve() for r in reading} else ""),
                        "pass --force (FORCE=1) to replace it, or write elsewhere: --out (DATA_DIR=)")


def _provenance(folder: Path) -> dict[str, str]:
    """file:line -> where that example came from, for a folder an earlier merge wrote."""
    try:
        prov = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
        return {f"{folder / (split + '.jsonl')}:{i}": str(origin)
                for split in SPLITS for i, origin in enumerate(prov.get(split, []), start=1)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _sources(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return [p for s in SPLITS for p in [path / f"{s}.jsonl", path / f"{s}.json"] if p.is_file()]
