"""``controlset weights``: list and fetch the neural annotators' model files."""

from __future__ import annotations

import argparse
import json
import sys

from schemas.errors import UsageError


def _list(args: argparse.Namespace, extra: list[str]) -> int:
    from annotators import weights as W

    rows = W.status(args.weights)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    where = (
        f"folder {args.weights}" if args.weights else f"Hugging Face cache {W.hf_cache_dir()} ({W.REPO_ID})"
    )
    print(f"searching: {where}")
    width = max(len(r["file"]) for r in rows)
    for r in rows:
        found = r["path"] or "MISSING"
        print(f"{r['annotator']:<9} {r['file']:<{width}}  {found}")
    missing = [r["file"] for r in rows if r["path"] is None]
    if missing:
        print(f"{len(missing)} missing; get them with: controlset weights fetch [NAMES] [--dest DIR]")
    return 0


def _fetch(args: argparse.Namespace, extra: list[str]) -> int:
    from annotators import weights as W

    got = W.fetch(args.names, dest=args.dest)
    for name, path in got.items():
        print(f"{name}  {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``controlset weights list|fetch``."""
    p = subparsers.add_parser(
        "weights",
        help="list or download the model files of the neural annotators",
        description="Model files of the neural annotators (lllyasviel/Annotators on the Hugging Face hub).",
    )
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION")

    ls = sub.add_parser("list", help="show each annotator's files and where they were found")
    ls.add_argument("--weights", metavar="DIR", default=None, help="look in this folder instead of the HF cache")
    ls.add_argument("--json", action="store_true", help="print JSON rows")
    ls.set_defaults(func=_list)

    fe = sub.add_parser("fetch", help="download files (needs network access to the hub)")
    fe.add_argument(
        "names", nargs="*", metavar="NAME",
        help="annotator names (hed, mlsd, openpose) or file names; default: all",
    )  # fmt: skip
    fe.add_argument("--dest", metavar="DIR", default=None, help="put the files in this folder (use as --weights)")
    fe.set_defaults(func=_fetch)

    def _usage(args: argparse.Namespace, extra: list[str]) -> int:
        p.print_help(sys.stderr)
        raise UsageError("choose an action: list or fetch")

    p.set_defaults(func=_usage)
