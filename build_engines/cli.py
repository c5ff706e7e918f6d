"""`mgm-build`: one CLI for every build step.

    mgm-build vision --model_dir CKPT --output_dir ENGINES/vision [--backend tensorrt|tensorrt_rtx|onnxruntime]
    mgm-build llm    --model_dir CKPT --output_dir ENGINES/llm [--qformat fp8] [--tp_size 2] [--build]
    mgm-build repo   --model_dir CKPT --engine_dir ENGINES --output_dir REPO --backend cpu|gpu

Errors in the input exit with status 2 and one line on stderr; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from mgm_ref.errors import run_cli

# Subcommands come from this entry-point group, each a `register(subparsers)` that adds one subparser
# with `set_defaults(run=...)`. The packages that own them register themselves (pyproject.toml), so
# this module imports none of them: `mgm-build repo` lives in triton_models, which build_engines must
# not import.
COMMAND_GROUP = "mgm_build.commands"
Register = Callable[[argparse._SubParsersAction], None]


def registered_commands() -> dict[str, Register]:
    """name -> register function of every installed `mgm-build` subcommand."""
    return {ep.name: ep.load() for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)}


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show the traceback of an input error too"
    )


def build_parser(commands: dict[str, Register]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser, and the subcommand names the register functions added."""
    parser = argparse.ArgumentParser(
        prog="mgm-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in commands.values():
        register(sub)
    for subparser in sub.choices.values():
        _add_debug(subparser, argparse.SUPPRESS)  # `mgm-build vision ... --debug` works as well
    return parser, list(sub.choices)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    prog = f"mgm-build {args.command}" if getattr(args, "command", None) else parser.prog

    def body() -> int:
        args.run(args)  # its result is for library callers; the CLI reports through its log
        return 0

    return run_cli(prog, body, debug=args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    commands = registered_commands()
    if not commands:
        print(
            f"mgm-build: error: no subcommands are registered (entry-point group {COMMAND_GROUP}): "
            "install the package, e.g. `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    return _run(build_parser(commands)[0], argv)


def run_command(register: Register, argv: Sequence[str] | None = None) -> int:
    """`python -m build_engines.X ARGS` is `mgm-build X ARGS`, without importing X a second time."""
    parser, (name,) = build_parser({"": register})
    return _run(parser, [name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
