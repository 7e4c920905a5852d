"""The `lorafleet` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Command = Callable[[argparse.Namespace], int]


def _crds(args: argparse.Namespace) -> int:
    """The CRDs generated from lorafleet.api: printed as one YAML stream (for `kubectl apply -f -`), or written into
    each --out folder. The repository's copies (crds/, the chart's, deploy/'s) are maintained by hack/generate."""
    from lorafleet.api.kinds import crd_files, write_crds

    if not args.out:
        sys.stdout.write("---\n".join(crd_files().values()))
        return 0
    for folder in args.out:
        for path in write_crds(folder):
            print(path)
    return 0


def _operator(args: argparse.Namespace) -> int:
    from lorafleet.controllers.runtime import run

    return run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="print the CRDs generated from lorafleet.api (or write them with --out)")
    crds.add_argument("--out", type=Path, action="append", help="write one file per CRD into this folder, repeatable")
    crds.set_defaults(func=_crds)

    op = sub.add_parser("operator", help="run the operator (settings from LORAFLEET_* variables)")
    op.set_defaults(func=_operator)

    from lorafleet.storage.cli import register as register_artifacts

    register_artifacts(sub)

    from lorafleet.models_cli import register as register_models

    register_models(sub)

    from lorafleet.trainer.check import register as register_dataset

    register_dataset(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
