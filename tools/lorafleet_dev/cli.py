"""`lorafleet-dev`: the developer's commands (the local cluster's demo); never shipped in the product."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print("usage: lorafleet-dev demo [--keep]\n\n  demo  fine-tune and serve a tiny model end to end locally")
        return 0 if args else 2
    if args[0] == "demo":
        from lorafleet_dev.demo import main as demo

        return demo(args[1:])
    print(f"lorafleet-dev: unknown command {args[0]!r} (commands: demo)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
