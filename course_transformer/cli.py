"""`course-transformer`: one command line for the whole project, delegating each subcommand to its module.

    course-transformer --help
    course-transformer train --help
    course-transformer publish outputs/tiny-decoder --repo-id user/tiny-decoder --dry-run

Every subcommand imports its module by name only when it runs (so `--help` is fast and one missing part does not
break the others) and calls the module's `main(argv)` with the arguments after the subcommand name; the module's own
parser documents its options and defaults (`course-transformer COMMAND --help`). The modules are in the layers below
this one (`LAYERS_BELOW`), never in `scripts/` (not installed), and nothing here touches `sys.path`: an import by
name is invisible to the import contract, so tests/test_cli.py checks the table instead. An error is one line on
stderr; `--debug` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import NoReturn

PROG = "course-transformer"
# The packages a command module may live in: the layers below the CLI (commands -> evaluation -> core).
LAYERS_BELOW = ("course_transformer.commands", "evaluation", "course_transformer.core")


@dataclass(frozen=True)
class Command:
    help: str
    modules: tuple[str, ...]  # candidates, first found wins


COMMANDS: dict[str, Command] = {
    "prepare-data": Command("extract and split the training corpus", ("course_transformer.commands.prepare_data",)),
    "train-tokenizer": Command(
        "train the tokenizer on the prepared corpus", ("course_transformer.commands.train_tokenizer",)
    ),
    "train": Command("train a model from a preset and a training config", ("course_transformer.commands.train",)),
    "generate": Command("generate text with a trained model", ("course_transformer.commands.generate",)),
    "evaluate": Command(
        "evaluate a trained model (harness report JSON)", ("course_transformer.commands.evaluate_model",)
    ),
    "parity": Command("check agreement with BERT / GPT-2 (Hugging Face)", ("evaluation.parity",)),
    "visualize": Command("plot attention weights", ("course_transformer.commands.visualize_attention",)),
    "benchmark": Command("time forward, training and generation", ("course_transformer.commands.benchmark",)),
    "convert": Command(
        "convert between BERT / GPT-2 and the course Transformer", ("course_transformer.core.conversion",)
    ),
    "analyze": Command(
        "attention research: statistics, head importance and pruning, flow", ("course_transformer.commands.analyze",)
    ),
    "explore": Command("the attention explorer in the browser (gradio)", ("course_transformer.commands.explore",)),
    "publish": Command("validate and upload a trained model to the Hub", ("course_transformer.commands.publish",)),
}


class ModuleUnavailable(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<16} {cmd.help}  [{' | '.join(cmd.modules)}]" for name, cmd in COMMANDS.items()]
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [--debug] COMMAND [ARGS ...]",
        description="The course Transformer: data, tokenizer, training, generation, evaluation, parity, "
        "attention plots, benchmarks, conversion and publishing. Each COMMAND runs the module shown in brackets; "
        f"`{PROG} COMMAND --help` lists its options and their defaults.",
        epilog="commands:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging (default: off)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("course-transformer")
    except PackageNotFoundError:
        return "(not installed)"


def load_module(candidates: tuple[str, ...]):
    """The first importable module among `candidates`; `ModuleUnavailable` when none exists.

    An import error raised *inside* an existing module (a missing dependency, a bug) is not "unavailable": it
    propagates, so that it is reported as the error it is.
    """
    for name in candidates:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if name == missing or name.startswith(missing + "."):
                continue
            raise
    raise ModuleUnavailable(" or ".join(candidates))


def _split(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """Options before the command, the command, and everything after it (passed through untouched)."""
    for i, token in enumerate(argv):
        if not token.startswith("-"):
            return argv[:i], token, argv[i + 1 :]
    return argv, None, []


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text}" if not isinstance(error, (ValueError, RuntimeError, OSError)) else text


class _Refused(Exception):
    """A command that did not run to the end: the one line to print and the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _entry_point(command: str, debug: bool):
    """The `main(argv)` of the command's module."""
    spec = COMMANDS[command]
    try:
        module = load_module(spec.modules)
    except ModuleUnavailable as missing:
        raise _Refused(f"{command} is not available: module {missing} not found", 2) from None
    except Exception as error:
        if debug:
            raise
        raise _Refused(f"error importing {' or '.join(spec.modules)}: {_one_line(error)}", 1) from None
    entry = getattr(module, "main", None)
    if not callable(entry):
        raise _Refused(f"{command} is not available: module {module.__name__} has no main(argv)", 2)
    return entry


def _run(entry, argv: list[str], debug: bool) -> int:
    try:
        status = entry(argv)
    except KeyboardInterrupt:
        raise _Refused("interrupted", 130) from None
    except SystemExit:
        raise  # argparse's own exits (--help, usage errors) keep their status
    except Exception as error:
        if debug:
            raise
        raise _Refused(f"error: {_one_line(error)} (--debug shows the traceback)", 1) from None
    # modules return an exit status, or a result object (a dict of paths, a tokenizer) that means success
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    before, command, rest = _split([a for a in argv if a != "--debug"])
    build_parser().parse_args(before + ([command] if command else []))  # handles --help, --version, unknown commands
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run(_entry_point(command, debug), rest, debug)
    except _Refused as refused:
        print(f"{PROG} {command}: {refused}", file=sys.stderr)
        return refused.status


if __name__ == "__main__":
    sys.exit(main())
