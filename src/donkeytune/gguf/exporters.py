"""Which exporter writes a model's GGUF: ours (gguf/builtin.py) or llama.cpp's converter; and
the `export` command (any supported HF folder -> GGUF).

`plan` answers from config.json and the safetensors headers alone (no weights, no torch), so
training can refuse a model that cannot be exported before it loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import EXPORTERS, ExportOptions
from ..errors import ConfigError, DonkeyError, ModelError
from ..files import OUT_TYPES, check_not_input, output_lock
from ..models import read_config
from ..progress import say, status

BUILTIN, LLAMA_CPP = "builtin", "llama.cpp"
NAMES = {BUILTIN: "built-in exporter", LLAMA_CPP: "llama.cpp's converter"}
MODAL_PARTS = {"vision_config": "vision", "audio_config": "audio"}  # beside a text_config


@dataclass(frozen=True)
class Plan:
    exporter: str | None  # None: this model cannot be exported
    architecture: str
    why: str = ""  # when it cannot
    fix: str | None = None
    left_out: tuple[str, ...] = ()  # parts of a multimodal checkpoint the GGUF leaves out

    @property
    def line(self) -> str:
        """What training says before it starts."""
        if self.exporter is None:
            return f"cannot be exported to GGUF: {self.why}"
        extra = f" ({self.architecture}: the text model; the {' and '.join(self.left_out)} " \
                f"part{'s are' if len(self.left_out) > 1 else ' is'} left out)" if self.left_out else ""
        return f"GGUF: {NAMES[self.exporter]}{extra}"


def run(opts: ExportOptions) -> Path:
    """The `export` command: the HF folder as a GGUF file of type OUTTYPE."""
    with output_lock(opts.out, "export"):  # into a run's folder: not while its train writes
        return _run(opts)


def _run(opts: ExportOptions) -> Path:
    from ..train import memory  # noqa: PLC0415

    check_not_input(opts.out, opts.hf_dir, "GGUF file")
    memory.check_model_write(Path(opts.hf_dir), Path(opts.out).parent, [opts.outtype], "the GGUF file")
    say(usable_plan(Path(opts.hf_dir), opts.exporter).line)
    with status(f"Exporting {opts.hf_dir} to {opts.out} ({opts.outtype})"):
        out = export(Path(opts.hf_dir), Path(opts.out), opts.outtype, exporter=opts.exporter)
    say(f"  {out}  {out.stat().st_size / 1e6:.1f} MB")
    return out


def plan(hf_dir: Path, exporter: str = "auto") -> Plan:
    """How the model in `hf_dir` will be exported with `exporter` (auto, builtin, llama.cpp)."""
    from . import llamacpp  # noqa: PLC0415 - `python -m donkeytune.gguf.llamacpp` runs it

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}", "use one of: " + ", ".join(EXPORTERS))
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    arch = llamacpp.architecture(cfg) or "(no architecture in config.json)"
    left_out = tuple(part for key, part in MODAL_PARTS.items() if cfg.get(key))
    builtin_problem = _builtin_problem(hf_dir, cfg) if exporter != LLAMA_CPP else None
    if exporter == BUILTIN:
        if builtin_problem:
            return Plan(None, arch, f"the built-in exporter {builtin_problem}",
                        "use EXPORTER=auto (llama.cpp's converter where ours falls short)")
        return Plan(BUILTIN, arch)
    if exporter == "auto" and not builtin_problem:
        return Plan(BUILTIN, arch)
    if llamacpp.converter_dir() is None:
        why = llamacpp.missing_reason()
        if builtin_problem:
            why = f"the built-in exporter {builtin_problem}, and {why}"
        return Plan(None, arch, why, llamacpp.INSTALL)
    if llamacpp.supports(cfg):
        return Plan(LLAMA_CPP, arch, left_out=left_out)
    version = llamacpp.llama_cpp_version()
    why = f"llama.cpp's converter (llama-cpp-python {version}) does not convert {arch}"
    if builtin_problem:
        why = f"the built-in exporter {builtin_problem}, and {why}"
    return Plan(None, arch, why, "pick a model of an architecture llama.cpp supports "
                "(see `donkeytune models`), or a newer llama-cpp-python and `make setup`")


def usable_plan(hf_dir: Path, exporter: str = "auto") -> Plan:
    """`plan`, with the reason raised when the model cannot be exported."""
    chosen = plan(hf_dir, exporter)
    if chosen.exporter is None:
        raise ModelError(f"{hf_dir}: {chosen.line}", chosen.fix)
    return chosen


def for_architecture(name: str | None) -> str:
    """Which exporter `auto` takes for an architecture name, for tables (no config checks)."""
    from . import llamacpp  # noqa: PLC0415 - `python -m donkeytune.gguf.llamacpp` runs it

    from .archs import ARCHS  # noqa: PLC0415

    if not name:
        return "?"
    if name in ARCHS:
        return BUILTIN
    folder = llamacpp.converter_dir()
    if folder is None:
        return "llama.cpp? (converter not installed)"
    return LLAMA_CPP if name in llamacpp.text_architectures(folder) else "none"


def export(hf_dir: Path, out_path: Path, outtype: str = "f16", progress=None,
           exporter: str = "auto") -> Path:
    """Write the model in `hf_dir` as a GGUF file with the exporter `plan` picks."""
    from . import llamacpp  # noqa: PLC0415 - `python -m donkeytune.gguf.llamacpp` runs it

    from .builtin import export as builtin_export  # noqa: PLC0415

    if usable_plan(hf_dir, exporter).exporter == BUILTIN:
        return builtin_export(hf_dir, out_path, outtype, progress)
    if outtype.lower() not in OUT_TYPES:
        raise ConfigError(f"unknown GGUF export type {outtype!r}", "use one of: " + ", ".join(OUT_TYPES))
    return llamacpp.convert(hf_dir, out_path, outtype)


def _builtin_problem(hf_dir: Path, cfg: dict) -> str | None:
    """Why our exporter cannot write this model, or None: its table row, its hyperparameter
    keys and a GGUF name for every tensor, checked without reading any weight."""
    import gguf  # noqa: PLC0415

    from . import builtin, tensors  # noqa: PLC0415
    from ..models import text_config  # noqa: PLC0415
    from .archs import ARCHS, arch_for, write_hparams  # noqa: PLC0415

    names = cfg.get("architectures") or []
    if not any(n in ARCHS for n in names):
        return (f"does not know {', '.join(names) or 'a model without architectures'} "
                f"(it knows {', '.join(ARCHS)})")
    try:
        text = text_config(cfg)
        arch = arch_for(text, hf_dir)
        write_hparams(gguf.GGUFWriter(None, arch.name), arch, text)
        if list(hf_dir.glob("*.safetensors")):
            builtin.plan_model(tensors.index(hf_dir), text, arch, tensors.GGML_TYPES["f16"])
    except (DonkeyError, KeyError, TypeError, ValueError) as e:
        return f"cannot write it: {e.message if isinstance(e, DonkeyError) else repr(e)}"
    return None


