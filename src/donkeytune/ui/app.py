"""The page's HTTP side: a FastAPI app over one run folder.

Reads what the stages write (metrics.jsonl, donkeytune.json, fidelity.json, test.json), runs
the long stages as `donkeytune` subprocesses (jobs.py), and streams what changes to the page
as server-sent events. Every error reaches the page as {"error", "fix"} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request  # the `ui` extra; FastAPI reads these annotations
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import config, runinfo
from ..errors import DonkeyError
from ..files import DEFAULT_QUANT, METRICS_FILE, MODELFILE, QUANT_TYPES, REPORT_DIR, TEST_FILE
from .jobs import Jobs
from .project import MAX_UPLOAD, Project

PAGE = Path(__file__).with_name("page.html")
POLL = 0.5  # seconds between looks at the run folder, for the event stream
LOG_TAIL = 20000  # characters of a job's log sent when a page connects
# options of `train` the page may set; empty = the recipe's
TRAIN_FIELDS = ("iters", "batch_size", "num_layers", "lr", "rank", "scale", "max_seq_length",
                "steps_per_report", "steps_per_eval", "val_batches", "save_every", "seed")
PLAN = re.compile(r"(\d+) iterations x (\d+) examples")


def build_app(out: str | Path = "output", root: str | Path = ".", model: str | None = None):
    """The app for the run folder `out` (relative to `root`, the project folder)."""
    project = Project(Path(out), Path(root), model)
    jobs = Jobs(project.out, project.root)
    chats = Chats(project)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        jobs.shutdown()  # the server stops: a running job gets its clean stop

    app = FastAPI(title="DonkeyTune", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.project, app.state.jobs = project, jobs

    @app.exception_handler(DonkeyError)
    async def donkey_error(_request, e: DonkeyError):
        status = e.status if 400 <= e.status < 500 else 400
        return JSONResponse({"error": e.message, "fix": e.fix}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/state")
    def state():
        return dict(snapshot(project, jobs), data=project.check(), models=models_table(),
                    quant_types=list(QUANT_TYPES), model=project.model,
                    train_fields=list(TRAIN_FIELDS), out=project.rel(project.out))

    @app.put("/api/data/{name:path}")
    async def upload(name: str, request: Request):
        body, size = bytearray(), 0
        async for chunk in request.stream():  # all of it, so that the answer reaches the client
            size += len(chunk)
            if size <= MAX_UPLOAD:
                body += chunk
        return await run_in_threadpool(project.upload, name, bytes(body), size)

    @app.get("/api/data")
    def data_check():
        return project.check()

    @app.get("/api/stats")
    def stats(model: str | None = None, iters: int = 600, batch_size: int = 4):
        return data_stats(project, project.model_reference(model), iters, batch_size)

    @app.get("/api/recipe")
    def recipe(request: Request):
        return recipe_for(project, dict(request.query_params))

    @app.post("/api/train")
    async def train(request: Request):
        body = await _json(request)
        return jobs.start("train", train_args(project, body)).describe()

    @app.post("/api/stop")
    def stop():
        return jobs.stop().describe()

    @app.post("/api/convert")
    async def convert(request: Request):
        body = await _json(request)
        quantize = str(body.get("quantize") or DEFAULT_QUANT)
        config.resolve(config.ConvertOptions, {"quantize": quantize}, environ={})  # checked here
        return jobs.start("convert", ["--output-dir", str(project.out),
                                      "--quantize", quantize]).describe()

    @app.post("/api/test")
    def test():
        if project.run_info() is None:
            raise DonkeyError("nothing trained yet", "train first")
        return jobs.start("test", ["--output-dir", str(project.out), "--num-prompts", "-1",
                                   "--max-tokens", "60"]).describe()

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await _json(request)
        return await run_in_threadpool(chats.answer, body)

    @app.get("/api/download/{name:path}")
    def download(name: str):
        path = project.download(name)
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")

    @app.get("/api/events")
    async def events(request: Request):
        async def stream():
            watch = Watch(project, jobs)
            while not await request.is_disconnected():
                update = await run_in_threadpool(watch.poll)
                if update:
                    yield f"data: {json.dumps(update)}\n\n"
                await asyncio.sleep(POLL)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


async def _json(request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise DonkeyError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise DonkeyError("the request body must be a JSON object")
    return body


# ---------------------------------------------------------------- training options

def train_args(project: Project, body: dict) -> list[str]:
    """The `donkeytune train` flags for what the page asks; checked by TrainOptions first."""
    out = ["--output-dir", str(project.out)]
    if body.get("resume"):
        return ["--resume", *out]
    if project.check().get("status") in (None, 2):
        raise DonkeyError(f"no usable training data in {project.rel(project.data_dir)}",
                          "upload train.jsonl (and valid.jsonl) first, and fix the errors shown")
    flags = {"model": project.model_reference(body.get("model")), "data_dir": str(project.data_dir),
             "output_dir": str(project.out), "force": bool(body.get("force"))}
    for name in TRAIN_FIELDS:
        value = body.get(name)
        if value not in (None, ""):
            flags[name] = value
    config.resolve(config.TrainOptions, flags, environ={})  # bad values: a message, not a job
    args = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return args


def recipe_for(project: Project, query: dict) -> dict:
    """The recipe `train` would choose for this model and data, and why (recipe.choose)."""
    from .. import device, models  # noqa: PLC0415
    from ..train import memory, recipe  # noqa: PLC0415

    flags = {k: v for k, v in query.items() if k in TRAIN_FIELDS and v not in ("", None)}
    opts = config.resolve(config.TrainOptions, flags, environ={})
    checked = project.check()
    n = checked["examples"].get("train", 0)
    folder = models.resolve(project.model_reference(query.get("model")))
    cfg = models.read_config(folder)
    values, reasons = recipe.choose(opts, cfg, n, memory.available(device.pick_device("auto")),
                                    memory.count_params(folder))
    return {"recipe": recipe.pick_recipe(opts), "examples": n,
            "rows": [{"name": recipe.ENV_NAMES[k], "field": k, "value": values[k],
                      "reason": reasons[k]} for k in recipe.ENV_NAMES]}


def data_stats(project: Project, model: str, iters: int, batch_size: int) -> dict:
    """`data stats` of the uploaded data: tokens per example (the model's tokenizer), epochs."""
    from .. import data, device, models  # noqa: PLC0415
    from ..data import tools as datatools  # noqa: PLC0415

    splits = datatools.load_examples(project.data_dir)
    tok = device.load_tokenizer(models.resolve(model))
    out = {"examples": {k: len(v) for k, v in splits.items()}, "tokens": {}, "histogram": {}}
    for name, exs in splits.items():
        lengths = data.count_tokens(tok, exs)
        out["tokens"][name] = datatools.token_stats(lengths)
        out["histogram"][name] = datatools.histogram(lengths) if lengths else []
    train = sum(len(v) for k, v in splits.items() if k != "valid")
    out["training"] = datatools.epoch_advice(train, iters, batch_size)
    return out


def models_table() -> list[dict]:
    from .. import models  # noqa: PLC0415
    from ..models import table  # noqa: PLC0415

    try:
        dev, avail = table.memory_here()
    except Exception:  # noqa: BLE001 - the table still shows without the column
        dev, avail = "cpu", None
    return [{"alias": m.alias, "repo": m.repo, "params_b": m.params_b, "train_gb": m.train_gb,
             "fits": table.fits_here(m.train_gb, avail) if avail is not None else "?",
             "device": dev, "note": m.note} for m in models.KNOWN_MODELS]


# ---------------------------------------------------------------- what changes: the event stream

def snapshot(project: Project, jobs: Jobs) -> dict:
    """The small things the page shows besides the plot and the log."""
    from .. import report  # noqa: PLC0415
    from ..use import ollama  # noqa: PLC0415

    job = jobs.describe()
    run = project.run_info()
    conv = project.converted()
    out = {"job": job, "elsewhere": jobs.elsewhere(), "run": None, "files": [],
           "fidelity": project.read_json("gguf", "fidelity.json"),
           "test": project.read_json(REPORT_DIR, TEST_FILE), "commands": []}
    if run:
        o = run.get("options", {})
        out["run"] = {"base_model": run.get("base_model"), "iteration": run.get("iteration"),
                      "iters": o.get("iters"), "complete": run.get("complete"),
                      "data_dir": project.rel(run.get("data_dir", ""))}
        if not (job and job["kind"] == "train" and job["state"] in ("running", "stopping")):
            metrics = report.read_metrics(project.out / REPORT_DIR / METRICS_FILE)
            out["run"]["diagnosis"] = [dataclasses.asdict(f) for f in report.diagnose(
                metrics["train_loss"], metrics["val_loss"], o.get("lr"), o.get("iters"))]
    for p in project.files():
        out["files"].append({"name": p.name, "path": project.rel(p), "mb": round(p.stat().st_size / 1e6, 2),
                             "url": f"/api/download/{p.name}"})
    if conv and conv.get("quantized"):
        gguf = project.out / "gguf" / conv["quantized"]
        name = gguf.stem.rsplit("-", 1)[0]
        out["commands"] = [ollama.create_command(Path(project.rel(gguf.parent / MODELFILE)), name),
                           f"ollama run {name}",
                           f"llama-cli -m {project.rel(gguf)} -cnv",
                           f"donkeytune chat --output-dir {project.rel(project.out)}",
                           f"donkeytune serve --output-dir {project.rel(project.out)}"]
    return out


class Watch:
    """One page's view of the run folder: each poll returns what changed since the last."""

    def __init__(self, project: Project, jobs: Jobs):
        self.project, self.jobs = project, jobs
        self.metrics = project.out / REPORT_DIR / METRICS_FILE
        self.m_offset, self.m_key = 0, None
        self.log_key, self.l_offset = None, 0
        self.last: dict | None = None
        self.plan: int | None = None
        self.rows: list[dict] = []  # loss rows of the run, for its progress

    def poll(self) -> dict:
        update: dict = {}
        snap = snapshot(self.project, self.jobs)
        job = self.jobs.current
        if job is not None:
            self._log(job, update)
        self._metrics(update, job)
        snap["progress"] = self._progress(job)
        if snap != self.last:
            update["state"] = snap
            self.last = snap
        return update

    def _log(self, job, update: dict) -> None:
        key = (job.log, job.started)
        if key != self.log_key:
            self.log_key, self.l_offset, self.plan = key, 0, None
            update["log_reset"] = True
        try:
            with job.log.open("rb") as f:
                size = f.seek(0, 2)
                start = max(self.l_offset, size - LOG_TAIL) if self.l_offset == 0 else self.l_offset
                f.seek(start)
                text = f.read(size - start).decode("utf-8", "replace")
        except OSError:
            return
        if text:
            self.l_offset = size
            update["log"] = text
            found = PLAN.findall(text)
            if found and job.kind == "train":
                self.plan = int(found[-1][0])

    def _metrics(self, update: dict, job) -> None:
        try:
            stat = self.metrics.stat()
        except OSError:
            if self.m_offset:
                self.m_offset, self.rows, update["metrics_reset"], update["metrics"] = 0, [], True, []
            return
        key = (stat.st_ino, job.started if job and job.kind == "train" else None)
        if key != self.m_key or stat.st_size < self.m_offset:  # a new or resumed run rewrote it
            self.m_key, self.m_offset = key, 0
            update["metrics_reset"] = True
        if stat.st_size == self.m_offset:
            return
        with self.metrics.open("rb") as f:
            f.seek(self.m_offset)
            chunk = f.read(stat.st_size - self.m_offset)
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
        self.m_offset += len(complete)
        rows = []
        for line in complete.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        update["metrics"] = rows
        if update.get("metrics_reset"):
            self.rows = []
        self.rows += [r for r in rows if "train_loss" in r or "step_loss" in r]

    def _progress(self, job) -> dict | None:
        if job is None or job.kind != "train":
            return None
        steps = [r for r in self.rows if "step_loss" in r]
        reports = [r for r in self.rows if "train_loss" in r]
        it = steps[-1]["iter"] if steps else 0
        out = {"iter": it, "iters": self.plan}
        if reports:
            last = reports[-1]
            out["tokens_per_sec"] = round(last.get("tokens_per_sec", 0), 1)
            if self.plan and last.get("its") and job.running:
                out["eta_s"] = round((self.plan - it) / last["its"], 1)
        if job.running:
            try:
                import psutil  # noqa: PLC0415

                out["memory_gb"] = round(psutil.Process(job.proc.pid).memory_info().rss / 1e9, 2)
            except Exception:  # noqa: BLE001 - it may have just exited
                pass
        return out


# ---------------------------------------------------------------- chat with base and fine-tuned

class Chats:
    """The two GGUFs of the run in llama.cpp, loaded once each (again after a new convert)."""

    def __init__(self, project: Project):
        self.project = project
        self.loaded: dict[str, tuple[tuple, object, threading.Lock]] = {}
        self._lock = threading.Lock()

    def answer(self, body: dict) -> dict:
        which = body.get("model")
        if which not in ("base", "finetuned"):
            raise DonkeyError("'model' must be base or finetuned")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str) for m in messages):
            raise DonkeyError("'messages' must be a non-empty list of {role, content}")
        max_tokens = min(int(body.get("max_tokens") or 200), 2048)
        path = self._gguf(which)
        llm, lock = self._load(which, path)
        conv = self.project.converted() or {}
        system = conv.get("system_prompt")
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        from ..gguf.runtime import chat_gguf  # noqa: PLC0415

        with lock:  # one answer at a time per model: llama.cpp contexts are not shared
            try:
                text = chat_gguf(llm, messages, max_tokens)
            except ValueError as e:  # the conversation does not fit the context
                raise DonkeyError(f"llama.cpp: {e}", "start a new conversation") from None
        return {"model": which, "gguf": path.name, "answer": text}

    def _gguf(self, which: str) -> Path:
        conv = self.project.converted()
        if not conv or not conv.get("quantized"):
            raise DonkeyError("no converted model yet", "convert first")
        tuned = self.project.out / "gguf" / conv["quantized"]
        if which == "finetuned":
            return tuned
        from ..use.test import _gguf_type, base_gguf  # noqa: PLC0415

        run = self.project.run_info()
        base_dir = runinfo.base_model_of(run, None)
        return base_gguf(base_dir, _gguf_type(tuned))  # exported like the fine-tuned one, cached

    def _load(self, which: str, path: Path):
        from ..gguf.runtime import load_llama  # noqa: PLC0415

        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            got = self.loaded.get(which)
            if got is None or got[0] != key:
                self.loaded[which] = (key, load_llama(path, n_ctx=2048), threading.Lock())
            return self.loaded[which][1], self.loaded[which][2]
