"""The `matelike` command line: one console script with subcommands.

Each stage module contributes its own subcommands through `add_cli(table)`, so the flags of a stage
live next to the code that reads them. A module's command handler takes the parsed arguments and
returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

# Modules that contribute subcommands, in the order they appear in `matelike --help`.
MODULES: tuple[str, ...] = (
    "matelike.data.check",
    "matelike.data.pack",
    "matelike.data.demo",
    "matelike.eval",
    "matelike.tokenizer",
    "matelike.pretrain",
    "matelike.sft",
    "matelike.dpo",
    "matelike.dpo.make_pairs",
    "matelike.reward.train",
    "matelike.rl",
    "matelike.chat",
    "matelike.serve",
    "matelike.bench.tokenize",
    "matelike.bench.pack",
    "matelike.bench.sft_data",
    "matelike.bench.serve",
    "matelike.bench.train",
    "matelike.bench.rl",
    "matelike.generate",
    "matelike.model.info",
    "matelike.export.gguf",
    "matelike.bench.generate",
    "matelike.run",
    "matelike.report",
)


class CommandTable:
    """Registry handed to each module's `add_cli`: top-level commands and commands inside groups."""

    def __init__(self, root: argparse.ArgumentParser) -> None:
        self._sub = root.add_subparsers(dest="command", metavar="COMMAND")
        self._sub.required = True
        self._groups: dict[str, argparse._SubParsersAction] = {}
        self._group_parsers: dict[str, argparse.ArgumentParser] = {}

    def command(self, name: str, help: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        """Add `matelike NAME`; returns its parser for the module to add flags to."""
        parser = self._sub.add_parser(name, help=help, description=help)
        parser.set_defaults(handler=handler)
        return parser

    def group_command(
        self, group: str, name: str, help: str, handler: Callable[[argparse.Namespace], int], group_help: str = ""
    ) -> argparse.ArgumentParser:
        """Add `matelike GROUP NAME` (for instance `matelike data check`)."""
        if group not in self._groups:
            gp = self._sub.add_parser(group, help=group_help or f"{group} commands", description=group_help or None)
            self._group_parsers[group] = gp
            sub = gp.add_subparsers(dest=f"{group}_command", metavar="COMMAND")
            sub.required = True
            self._groups[group] = sub
        parser = self._groups[group].add_parser(name, help=help, description=help)
        parser.set_defaults(handler=handler)
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matelike",
        description="Train a small Chinese chat model from zero: data, tokenizer, pretrain, SFT, DPO, chat, serve.",
    )
    from matelike import __version__

    parser.add_argument("--version", action="version", version=f"matelike {__version__}")
    table = CommandTable(parser)
    for name in MODULES:
        importlib.import_module(name).add_cli(table)
    return parser


def _rewrite(argv: list[str]) -> list[str]:
    # `matelike dpo make-pairs ...` and `matelike dpo --init ...` share the word `dpo`; argparse cannot have
    # a command that is both a group and a leaf, so the pair-making subcommand gets its own internal name.
    if len(argv) >= 2 and argv[0] == "dpo" and argv[1] == "make-pairs":
        return ["dpo-make-pairs", *argv[2:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _rewrite(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_model_dir_error(e):
            raise
        # One place for every command that reads a model directory: a damaged one is the user's input, not a
        # bug, so it gets one line naming the file instead of a traceback.
        print(f"matelike {_command_name(args)}: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    finally:
        _end_process_group()


def _is_model_dir_error(e: BaseException) -> bool:
    """Whether `e` is matelike.model.io.ModelDirError, without importing that module (and torch with it):
    if it raised one, it is already imported."""
    io = sys.modules.get("matelike.model.io")
    return io is not None and isinstance(e, io.ModelDirError)


def _command_name(args: argparse.Namespace) -> str:
    """The command as typed: `sft`, `data check`, `dpo make-pairs`."""
    name = str(args.command)
    if name == "dpo-make-pairs":
        return "dpo make-pairs"
    sub = getattr(args, f"{name}_command", None)
    return f"{name} {sub}" if sub else name


def _end_process_group() -> None:
    """Destroy the torchrun process group a training command started, now that its model is out of scope."""
    if "torch.distributed" in sys.modules:  # never import torch for a command that did not
        from matelike.train.distributed import teardown

        teardown()
