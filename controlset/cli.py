"""Entry point of the ``controlset`` command.

Each package contributes its own subcommands through a ``register(subparsers)``
function in its ``cli`` module; this file only assembles them, so the command
line stays a thin layer and the packages never import each other.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from controlset import __version__
from schemas.errors import UsageError

# Modules that contribute subcommands, each with ``register(subparsers)``.
_COMMAND_MODULES = (
    "pipelines.cli",
    "annotators.cli",
    "training.cli",
)


def _drop_import_noise(record: logging.LogRecord) -> bool:
    # Beam warns at import time about optional GCP client libraries that a
    # local run never uses.
    return "apitools not found" not in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlset",
        description="Build ControlNet training data with Apache Beam, and train ControlNets on it.",
    )
    parser.add_argument("--version", action="version", version=f"controlset {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that package has no command line yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Subcommands that pass options through (e.g. Beam pipeline options) set
    # `passthrough=True`; the rest reject unknown arguments as usual.
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_import_noise)
    if not args.verbose:
        # Beam and absl are chatty at INFO.
        for noisy in ("apache_beam", "absl", "urllib3", "httpx", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args, extra) or 0)
    except UsageError as exc:
        print(f"controlset {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
