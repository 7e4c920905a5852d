"""lorafleet's adapter-sync sidecar and gateway (`lorafleet.serving.sync.serve`, unchanged) with adapters taken
from a local folder instead of the S3 store: the GPU machine reaches no store, and the benchmark measures the
gateway's forwarding and the sidecar's loading, not downloads (docs/benchmarks.md measures those with MinIO).

    python benchmarks/gpu/sidecar_local.py --source-dir SRC --desired adapters.json --engine http://127.0.0.1:8001 \
        --adapters-dir DIR --listen 127.0.0.1:8000

For each desired adapter, SRC/<name>/ is linked into DIR/<name>/<digest hex>/ (the folder the real sidecar pulls
into), its adapter_config.json goes through the same checks (`checks.check_adapter_config`), and the syncer loads
it into vLLM with /v1/load_lora_adapter, as in a pod.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import link_adapter


class LocalPrepare:
    def __init__(self, source_dir: Path) -> None:
        self.source_dir = source_dir

    def __call__(self, want: Any, desired: Any, adapters_dir: Path) -> Any:
        from lorafleet.serving.checks import Reason, Refusal, check_adapter_config, read_adapter_config
        from lorafleet.serving.syncer import Prepared

        src = self.source_dir / want.name
        if not src.is_dir():
            return Refusal(Reason.NOT_FOUND, f"adapter {want.name!r}: no folder {src}")
        digest = want.digest or "sha256:" + "0" * 64
        dest = adapters_dir / want.name / digest.removeprefix("sha256:")
        link_adapter(src, dest)
        config, refusal = read_adapter_config(want.name, dest)
        if refusal is None and config is not None:
            refusal = check_adapter_config(want.name, config, desired.max_lora_rank, desired.target_modules)
        return refusal if refusal is not None else Prepared(digest=digest, path=dest)


def main(argv: list[str] | None = None) -> int:
    from lorafleet.serving.sync import parse_args, serve

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--source-dir", type=Path, required=True)
    ours, rest = pre.parse_known_args(argv)
    args = parse_args(rest)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare = LocalPrepare(ours.source_dir)
    try:  # as the sidecar's own main does
        import uvloop

        uvloop.run(serve(args, prepare=prepare))
    except ImportError:
        asyncio.run(serve(args, prepare=prepare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
