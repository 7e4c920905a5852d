"""The `lorafleet` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Command = Callable[[argparse.Namespace], int]


def _crds(args: argparse.Namespace) -> int:
    from lorafleet.api.kinds import crd_files, write_crds

    folders: list[Path] = args.out or [Path("crds"), Path("charts/lorafleet/crds"), Path("deploy/crds")]
    if args.check:
        stale = [
            str(folder / name)
            for folder in folders
            for name, text in crd_files().items()
            if not (folder / name).exists() or (folder / name).read_text() != text
        ]
        if stale:
            print(f"stale CRDs: {', '.join(stale)}; run `lorafleet crds`", file=sys.stderr)
            return 1
        return 0
    for folder in folders:
        for path in write_crds(folder):
            print(path)
    return 0


def _operator(args: argparse.Namespace) -> int:
    from lorafleet.controllers.runtime import run

    return run()


def _demo(args: argparse.Namespace) -> int:
    from lorafleet.dev.demo import main as demo

    return demo(["--keep"] if args.keep else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="write the CRDs generated from lorafleet.api")
    crds.add_argument(
        "--out",
        type=Path,
        action="append",
        help="output folder, repeatable (default: crds, the Helm chart's charts/lorafleet/crds and deploy/crds)",
    )
    crds.add_argument("--check", action="store_true", help="exit 1 when the folder is stale")
    crds.set_defaults(func=_crds)

    op = sub.add_parser("operator", help="run the operator (settings from LORAFLEET_* variables)")
    op.set_defaults(func=_operator)

    from lorafleet.storage.cli import register as register_artifacts

    register_artifacts(sub)

    demo = sub.add_parser("demo", help="run the three kinds end to end on a local cluster")
    demo.add_argument("--keep", action="store_true", help="leave the local cluster running")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
