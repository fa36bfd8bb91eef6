"""Options of every stage, each declared once: a dataclass field with default, help and Make name.

Precedence, lowest first: field default < YAML file (`--config`) < environment
(`DONKEYTUNE_<NAME>`, which is what the Makefile sets from its variables) < flags.
"Not given" is None everywhere, so a flag never overrides with its own default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .data.formats import FORMATS
from .errors import ConfigError
from .files import ADAPTER_FILE, BEST_DIR, DEFAULT_QUANT, OUT_TYPES, QUANT_TYPES

ENV_PREFIX = "DONKEYTUNE_"
# The seed's defaults, the `seed` recipe (recipe.py chooses the others)
SEED_RECIPE = dict(iters=600, batch_size=4, num_layers=8, lr=1e-5, rank=8, scale=10.0)


# The `--config YAML` option every command has (resolve reads it before the others)
CONFIG_OPTION = dict(help="read options from this YAML file", env="CONFIG")


def opt(default, help: str, *, env: str | None = None, positional: bool = False,
        required: bool = False, choices: tuple | None = None):
    """A stage option: `env` is its Make variable (MODEL, ITERS, ...)."""
    return field(default=default, metadata=dict(help=help, env=env, positional=positional,
                                                required=required, choices=choices))


def _base_type(tp):
    """int for `int | None`, etc."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def convert(value, tp: type, name: str):
    """Convert a YAML/env value to the field's type, with a message naming the option."""
    if value is None:
        return None
    if typing.get_origin(tp) is list:  # several values: a list from flags or YAML, "a b" from env
        return value.split() if isinstance(value, str) else [str(v) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if tp in (int, float) and isinstance(value, bool):  # YAML `iters: true` is not 1
            raise ValueError(value)
        if tp in (int, float) and not isinstance(value, (str, int, float)):
            raise ValueError(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if tp is int:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        out = tp(value)
        if tp is float and not math.isfinite(out):
            raise ValueError(value)
        return out
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"option {name}: {value!r} is not a valid {tp.__name__}"
                          + (" (a finite number)" if tp in (int, float) else "")) from None


def check_choice(f: dataclasses.Field, value):
    """The field's declared choices, for every source of a value (flags, YAML, environment);
    a word in another case (OUTTYPE=F16) is taken as the choice it spells."""
    choices = f.metadata.get("choices")
    if choices is None or value is None or value in choices:
        return value
    if isinstance(value, str):
        for c in choices:
            if isinstance(c, str) and c.lower() == value.strip().lower():
                return c
    env = f.metadata.get("env")
    raise ConfigError(f"option {f.name}" + (f" ({env})" if env else "") + f": {value!r} is not "
                      "one of the allowed values", "use one of: " + ", ".join(map(str, choices)))


def make_names(classes=None) -> set[str]:
    """Every Make variable the options declare (the Makefile reads the same declarations)."""
    names = {CONFIG_OPTION["env"]}
    for cls in classes or ALL_OPTIONS:
        names |= {f.metadata["env"] for f in dataclasses.fields(cls) if f.metadata.get("env")}
    return names


def resolve(cls, flags: dict | None = None, *, config_file: str | Path | None = None,
            environ: typing.Mapping[str, str] | None = None):
    """Build `cls` from defaults < YAML < environment < flags; validation runs in __post_init__."""
    environ = os.environ if environ is None else environ
    types_ = field_types(cls)
    values: dict = {}
    config_file = config_file or environ.get(ENV_PREFIX + CONFIG_OPTION["env"])
    if config_file:
        values.update(_read_yaml(Path(config_file), cls))
    for f in dataclasses.fields(cls):
        env = f.metadata.get("env")
        if env and environ.get(ENV_PREFIX + env, "") != "":
            values[f.name] = environ[ENV_PREFIX + env]
    for name, value in (flags or {}).items():
        if value is not None and name in types_:
            values[name] = value
    values = {k: convert(v, types_[k], k) for k, v in values.items()}
    for f in dataclasses.fields(cls):
        if f.name in values:
            values[f.name] = check_choice(f, values[f.name])
    return cls(**values)


def _read_yaml(path: Path, cls) -> dict:
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_").lower()
        if name in names:
            out[name] = value
        elif not any(name in {f.name for f in dataclasses.fields(c)} for c in ALL_OPTIONS):
            raise ConfigError(f"{path}: unknown option {key!r}",
                              f"valid options: {', '.join(sorted(names))}")
    return out


def _check(cond: bool, message: str, fix: str | None = None) -> None:
    if not cond:
        raise ConfigError(message, fix)


# ---------------------------------------------------------------- stage options

@dataclass
class ModelOptions:
    model: str | None = opt(None, "model: built-in alias (see `donkeytune models`), local HF "
                            "folder, .gguf file or Hugging Face repo id; default: the run's "
                            "base model, or smollm2-135m", env="MODEL")
    trust_remote_code: bool = opt(False, "allow models whose code lives in their own repo "
                                  "(runs that code on this machine)")
    allow_pickle: bool = opt(False, "accept pickle weights (.bin), which can run code when loaded")
    output_dir: str = opt("output", "folder for adapters/, fused/ and gguf/", env="OUTPUT_DIR")

    @property
    def adapter_dir(self) -> Path:
        return Path(self.output_dir) / "adapters"

    @property
    def fused_dir(self) -> Path:
        return Path(self.output_dir) / "fused"


EXPORTERS = ("auto", "builtin", "llama.cpp")


@dataclass
class ExporterOptions:
    exporter: str = opt("auto", "GGUF exporter: builtin (ours: fast, no torch, the architectures "
                        "`donkeytune models` marks), llama.cpp (llama.cpp's own converter, every "
                        "architecture it knows), or auto: builtin where it knows the "
                        "architecture, else llama.cpp", env="EXPORTER", choices=EXPORTERS)


@dataclass
class TrainOptions(ModelOptions, ExporterOptions):
    data_dir: str = opt("data", "folder with train.jsonl and valid.jsonl", env="DATA_DIR")
    recipe: str | None = opt(None, "what fills ITERS BATCH_SIZE NUM_LAYERS LR RANK SCALE when you "
                             "leave them unset (values you set are kept): auto (from the model, data "
                             "and memory; the default), seed (the seed's 600/4/8/1e-5/8/10, with its "
                             "settings for the models it names) or none (set them all)",
                             env="RECIPE", choices=("auto", "seed", "none"))
    # None below = "from the recipe" (recipe.resolve fills them before the model loads)
    iters: int | None = opt(None, "optimizer steps (default: the recipe's; seed 600)", env="ITERS")
    batch_size: int | None = opt(None, "examples per optimizer step (default: the recipe's; "
                                 "seed 4)", env="BATCH_SIZE")
    num_layers: int | None = opt(None, "LoRA on the last N transformer blocks, -1 = all "
                                 "(default: the recipe's; seed 8)", env="NUM_LAYERS")
    lr: float | None = opt(None, "learning rate, Adam (default: the recipe's; seed 1e-5)", env="LR")
    rank: int | None = opt(None, "LoRA rank (default: the recipe's; seed 8)", env="RANK")
    scale: float | None = opt(None, "LoRA scale: the adapter's output is multiplied by it "
                              "(the seed's mlx-lm meaning; PEFT lora_alpha = scale x rank; "
                              "default: the recipe's, seed 10)", env="SCALE")
    alpha: float | None = opt(None, "PEFT lora_alpha; when given, scale = alpha / rank", env="ALPHA")
    dropout: float = opt(0.05, "LoRA dropout", env="DROPOUT")
    max_seq_length: int = opt(2048, "longer examples are truncated (with a warning)",
                              env="MAX_SEQ_LENGTH")
    train_on_prompt: bool = opt(False, "train on every token, not only the assistant's")
    steps_per_report: int = opt(10, "a report line every N steps")
    steps_per_eval: int = opt(50, "validation every N steps (and at the start and the end)")
    val_batches: int = opt(25, "validation batches per evaluation (-1 = the whole split)")
    early_stop: int | None = opt(None, "stop after N evaluations without a lower validation loss "
                                 "(the adapter of the lowest is kept in adapters/best either way)",
                                 env="EARLY_STOP")
    eval_questions: bool = opt(False, "at each evaluation also answer the held-out questions of "
                               "DATA_DIR/questions.jsonl (greedy, short answers) and count the "
                               "keywords found", env="EVAL_QUESTIONS")
    save_every: int = opt(100, "checkpoint every N steps", env="SAVE_EVERY")
    resume_from: str | None = opt(None, "start from this adapter's weights (file or folder): "
                                  "a new run with fresh optimizer", env="RESUME_FROM")
    resume: bool = opt(False, "continue the interrupted run in --output-dir exactly (its options, "
                       "optimizer, data position and random state)", env="RESUME")
    keep: int = opt(5, "checkpoints kept (older ones are removed); -1 = all", env="KEEP")
    seed: int = opt(0, "random seed (data order, dropout, LoRA init)", env="SEED")
    device: str = opt("auto", "auto, cpu, cuda or mps", env="DEVICE",
                      choices=("auto", "cpu", "cuda", "mps"))
    engine: str = opt("auto", "training engine: torch, or mlx (Apple's MLX, needs donkeytune[mlx]); "
                      "auto: mlx on Apple Silicon when it is installed, else torch", env="ENGINE",
                      choices=("auto", "torch", "mlx"))
    dtype: str = opt("auto", "compute dtype of the frozen base: auto (bf16 where the hardware "
                     "has it), bfloat16, float16 or float32", env="DTYPE",
                     choices=("auto", "bfloat16", "float16", "float32"))
    force: bool = opt(False, "train even if the output folder holds a run of another model",
                      env="FORCE")
    devices: int = opt(1, "training processes: N GPUs (or N CPU processes, gloo) launched with "
                       "torchrun; BATCH_SIZE stays the examples per optimizer step", env="DEVICES")
    nnodes: int = opt(1, "machines taking part (torchrun --nnodes): run the same command on each, "
                      "with its NODE_RANK and the same MASTER_ADDR / MASTER_PORT; DEVICES workers "
                      "on each", env="NNODES")
    node_rank: int = opt(0, "this machine's number among the NNODES (0 = the one at MASTER_ADDR, "
                         "which writes the files)", env="NODE_RANK")
    master_addr: str | None = opt(None, "with NNODES > 1: the address of machine 0, reachable "
                                  "from every machine", env="MASTER_ADDR")
    master_port: int = opt(29500, "with NNODES > 1: a free TCP port on machine 0", env="MASTER_PORT")
    fsdp: bool = opt(False, "with DEVICES > 1: split the frozen base weights of every block across "
                     "the workers (FSDP), for a model that does not fit on one device; the LoRA "
                     "weights stay whole on each", env="FSDP")
    quantize_base: int | None = opt(None, "QLoRA: train on a 4- or 8-bit copy of the frozen base "
                                    "(MLX: mlx-lm's quantized layers; CUDA: bitsandbytes), about "
                                    "1/4 or 1/2 of its memory; fuse merges into the original "
                                    "full-precision weights", env="QUANTIZE_BASE", choices=(4, 8))
    grad_checkpoint: bool = opt(False, "MLX engine: recompute each adapted block's activations "
                                "in the backward pass (less memory for long examples, slower)",
                                env="GRAD_CHECKPOINT")
    report_to: str | None = opt(None, "also log the metrics to tensorboard or wandb (their own "
                                "packages)", env="REPORT_TO", choices=("tensorboard", "wandb"))
    export_check: bool = opt(True, "before the model loads, check that EXPORTER can export it to "
                             "GGUF (--no-export-check: train anyway)", env="EXPORT_CHECK")

    def __post_init__(self):
        _check(self.iters is None or self.iters > 0, f"ITERS must be positive, got {self.iters}")
        _check(self.devices >= 1, f"DEVICES must be at least 1, got {self.devices}")
        _check(self.nnodes >= 1, f"NNODES must be at least 1, got {self.nnodes}")
        _check(0 <= self.node_rank < self.nnodes, f"NODE_RANK={self.node_rank} is not one of the "
               f"NNODES={self.nnodes} machines", f"use NODE_RANK=0 to {self.nnodes - 1}")
        _check(self.nnodes == 1 or self.master_addr, f"NNODES={self.nnodes} needs MASTER_ADDR, the "
               "address of machine 0", "add MASTER_ADDR=<machine 0's address> (and MASTER_PORT=)")
        _check(self.workers == 1 or self.engine != "mlx", "the MLX engine trains on one device",
               "drop DEVICES and NNODES, or use ENGINE=torch")
        _check(not self.fsdp or self.workers > 1, "FSDP splits the model across several workers",
               "add DEVICES=2 (or more), or drop FSDP")
        _check(self.batch_size is None or self.batch_size >= self.workers,
               f"BATCH_SIZE={self.batch_size} is smaller than DEVICES={self.devices}"
               + (f" x NNODES={self.nnodes}" if self.nnodes > 1 else "") + ": some workers "
               "would get no example", f"set BATCH_SIZE to at least {self.workers}")
        _check(self.quantize_base in (None, 4, 8), f"QUANTIZE_BASE must be 4 or 8, got {self.quantize_base}")
        _check(not (self.quantize_base and self.fsdp), "QUANTIZE_BASE and FSDP both shrink the base's "
               "memory, and do not combine here", "drop one of them")
        _check(self.batch_size is None or self.batch_size > 0,
               f"BATCH_SIZE must be positive, got {self.batch_size}")
        _check(self.num_layers is None or self.num_layers == -1 or self.num_layers > 0,
               f"NUM_LAYERS must be positive or -1 (all), got {self.num_layers}")
        _check(self.lr is None or self.lr > 0, f"LR must be positive, got {self.lr}")
        _check(self.rank is None or self.rank > 0, f"RANK must be positive, got {self.rank}")
        _check(self.scale is None or self.scale > 0, f"SCALE must be positive, got {self.scale}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.max_seq_length >= 16, f"max_seq_length must be at least 16, got {self.max_seq_length}")
        _check(self.early_stop is None or self.early_stop > 0,
               f"EARLY_STOP must be a positive number of evaluations, got {self.early_stop}")
        for name in ("steps_per_report", "steps_per_eval", "save_every"):
            _check(getattr(self, name) > 0, f"{name} must be positive")
        _check(not (self.resume and self.resume_from),
               "--resume continues an interrupted run; RESUME_FROM starts a new run from an "
               "adapter: give one of them")
        if self.alpha is not None:
            _check(self.alpha > 0, f"alpha must be positive, got {self.alpha}")
            if self.rank is not None:
                self.scale = self.alpha / self.rank
        if self.report_to:
            import importlib.util  # noqa: PLC0415

            package = {"tensorboard": "tensorboard", "wandb": "wandb"}[self.report_to]
            _check(importlib.util.find_spec(package) is not None,
                   f"--report-to {self.report_to} needs the {package} package",
                   f"pip install {package}")
        if self.engine == "mlx":
            from .train.engines import require_mlx  # noqa: PLC0415 - finds mlx, never imports it

            require_mlx("ENGINE=mlx")
            _check(self.device in ("auto", "cpu"), f"DEVICE={self.device} is a torch device; the MLX "
                   "engine runs on Apple's GPU (auto) or the CPU", "leave DEVICE unset, or use ENGINE=torch")

    @property
    def workers(self) -> int:
        """Training processes in all: DEVICES on each of the NNODES machines."""
        return self.devices * self.nnodes

    @property
    def lora_alpha(self) -> float:
        return self.scale * self.rank


@dataclass
class AdapterChoice(ModelOptions):
    """Which of the trained adapters the later stages take: the best or the last."""

    use_last: bool = opt(False, "use the adapter of the last iteration instead of the one of the "
                         "lowest validation loss (adapters/best)", env="USE_LAST")

    @property
    def run_dir(self) -> Path:
        """The adapter folder whose run record the later stages read: mlx-lm's (the seed's)
        through its converted PEFT copy."""
        from .train import mlxadapter  # noqa: PLC0415

        return mlxadapter.peft_folder(self.adapter_dir, self.model) or self.adapter_dir

    @property
    def chosen_adapter(self) -> Path:
        """adapters/best when training kept one, unless --use-last; else adapters/."""
        from .train import mlxadapter  # noqa: PLC0415

        seed = mlxadapter.peft_folder(self.adapter_dir, self.model)  # mlx-lm's, converted
        if seed is not None:
            return seed
        best = self.adapter_dir / BEST_DIR
        return self.adapter_dir if self.use_last or not (best / ADAPTER_FILE).is_file() else best


@dataclass
class FuseOptions(AdapterChoice):
    dtype: str = opt("auto", "dtype of the fused weights, merged in float32 either way: auto (the "
                     "base model's, bf16 for most: half the disk of float32), float32, bfloat16 "
                     "or float16", env="FUSE_DTYPE", choices=("auto", "float32", "bfloat16", "float16"))


@dataclass
class TestOptions(AdapterChoice):
    __test__ = False  # not a pytest test class
    prompt: str | None = opt(None, "one prompt instead of the default ones", env="PROMPT")
    num_prompts: int = opt(3, "how many default prompts (held-out questions of the data, "
                           "else its validation prompts); -1 = all", env="NUM_PROMPTS")
    max_tokens: int = opt(200, "maximum tokens per answer", env="MAX_TOKENS")
    data_dir: str | None = opt(None, "where the default prompts come from (default: the run's data)",
                               env="DATA_DIR")
    base: bool = opt(True, "also answer with the base model, for comparison")
    adapter: bool = opt(False, "run base + adapter in torch instead of the converted GGUF")
    gguf: str | None = opt(None, "GGUF file to test (default: the quantized GGUF of `convert`)",
                           env="GGUF")


# QUANTIZE=auto: the first of these, smallest first, whose fidelity stays within AUTO_TOLERANCE
# of the f16 file (agreement points lost, KL added, held-out answers lost; gguf/fidelity.py).
# The agreement points are also where the fidelity check warns: a chosen file is never flagged.
# A KL of 0.05 is about what llama.cpp's own Q4_K_M measures on 8B models, where 5-7 % of the
# top tokens differ. Held-out answers: none may be lost (what the user taught is the point; on
# the demo's fine-tune Q4_K_M kept 98.5 % and KL 0.015 yet answered 14/16 where f16 answered 15).
AUTO_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
AUTO_TOLERANCE = {"agreement": 5.0, "kl": 0.05, "answers": 0}


@dataclass
class FidelityKnobs:
    """How much the fidelity check of `convert` and `fidelity` reads (its cost is bounded)."""

    fidelity_conversations: int = opt(32, "validation conversations the GGUF is checked on "
                                      "(teacher-forced, assistant tokens only)")
    fidelity_tokens: int = opt(1024, "assistant tokens checked at most, over all conversations")
    fidelity_questions: bool = opt(True, "also answer the data's held-out questions "
                                   "(questions.jsonl) with each GGUF, greedy")
    fidelity_answer_tokens: int = opt(60, "maximum tokens per held-out answer")

    def _check_knobs(self):
        _check(self.fidelity_conversations > 0 and self.fidelity_tokens > 0
               and self.fidelity_answer_tokens > 0, "the fidelity check's counts must be positive")


@dataclass
class ConvertOptions(FidelityKnobs, FuseOptions, ExporterOptions):
    quantize: str = opt("auto", "llama.cpp quantization of the final GGUF: auto (the smallest of "
                        + ", ".join(AUTO_TYPES) + " as faithful as f16 within the tolerance, "
                        "checked by the fidelity check) or one of " + ", ".join(QUANT_TYPES)
                        + " (used as given)", env="QUANTIZE")
    outtype: str = opt("f16", "type of the intermediate GGUF (kept next to the quantized one)",
                       env="OUTTYPE", choices=OUT_TYPES)
    fidelity: bool = opt(True, "check every GGUF written against the fused model "
                         "(output/gguf/fidelity.json); QUANTIZE=auto needs it", env="FIDELITY")

    @property
    def gguf_dir(self) -> Path:
        return Path(self.output_dir) / "gguf"

    def __post_init__(self):
        self.quantize = self.quantize.upper()
        _check(self.quantize in (*QUANT_TYPES, "AUTO"), f"unknown quantization type {self.quantize!r}",
               "use auto or one of: " + ", ".join(QUANT_TYPES))
        _check(self.fidelity or self.quantize != "AUTO", "QUANTIZE=auto chooses the type from the "
               "fidelity check, which FIDELITY=0 / --no-fidelity turns off",
               "give a type (QUANTIZE=Q5_K_M), or keep the check on")
        self._check_knobs()


@dataclass
class FidelityOptions(FidelityKnobs, ModelOptions):
    gguf: list[str] | None = opt(None, "GGUF files to check (default: those `convert` wrote in "
                                 "OUTPUT_DIR/gguf)", positional=True)
    data_dir: str | None = opt(None, "where the validation conversations and questions.jsonl come "
                               "from (default: the run's data)", env="DATA_DIR")

    def __post_init__(self):
        self._check_knobs()


@dataclass
class ExportOptions(ExporterOptions):
    hf_dir: str = opt(None, "Hugging Face model folder (config.json + safetensors)",
                      positional=True, required=True)
    out: str = opt(None, "GGUF file to write", positional=True, required=True)
    outtype: str = opt("f16", "tensor type of the GGUF", env="OUTTYPE", choices=OUT_TYPES)


@dataclass
class QuantizeOptions:
    input: str = opt(None, "GGUF file in f32, f16 or bf16", positional=True, required=True)
    output: str = opt(None, "quantized GGUF file to write", positional=True, required=True)
    type: str = opt(DEFAULT_QUANT, "llama.cpp quantization type: " + ", ".join(QUANT_TYPES),
                    env="QUANTIZE")


@dataclass
class ExportAdapterOptions:
    adapter_dir: str = opt("output/adapters", "trained adapter folder", positional=True)
    out: str = opt(None, "GGUF adapter file to write (default: output/gguf/<model>-adapter.gguf)",
                   positional=True)
    model: str | None = opt(None, "base model (default: the adapter's own)", env="MODEL")
    trust_remote_code: bool = opt(False, "allow models whose code lives in their own repo")


@dataclass
class DataOptions:
    """What every `donkeytune data` command reads."""

    path: str = opt("data", "dataset folder (train + valid .jsonl/.json) or one file",
                    env="DATA_DIR", positional=True)
    format: str | None = opt(None, "read every record as this format instead of detecting it: "
                             + ", ".join(FORMATS), choices=FORMATS)


@dataclass
class DataTokenOptions(DataOptions):
    model: str = opt("smollm2-135m", "model whose tokenizer counts tokens (the tokenizer only "
                     "is loaded)", env="MODEL")
    tokenizer: bool = opt(True, "count tokens with the model's tokenizer (--no-tokenizer: skip)")
    max_seq_length: int = opt(TrainOptions.max_seq_length, "examples longer than this many tokens "
                              "are truncated in training", env="MAX_SEQ_LENGTH")
    trust_remote_code: bool = opt(False, "allow tokenizers whose code lives in their own repo")
    json: bool = opt(False, "print the result as JSON, for machines")


@dataclass
class DataCheckOptions(DataTokenOptions):
    min_answer_chars: int = opt(3, "assistant answers shorter than this many characters are "
                                "reported as very short")


@dataclass
class DataStatsOptions(DataTokenOptions):
    iters: int = opt(SEED_RECIPE["iters"], "optimizer steps the training will run", env="ITERS")
    batch_size: int = opt(SEED_RECIPE["batch_size"], "examples per optimizer step", env="BATCH_SIZE")

    def __post_init__(self):
        _check(self.iters > 0 and self.batch_size > 0, "ITERS and BATCH_SIZE must be positive")


@dataclass
class DataWriteOptions(DataOptions):
    out: str = opt("data", "folder to write train.jsonl and valid.jsonl into (a converted file "
                   "keeps its name, as .jsonl)", env="DATA_DIR")
    force: bool = opt(False, "overwrite data files that are already there", env="FORCE")


@dataclass
class DataSplitOptions(DataWriteOptions):
    valid_fraction: float = opt(0.2, "share of the examples that go to valid.jsonl")
    seed: int = opt(0, "random seed of the split", env="SEED")

    def __post_init__(self):
        _check(0 < self.valid_fraction < 1,
               f"valid_fraction must be between 0 and 1, got {self.valid_fraction}", "use 0.2 for 80/20")


@dataclass
class DataMergeOptions:
    inputs: list[str] | None = opt(None, "dataset folders to merge, in order", env="INPUTS",
                                   positional=True)
    out: str = opt("data", "folder for the merged train.jsonl, valid.jsonl and provenance.json",
                   env="DATA_DIR")
    format: str | None = opt(None, "read every record as this format instead of detecting it: "
                             + ", ".join(FORMATS), choices=FORMATS)
    force: bool = opt(False, "overwrite data files that are already there (not from a merge)",
                      env="FORCE")

    def __post_init__(self):
        _check(bool(self.inputs), "no dataset folders to merge",
               'give them: donkeytune data merge DIR1 DIR2, or make merge-data INPUTS="DIR1 DIR2"')


@dataclass
class RunGGUFOptions:
    """What `chat` and `serve` run: a GGUF, by default the quantized one of `convert`."""

    gguf: str | None = opt(None, "GGUF file (default: the quantized GGUF of `convert` in "
                           "OUTPUT_DIR/gguf)", env="GGUF")
    output_dir: str = opt("output", "folder whose gguf/ holds the converted model", env="OUTPUT_DIR")
    system: str | None = opt(None, "system prompt (default: the training data's; \"\" for none)",
                             env="SYSTEM")
    n_ctx: int = opt(2048, "context window in tokens", env="N_CTX")

    def __post_init__(self):
        _check(self.n_ctx >= 64, f"n_ctx must be at least 64, got {self.n_ctx}")


@dataclass
class ChatOptions(RunGGUFOptions):
    max_tokens: int = opt(512, "maximum tokens per answer", env="MAX_TOKENS")
    temperature: float = opt(0.7, "sampling temperature (0 = always the most likely token)",
                             env="TEMPERATURE")

    def __post_init__(self):
        super().__post_init__()
        _check(self.max_tokens > 0, f"MAX_TOKENS must be positive, got {self.max_tokens}")
        _check(self.temperature >= 0, f"temperature must not be negative, got {self.temperature}")


@dataclass
class ServeOptions(RunGGUFOptions):
    host: str = opt("127.0.0.1", "address to listen on (only this machine by default)", env="HOST")
    port: int = opt(8000, "TCP port", env="PORT")

    def __post_init__(self):
        super().__post_init__()
        _check(0 < self.port < 65536, f"port must be between 1 and 65535, got {self.port}")


@dataclass
class UiOptions:
    """`donkeytune ui`: the local web page for the whole job."""

    output_dir: str = opt("output", "the run's folder: uploaded data go to its data/, the "
                          "stages write adapters/, fused/, gguf/ and report/ there", env="OUTPUT_DIR")
    model: str | None = opt(None, "model chosen on the page at the start (default: smollm2-135m)",
                            env="MODEL")
    host: str = opt("127.0.0.1", "address to listen on (only this machine by default; the page "
                    "has no login)", env="HOST")
    port: int = opt(7860, "TCP port", env="PORT")
    browser: bool = opt(True, "open the page in a web browser (--no-browser: only print its address)")

    def __post_init__(self):
        _check(0 < self.port < 65536, f"port must be between 1 and 65535, got {self.port}")


ALL_OPTIONS = (TrainOptions, FuseOptions, TestOptions, ConvertOptions, FidelityOptions, ExportOptions,
               QuantizeOptions, ExportAdapterOptions, DataCheckOptions, DataStatsOptions,
               DataSplitOptions, DataWriteOptions, DataMergeOptions, ChatOptions, ServeOptions,
               UiOptions)
