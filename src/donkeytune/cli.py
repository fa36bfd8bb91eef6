"""The command table: each command resolves its options and calls one stage function."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from . import __version__, config
from .errors import DonkeyError


def _train(opts):
    from . import train  # noqa: PLC0415 - stages import torch: load them only when run

    return train.run(opts)


def _fuse(opts):
    from . import fuse  # noqa: PLC0415

    return fuse.run(opts)


def _test(opts):
    from . import infer  # noqa: PLC0415

    return infer.run(opts)


def _models(_opts):
    from . import report  # noqa: PLC0415

    report.print_models()


# name -> (options class, stage function, help)
COMMANDS = {
    "train": (config.TrainOptions, _train, "fine-tune a LoRA adapter on DATA_DIR"),
    "fuse": (config.FuseOptions, _fuse, "merge the adapter into the base weights (output/fused)"),
    "test": (config.TestOptions, _test, "answer prompts with the base and the fine-tuned model"),
    "models": (None, _models, "list the built-in and tested models"),
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
    for name, (cls, _fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if cls is not None:
            add_options(p, cls)
    return parser


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", metavar="YAML", help="read options from this YAML file")
    types_ = config.field_types(cls)
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, types_[f.name]
        env = f" [{meta['env']}]" if meta.get("env") else ""
        help_ = f"{meta['help']} (default: {f.default}){env}"
        if meta.get("positional"):
            parser.add_argument(f.name, type=tp, help=help_, nargs="?" if f.default is not None else None)
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, type=tp, default=None, choices=meta.get("choices"),
                                metavar=f.name.upper(), help=help_)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if not command:
        parser.print_help()
        return 0
    cls, fn, _help = COMMANDS[command]
    try:
        opts = config.resolve(cls, args, config_file=args.pop("config", None)) if cls else None
        fn(opts)
    except DonkeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
