"""The names of the files the stages write and read, the GGUF types they may hold, the one
way every file is written (atomically), and the lock of an output folder."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

RUN_FILE = "donkeytune.json"  # what a stage's output was made from (runinfo.py)
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's adapter weights
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's LoraConfig
SEED_ADAPTER_FILE = "adapters.safetensors"  # the name the seed's RESUME_FROM paths use
STATE_FILE = "trainer_state.safetensors"  # a torch checkpoint's optimizer and random state
LEGACY_STATE_FILE = "trainer_state.pt"  # older runs' pickle of it: refused, never loaded
MLX_STATE_FILE = "mlx_state.safetensors"  # an MLX checkpoint's optimizer state
BEST_DIR = "best"  # adapters/best: the adapter of the lowest validation loss
TEST_FILE = "test.json"  # `donkeytune test`'s answers, in output/report/
REPORT_DIR = "report"  # OUTPUT_DIR/report: metrics.jsonl, loss.png, summary.md, test.json
METRICS_FILE = "metrics.jsonl"  # the training's report lines, one JSON object each (train/loop.py)
MODELFILE = "Modelfile"  # Ollama's, beside the GGUF (use/ollama.py)
LOCK_FILE = ".donkeytune.lock"  # OUTPUT_DIR/.donkeytune.lock: held (flock) by the stage writing there

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what our exporter writes (gguf/tensors.py)
# llama.cpp's quantization types: name -> (llama_ftype number, bytes per weight in the file)
QUANT_TYPES = {"Q4_K_M": (15, 4.85 / 8), "Q5_K_M": (17, 5.69 / 8), "Q6_K": (18, 6.56 / 8),
               "Q8_0": (7, 34 / 32), "Q4_0": (2, 18 / 32), "F16": (1, 2), "BF16": (32, 2)}
DEFAULT_QUANT = "Q4_K_M"  # the seed's QUANTIZE: `quantize`'s default type
UNQUANTIZED = ("F32", "F16", "BF16")  # the GGUF types llama.cpp quantizes from (F32: llama_ftype 0)


def type_in_name(path, types=(*QUANT_TYPES, "F32")) -> str | None:
    """The GGUF type a file's name ends with (…-Q4_K_M.gguf, …-bf16.gguf), the longest that
    fits (BF16, not F16); None when it names none of `types`."""
    stem = Path(path).stem.upper()
    return next((t for t in sorted(types, key=len, reverse=True) if stem.endswith(t)), None)


def model_name(reference: str) -> str:
    """A file-name-friendly name of a model reference (alias, repo name or folder name): the
    <model> of output/gguf/<model>-finetuned-<TYPE>.gguf."""
    name = Path(reference.rstrip("/")).name
    name = name.removesuffix(".gguf")
    return re.sub(r"[^\w.-]+", "-", name) or "model"


@contextmanager
def atomic(path: Path, suffix: str = ""):
    """A temporary name next to `path`, renamed to `path` when the block completes and removed
    when it fails: a reader (or a killed run) never sees half a file. `suffix` ends the
    temporary name, for writers that append their own extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_partials(path: Path) -> None:
    """The temporary files of earlier writers of `path` that were killed (SIGKILL, power cut)
    before they could remove them: their process is gone."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.partial*"):
        pid = old.name[len(path.name) + 2:].partition(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            old.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path: Path, content: str | bytes) -> Path:
    """Write a file atomically: text (UTF-8) or bytes."""
    with atomic(path) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
    return Path(path)


_FIXES = {RUN_FILE: "run the stage that wrote it again (train: --force; convert: `donkeytune "
                   "convert`), or restore the file from a copy",
          "config.json": "the model folder is damaged: download or copy it again"}


def read_json(path, missing=...) -> dict:
    """A file holding one JSON object (a run record, a model's config.json): a missing file is
    `missing` when one is given; an unreadable, empty, damaged or non-object file is a clear
    ModelError naming it, never a traceback in whichever stage read it."""
    from .errors import ModelError  # noqa: PLC0415

    path = Path(path)
    if missing is not ... and not path.is_file():
        return missing
    fix = _FIXES.get(path.name, "fix or remove the file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}", fix) from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ModelError(f"{path} is damaged: JSON nested too deeply", fix) from None
    except ValueError as e:  # JSONDecodeError, or a number of more than 4300 digits
        reason = "the file is empty" if not text.strip() else f"not valid JSON ({e})"
        raise ModelError(f"{path} is damaged: {reason}", fix) from None
    if not isinstance(obj, dict):
        kind = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(
            type(obj), "a number")
        raise ModelError(f"{path} is damaged: a JSON object {{...}} was expected, it holds {kind}",
                         fix)
    return obj


def safetensors_header(path) -> tuple[int, dict]:
    """The header length and JSON header of a safetensors file, checked against the file's size:
    a truncated or damaged file is a clear ModelError before anything loads it."""
    from .errors import ModelError  # noqa: PLC0415

    path = Path(path)
    size = path.stat().st_size

    def damaged(why: str) -> ModelError:
        return ModelError(f"{path} is damaged: {why}",
                          "copy or download it again; a fused model: `donkeytune fuse` writes it "
                          "again")

    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 2 <= n <= min(size - 8, 1 << 27):
            raise damaged(f"{size} bytes, no safetensors header" if size < 8 else
                          f"its header length ({n} bytes) does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((info["data_offsets"][1] for k, info in header.items()
                       if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise damaged("its header is not valid safetensors JSON") from None
    if not isinstance(end, int) or 8 + n + end > size:
        raise damaged(f"truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return n, header


def check_gguf(path) -> None:
    """A file that claims to be a GGUF model starts with GGUF's magic bytes and version."""
    from .errors import ModelError  # noqa: PLC0415

    with Path(path).open("rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") not in (1, 2, 3):
        raise ModelError(f"{path} is not a GGUF model file (it does not start with GGUF's magic "
                         "bytes and version): damaged, or another kind of file",
                         "pass a .gguf file written by DonkeyTune, llama.cpp or the Hub, or copy it again")


def check_not_input(out, source, what: str = "output") -> None:
    """Refuse an output that would overwrite its own input: the input file itself, or a file
    of the input folder; and an output file that is a folder. Checked before anything is written."""
    from .errors import ConfigError  # noqa: PLC0415

    out, source = Path(out), Path(source)
    if out.is_dir():
        raise ConfigError(f"the {what} {out} is a folder: a file name is needed",
                          f"give a file path, e.g. {out / (model_name(str(source)) + '.gguf')}")
    same = out.exists() and source.exists() and os.path.samefile(out, source)
    inside = source.is_dir() and out.exists() and out.resolve().is_relative_to(source.resolve())
    if same or inside:
        where = "is the input itself" if same else f"is a file of the input folder {source}"
        raise ConfigError(f"the {what} {out} {where}: writing it would destroy the input",
                          "give an output path outside the input, e.g. output/gguf/model.gguf")


_held: dict[str, list] = {}  # folder -> [fd, depth]: the locks this process holds


def _lock_path(folder: Path) -> Path:
    return Path(folder) / LOCK_FILE


def _holder(fd: int) -> str:
    """Who holds a lock, from what its holder wrote into the file (for the message only)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {info['pid']} on {info['host']}, since {info['since']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _not_writable(folder: Path, e: OSError):
    from .errors import ConfigError  # noqa: PLC0415

    return ConfigError(f"cannot write into the output folder {folder}: {e.strerror or e}",
                       "give an OUTPUT_DIR you can write to (--output-dir), or fix its permissions")


@contextmanager
def folder_lock(folder, stage: str):
    """Hold the lock of an output folder while `stage` writes into it; a second writer is refused,
    told who holds it. An OS advisory lock (flock) on an open file: the kernel drops it when the
    holder dies, so a killed run never leaves it stuck. Re-entrant within one process (convert
    calls fuse). The folder is created here, so an unwritable one is refused before any model
    loads; the lock file goes when the stage ends, and the folder too if the stage left it empty."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(folder, stage)
    except OSError as e:
        _remove_if_empty(folder, created)
        raise _not_writable(folder, e) from None
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        _lock_path(folder).unlink(missing_ok=True)  # while held: no one can take a stale inode
        os.close(fd)  # closing the only descriptor releases the lock
        _remove_if_empty(folder, created)


def _remove_if_empty(folder: Path, created: bool) -> None:
    """A stage refused before it wrote anything leaves no folder behind."""
    if created:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


def _acquire(folder: Path, stage: str) -> int:
    """The locked descriptor of folder's lock file, its holder's details written into it."""
    import fcntl  # noqa: PLC0415  (POSIX; on Windows, DonkeyTune runs under WSL)

    from .errors import ConfigError  # noqa: PLC0415

    path = _lock_path(folder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"{folder} is in use: another DonkeyTune run is writing there ({holder}); "
                f"a second {stage} would mix its files with that run's",
                "wait for it to finish (or stop it), or give this run another --output-dir "
                "(OUTPUT_DIR=...)") from None
        except OSError:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else its holder removed it as we opened it: take the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    command = " ".join(["donkeytune", *sys.argv[1:]]) if sys.argv else stage
    info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
    return fd


def folder_busy(folder) -> str | None:
    """Who holds the lock of an output folder (a terminal's `donkeytune train`, say), or None
    when no one does. Tried without waiting, and let go at once."""
    import fcntl  # noqa: PLC0415

    try:
        fd = os.open(_lock_path(folder), os.O_RDONLY)
    except OSError:
        return None  # no lock file: no stage is writing there
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None


def output_lock(path, stage: str):
    """The lock of the run folder a file is written into (output/gguf/x.gguf), if it is in one."""
    from contextlib import nullcontext  # noqa: PLC0415

    folder = run_folder_of(path)
    return folder_lock(folder, stage) if folder else nullcontext()


def run_folder_of(path) -> Path | None:
    """The output folder a file is written into, when it lies in one (output/gguf/x.gguf ->
    output): the nearest parent folder that holds a trained run (adapters/donkeytune.json)."""
    here = Path(path).absolute().parent
    for folder in (here, here.parent):
        if (folder / "adapters" / RUN_FILE).is_file():
            return folder
    return None
