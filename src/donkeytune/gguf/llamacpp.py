"""llama.cpp's own HF -> GGUF converter, for the architectures our exporter does not know.

The converter (`convert_hf_to_gguf.py`, its `conversion/` modules and its own `gguf-py`) comes
from the llama-cpp-python source package of the installed version, so it matches the llama.cpp
that quantizes and runs the file. `make setup` installs it into the venv's site-packages
(`python -m donkeytune.gguf.llamacpp install`); nothing downloads at export time. It runs in a
subprocess with its own gguf-py first on sys.path (it needs a newer `gguf` than the installed
one may be) and imports torch there, not here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from ..errors import ModelError
from ..files import atomic

DIR_NAME = "donkeytune-llama.cpp-converter"  # not an importable name: it shadows nothing
ENV_DIR = "DONKEYTUNE_LLAMA_CPP_CONVERTER"  # a converter folder elsewhere (a llama.cpp checkout)
VENDOR = "vendor/llama.cpp/"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/", "LICENSE")
INSTALL = "make setup   (or: python -m donkeytune.gguf.llamacpp install)"


def llama_cpp_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def converter_dir() -> Path | None:
    """The installed converter of this llama-cpp-python version, else None."""
    if os.environ.get(ENV_DIR):
        folder = Path(os.environ[ENV_DIR])
        return folder if (folder / "convert_hf_to_gguf.py").is_file() else None
    version = llama_cpp_version()
    for entry in [sysconfig.get_paths()["purelib"], *sys.path]:
        folder = Path(entry or ".") / DIR_NAME
        if (folder / "convert_hf_to_gguf.py").is_file() and _version_of(folder) == version:
            return folder
    return None


def _version_of(folder: Path) -> str | None:
    try:
        return (folder / "VERSION").read_text().strip()
    except OSError:
        return None


def missing_reason() -> str:
    version = llama_cpp_version()
    if version is None:
        return "llama-cpp-python is not installed"
    return f"llama.cpp's converter (from llama-cpp-python {version}) is not installed"


def require() -> Path:
    folder = converter_dir()
    if folder is None:
        raise ModelError(missing_reason(), INSTALL)
    return folder


# ---------------------------------------------------------------- which architectures

_maps: dict[Path, frozenset[str]] = {}


def text_architectures(folder: Path | None = None) -> frozenset[str]:
    """Architecture names the converter registers for text models (read from its source,
    without importing it: that would import torch)."""
    folder = folder or require()
    if folder not in _maps:
        tree = ast.parse((folder / "conversion" / "__init__.py").read_text())
        names: set[str] = set()
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else \
                (node.targets[0] if isinstance(node, ast.Assign) else None)
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
                names = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        if not names:
            raise ModelError(f"{folder}: no TEXT_MODEL_MAP in conversion/__init__.py",
                             "reinstall the converter: " + INSTALL)
        _maps[folder] = frozenset(names)
    return _maps[folder]


def architecture(cfg: dict) -> str | None:
    """The architecture name the converter converts a config.json as (its own rule: the
    text_config's architectures win over the top level's for text models)."""
    names = cfg.get("architectures") or []
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    if text.get("architectures") and names and names[0] not in _TOP_LEVEL_WINS:
        names = text["architectures"]
    return names[0] if names else None


# converter classes that route on the top-level name although text_config names another
_TOP_LEVEL_WINS = ("StepVLForConditionalGeneration", "Sarashina2VisionForCausalLM",
                   "Exaone4_5_ForConditionalGeneration", "Step3p7ForConditionalGeneration",
                   "KimiK3ForConditionalGeneration")


def supports(cfg: dict) -> bool:
    folder = converter_dir()
    return folder is not None and architecture(cfg) in text_architectures(folder)


# ---------------------------------------------------------------- converting

def convert(hf_dir: Path, out_path: Path, outtype: str = "f16") -> Path:
    """Write `hf_dir` as a GGUF file with llama.cpp's converter (text model only)."""
    folder = require()
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "gguf-py"), str(folder)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"  # a local folder: nothing downloads at export time
    with atomic(out_path) as tmp:
        args = [str(hf_dir), "--outfile", str(tmp), "--outtype", outtype.lower()]
        cmd = [sys.executable, "-c", _DRIVER, str(folder), str(_has_mtp(hf_dir)), *args]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not tmp.is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-12:])
            raise ModelError(f"llama.cpp's converter failed on {hf_dir} "
                             f"(status {result.returncode}):\n{tail}",
                             "the architecture or one of its settings may be newer than this "
                             f"llama.cpp (llama-cpp-python {llama_cpp_version()}); run it yourself: "
                             f"python {folder / 'convert_hf_to_gguf.py'} " + " ".join(args))
    return out_path


# The converter's own command line, plus one decision it leaves to the user: a checkpoint
# whose multi-token-prediction layers transformers dropped on saving (Qwen3.5's `mtp.*`, after
# fusing) converts with --no-mtp, or the converter stops on the missing layers.
_DRIVER = """
import sys
folder, has_mtp, args = sys.argv[1], sys.argv[2] == "True", sys.argv[3:]
sys.path[:0] = [folder + "/gguf-py", folder]
import convert_hf_to_gguf as main
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
from pathlib import Path
hparams = ModelBase.load_hparams(Path(args[0]), False)
try:
    cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
except NotImplementedError:
    cls = None
if cls is not None and getattr(cls, "supports_mtp_export", False) and not has_mtp:
    args.append("--no-mtp")
sys.argv = ["convert_hf_to_gguf.py", *args]
main.main()
"""


def _has_mtp(hf_dir: Path) -> bool:
    from .tensors import index  # noqa: PLC0415

    return any(name.startswith(("mtp.", "model.mtp.")) or ".mtp." in name for name in index(hf_dir))


# ---------------------------------------------------------------- installing

def install(target: Path | None = None, sdist: Path | None = None) -> Path:
    """Put the converter of the installed llama-cpp-python into `target` (default: this
    venv's site-packages), from `sdist` or from the source package pip downloads."""
    version = llama_cpp_version()
    if version is None:
        raise ModelError("llama-cpp-python is not installed", "pip install llama-cpp-python")
    dest = Path(target or sysconfig.get_paths()["purelib"]) / DIR_NAME
    if (dest / "convert_hf_to_gguf.py").is_file() and _version_of(dest) == version:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--no-binary=:all:", f"llama-cpp-python=={version}", "-d", tmp]
            if subprocess.run(cmd).returncode != 0:
                raise ModelError(f"could not download the llama-cpp-python {version} source package",
                                 "check the connection to PyPI, or pass the .tar.gz with --sdist")
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        _extract(Path(sdist), dest, version)
    return dest


def _extract(sdist: Path, dest: Path, version: str) -> None:
    import shutil  # noqa: PLC0415

    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    found = 0
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            rel = inner.removeprefix(VENDOR)
            if rel == inner or not member.isfile() or not rel.startswith(KEEP):
                continue
            member.name = rel
            tar.extract(member, partial, filter="data")
            found += 1
    if not (partial / "convert_hf_to_gguf.py").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelError(f"{sdist} holds no {VENDOR}convert_hf_to_gguf.py",
                         "pass the llama-cpp-python source package (.tar.gz)")
    (partial / "VERSION").write_text(version + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m donkeytune.gguf.llamacpp",
                                     description="install llama.cpp's HF -> GGUF converter")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="from the installed llama-cpp-python's source package")
    p.add_argument("--target", type=Path, help="folder to put it in (default: site-packages)")
    p.add_argument("--sdist", type=Path, help="a llama-cpp-python .tar.gz already downloaded")
    sub.add_parser("where", help="print the converter's folder (status 1 if not installed)")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(f"llama.cpp converter: {install(args.target, args.sdist)}")
            return 0
        folder = converter_dir()
        print(folder or missing_reason())
        return 0 if folder else 1
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    raise SystemExit(main())
