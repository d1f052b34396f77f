"""`cudacnn <command>`: each area of the package adds its own subcommands (see COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cudacnn import __version__
from cudacnn.errors import CudacnnError

# Each module has add_commands(subparsers); a subcommand sets `func(args) -> int`.
COMMAND_MODULES = [
    "cudacnn.data.commands",
    "cudacnn.models.commands",
    "cudacnn.train.commands",
    "cudacnn.evaluate.commands",
    "cudacnn.bench.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cudacnn", description="GPU-accelerated CNN training for CIFAR-10.")
    parser.add_argument("--version", action="version", version=f"cudacnn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an area not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CudacnnError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the commands did not foresee (permissions, a file where a folder goes)
        if args.verbose or exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror}; check that path and its permissions", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
