"""The command table: each command resolves its options and calls one stage function."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings

from . import __version__, config, device
from .errors import DonkeyError
from .progress import honour_sigint


def _stage(module: str, function: str = "run"):
    """The stage function `module.function`, imported when the command runs: stages import
    torch or llama.cpp, which `--help` should not wait for."""

    def run(opts):
        import importlib  # noqa: PLC0415

        fn = getattr(importlib.import_module(f".{module}", __package__), function)
        return fn(opts) if opts is not None else fn()

    return run


def _data(name: str):
    return _stage("data.tools", name)


# `donkeytune data NAME`: check and stats return the exit status (1 = warnings, 2 = errors)
DATA_COMMANDS = {
    "check": (config.DataCheckOptions, _data("check"),
              "list every problem of a dataset folder or file, with file:line and a fix"),
    "stats": (config.DataStatsOptions, _data("stats"),
              "examples, tokens per example, and the epochs ITERS x BATCH_SIZE gives"),
    "split": (config.DataSplitOptions, _data("split"),
              "split a file (or a folder's examples) into train.jsonl and valid.jsonl, seeded"),
    "merge": (config.DataMergeOptions, _data("merge"),
              "merge dataset folders: no duplicates, nothing in both train and valid"),
    "convert": (config.DataWriteOptions, _data("convert"),
                "write any supported format (ShareGPT, Alpaca, ...) as chat JSONL"),
}

# name -> (options class, stage function, help); a table instead of a function is a group
COMMANDS = {
    "train": (config.TrainOptions, _stage("train"), "fine-tune a LoRA adapter on DATA_DIR"),
    "fuse": (config.FuseOptions, _stage("fuse"),
             "merge the adapter into the base weights (output/fused)"),
    "test": (config.TestOptions, _stage("use.test"),
             "answer prompts with the base and the fine-tuned model"),
    "convert": (config.ConvertOptions, _stage("gguf.convert"),
                "fuse + export to GGUF + quantize with llama.cpp (QUANTIZE=auto: the smallest "
                "type as faithful as f16) + fidelity check (output/gguf)"),
    "fidelity": (config.FidelityOptions, _stage("gguf.fidelity"),
                 "check GGUF files against the fused model: next-token agreement, KL, held-out "
                 "answers (output/gguf/fidelity.json)"),
    "export": (config.ExportOptions, _stage("gguf.exporters"),
               "any supported HF model folder -> GGUF"),
    "quantize": (config.QuantizeOptions, _stage("gguf.quantize"),
                 "GGUF (f32/f16/bf16) -> quantized GGUF"),
    "export-adapter": (config.ExportAdapterOptions, _stage("gguf.adapter"),
                       "the LoRA adapter as a GGUF adapter (llama.cpp --lora, Ollama ADAPTER)"),
    "chat": (config.ChatOptions, _stage("use.chat"),
             "chat with the GGUF in the terminal (streaming, /reset, /exit)"),
    "serve": (config.ServeOptions, _stage("use.serve"),
              "OpenAI-compatible HTTP server for the GGUF (/v1/models, /v1/chat/completions)"),
    "ui": (config.UiOptions, _stage("ui"),
           "a local web page for the whole job: data, live training, side-by-side chat, GGUF"),
    "summary": (config.ModelOptions, _stage("use.summary"),
                "what the last run produced and how to use it"),
    "models": (None, _stage("models.table"),
               "list the built-in and tested models, and which fit here"),
    "doctor": (None, _stage("doctor"),
               "versions, compute device, memory, disk, and the largest model that fits"),
    "data": (None, DATA_COMMANDS, "check, inspect, split, merge and convert datasets"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="donkeytune",
        description="Fine-tune a small open LLM with LoRA and get back a quantized GGUF.",
        epilog="Options also come from a YAML file (--config) and from DONKEYTUNE_<NAME> "
               "environment variables (the Makefile sets them from MODEL=, ITERS=, ...). "
               "Precedence: flags > environment > YAML > defaults.")
    parser.add_argument("--version", action="version", version=f"donkeytune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if isinstance(fn, dict):  # a group: `donkeytune data check DIR`
            group = p.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
            for sub_name, (sub_cls, _fn, sub_help) in fn.items():
                add_options(group.add_parser(sub_name, help=sub_help, description=sub_help), sub_cls)
        elif cls is not None:
            add_options(p, cls)
    return parser


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help=f"{config.CONFIG_OPTION['help']} [{config.CONFIG_OPTION['env']}]")
    types_ = config.field_types(cls)
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, types_[f.name]
        env = f" [{meta['env']}]" if meta.get("env") else ""
        default = "" if f.default is None else f" (default: {f.default})"
        help_ = f"{meta['help']}{default}{env}"
        if meta.get("positional") and typing.get_origin(tp) is list:  # several: merge DIR1 DIR2
            parser.add_argument(f.name, type=str, help=help_, nargs="*", default=argparse.SUPPRESS)
            continue
        if meta.get("positional"):
            parser.add_argument(f.name, type=tp, help=help_, nargs=None if meta["required"] else "?")
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, type=tp, default=None, choices=meta.get("choices"),
                                metavar=f.name.upper(), help=help_)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    honour_sigint()
    device.bound_kernel_caches()
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if not command:
        parser.print_help()
        return 0
    cls, fn, _help = COMMANDS[command]
    if isinstance(fn, dict):
        cls, fn, _help = fn[args.pop("subcommand")]
    try:
        opts = config.resolve(cls, args, config_file=args.pop("config", None)) if cls else None
        result = fn(opts)
        if isinstance(result, int):  # a status of its own: data check (1 = warnings)
            return result
    except DonkeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
