"""`course-transformer analyze SUBCOMMAND ...`: attention research on our models and on Hugging Face models.

Each subcommand lives in its own module (`SUBCOMMANDS` below) with its own `main(argv)` and `--help`; every one
writes JSON + Markdown (+ PNG where a figure helps) into its output folder.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "flow": (
        "course_transformer.commands.analyze_flow",
        "attention rollout and flow, norm-based attention (Abnar & Zuidema 2020; Kobayashi et al. 2020)",
    ),
    "heads": ("course_transformer.commands.analyze_heads", "head importance, single-head ablation, pruning curve"),
    "sinks": (
        "course_transformer.commands.analyze_streaming",
        "attention sinks, entropy, distance per layer/head on a long text, streamed (Xiao et al. 2023)",
    ),
}


def _usage() -> str:
    lines = [f"  {name:<14} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "usage: course-transformer analyze SUBCOMMAND [ARGS ...]\n\nsubcommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"analyze: unknown subcommand {name!r}; allowed: {', '.join(SUBCOMMANDS) or '(none yet)'}", file=sys.stderr
        )
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
