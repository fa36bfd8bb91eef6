"""The run's folder as the page sees it: uploads checked and written atomically, what the
stages wrote read back, and every name or path from the page checked to stay inside.

Uploaded data go to OUT/data/ (the DATA_DIR of the run's training), by way of OUT/data/.incoming/,
where each file is checked with the data loader before it replaces the old one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .. import data, runinfo
from ..data import tools as datatools
from ..errors import DonkeyError
from ..files import MODELFILE, write_atomic

MAX_UPLOAD = 100 << 20  # bytes of one uploaded file
# what an upload may be called: a split, one file to split on the page, the held-out questions
UPLOAD_NAMES = {f"{stem}{ext}" for stem in ("train", "valid", "all") for ext in (".jsonl", ".json")}
UPLOAD_NAMES.add("questions.jsonl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PathRefused(DonkeyError):
    """A name or path from the page that would leave the project's folders."""

    status = 400


class TooLarge(DonkeyError):
    status = 413


class Project:
    """`root`: the folder the page was started in; `out`: the run's folder (OUTPUT_DIR)."""

    def __init__(self, out: Path, root: Path, model: str | None = None):
        self.root = Path(root).resolve()
        self.out = (self.root / out).resolve()
        self.data_dir = self.out / "data"
        self.model = model  # the MODEL the page was started with: any path, the user chose it

    def rel(self, path) -> str:
        """A path as the page shows it: relative to where the page was started, when inside."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------ uploads

    def upload(self, name: str, body: bytes, size: int) -> dict:
        """Check one uploaded data file (`size` bytes were sent, `body` holds those kept) and
        install it when it holds no error; the data check of the whole folder comes back."""
        if name not in UPLOAD_NAMES:
            raise PathRefused(f"{name!r} is not a data file name the page takes",
                              "upload train.jsonl, valid.jsonl (or .json), all.jsonl (split on the "
                              "page into train and valid) or questions.jsonl")
        if size > MAX_UPLOAD:
            raise TooLarge(f"{name} is larger than {MAX_UPLOAD >> 20} MB ({size / 2**20:.0f} MB): "
                           "nothing was saved", "train from a folder instead: donkeytune train "
                           "--data-dir DIR (the page takes files up to that size)")
        incoming = self.data_dir / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        staged = incoming / name
        try:
            staged.write_bytes(body)
            errors = self._check_upload(staged)
            if errors:
                return dict(self.check(), saved=False, upload=name, upload_errors=errors)
            self._install(staged, body)
            return dict(self.check(), saved=True, upload=name, upload_errors=[])
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def _check_upload(self, staged: Path) -> list[dict]:
        if staged.name == "questions.jsonl":
            try:
                data.load_questions(staged.parent)
            except DonkeyError as e:
                return [self._problem("error", staged.name, getattr(e, "line", None),
                                      e.message.split(": ", 1)[-1], e.fix or "")]
            return []
        got = data.read_file(staged)
        return [self._problem(p.severity, staged.name, p.line, p.message, p.fix)
                for p in got.problems]

    def _install(self, staged: Path, body: bytes) -> None:
        stem = staged.name.split(".")[0]
        if stem == "all":  # one file: split 80/20 as `donkeytune data split` does
            examples = data.read_file(staged).examples
            train, valid = datatools.split_examples(examples, 0.2, 0)
            for split, exs in (("train", train), ("valid", valid)):
                self._drop_other(split, ".jsonl")
                data.write_records(self.data_dir / f"{split}.jsonl", exs)
            return
        if stem in datatools.SPLITS:  # train.json replaces train.jsonl: the loader takes one
            self._drop_other(stem, staged.suffix)
        write_atomic(self.data_dir / staged.name, body)

    def _drop_other(self, split: str, keep_ext: str) -> None:
        for ext in (".jsonl", ".json"):
            if ext != keep_ext:
                (self.data_dir / f"{split}{ext}").unlink(missing_ok=True)

    # ------------------------------------------------------------ the data check

    def check(self) -> dict:
        """`data check` of OUT/data (without the token lengths: no tokenizer loads)."""
        if not self.data_dir.is_dir() or not any(self.data_dir.glob("train.*")):
            return {"examples": {}, "problems": [], "status": None,
                    "data_dir": self.rel(self.data_dir)}
        splits, problems = datatools.read_splits(self.data_dir)
        problems += datatools.find_warnings(splits, folder=self.data_dir)
        problems = datatools.sort_problems(problems)
        rows = [self._problem(p.severity, self.rel(p.path), p.line, p.message, p.fix)
                for p in problems]
        questions = self.data_dir / "questions.jsonl"
        return {"examples": {k: len(v) for k, v in splits.items()}, "problems": rows,
                "status": datatools.exit_status(problems), "data_dir": self.rel(self.data_dir),
                "questions": questions.is_file()}

    @staticmethod
    def _problem(severity, path, line, message, fix) -> dict:
        return {"severity": severity, "where": f"{path}:{line}" if line else str(path),
                "message": message, "fix": fix}

    # ------------------------------------------------------------ references from the page

    def model_reference(self, ref: str | None) -> str:
        """A model from the page: an alias, a repo id, the page's own MODEL, or a folder or
        .gguf file inside the project; never a path outside it."""
        from .. import models  # noqa: PLC0415

        ref = (ref or "").strip() or self.model or models.DEFAULT_MODEL
        if ref == self.model or models.find_known(ref):
            return ref
        path = Path(ref)
        inside = (self.root / path).resolve()
        local = path.is_absolute() or ".." in path.parts or inside.exists() or ref.startswith(".")
        if not local and HUB_ID.match(ref):
            return ref  # a Hugging Face repo id
        if not inside.is_relative_to(self.root):
            raise PathRefused(f"model {ref!r} is outside the project folder {self.root}: the page "
                              "reads models only inside it",
                              "use an alias or a Hugging Face repo id, copy the model into the "
                              "project, or start the page with MODEL=PATH (donkeytune ui --model PATH)")
        return str(inside)

    def download(self, name: str) -> Path:
        """A file `convert` wrote in OUT/gguf, by its bare name."""
        folder = self.out / "gguf"
        names = {p.name for p in self.files()} if folder.is_dir() else set()
        if name not in names:
            raise PathRefused(f"no file {name!r} to download in {self.rel(folder)}",
                              "the page offers the GGUF files and the Modelfile that convert wrote")
        return folder / name

    # ------------------------------------------------------------ what the stages wrote

    def files(self) -> list[Path]:
        folder = self.out / "gguf"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                      and (p.suffix == ".gguf" or p.name == MODELFILE))

    def read_json(self, *parts) -> dict | None:
        path = self.out.joinpath(*parts)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def run_info(self) -> dict | None:
        return self.read_json("adapters", runinfo.RUN_FILE)

    def converted(self) -> dict | None:
        return self.read_json("gguf", runinfo.RUN_FILE)
