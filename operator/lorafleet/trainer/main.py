"""`python -m lorafleet.trainer --config FILE` (also `lorafleet train`): one training run, its final status in
config.statusFile, and a documented exit code (lorafleet.contracts.exits, docs/trainer.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from lorafleet.contracts.exits import CONFIG_INVALID, EXIT_FAILED, EXIT_OK, INTERRUPTED, TRAINING_FAILED
from lorafleet.contracts.trainer import TrainerConfig
from lorafleet.storage.scrub import install_log_filter, scrub
from lorafleet.trainer.errors import TrainerError
from lorafleet.trainer.progress import ProgressPublisher, ProgressReporter
from lorafleet.trainer.status import build_status, write_status

DEFAULT_STATUS_FILE = "/dev/termination-log"


def load_config(path: Path) -> TrainerConfig:
    """The config; fields it does not know (from a newer operator) are ignored, what it uses is validated."""
    try:
        return TrainerConfig.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise TrainerError(CONFIG_INVALID, f"config file {path} does not exist") from None
    except (OSError, ValueError) as e:  # ValidationError is a ValueError
        detail = _validation_text(e) if isinstance(e, ValidationError) else str(e)
        raise TrainerError(CONFIG_INVALID, f"config file {path}: {detail}") from e


def _validation_text(e: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5]]
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet train", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="trainer config (JSON, rendered by the operator)")
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="check the config, base model folder, tokenizer, hardware and the whole dataset, then exit (0 or 2)",
    )
    parser.add_argument("--status-file", help="final status file (default: the config's statusFile)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_filter()  # a store error may carry a credential value: no log line does
    ranks_world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    distributed = ranks_world > 1
    reporter = ProgressReporter(enabled=rank == 0)
    status_file: str = args.status_file or DEFAULT_STATUS_FILE
    progress: dict[str, object] = {}
    try:
        config = load_config(args.config)
        status_file = args.status_file or config.status_file
        if args.validate_only:
            from lorafleet.trainer.train import validate

            datasets = validate(config)
            reporter.event("valid", samples=len(datasets.train), evalSamples=len(datasets.eval) or None)
            return EXIT_OK

        from lorafleet.trainer.train import StopSignal, run

        stop = StopSignal()
        stop.install()
        if local_rank == 0:
            reporter.publisher = ProgressPublisher.from_environment()
        try:
            result = run(config, reporter=reporter, stop=stop)
        finally:
            stop.uninstall()
        progress = result.progress
        if rank == 0 or local_rank == 0:
            artifact = result.artifact.status() if result.artifact else None
            report = build_status(
                progress=progress,
                metrics=result.metrics,
                artifact=artifact,
                evaluation=result.evaluation,
                tokens_trained=result.tokens_trained,
            )
            write_status(status_file, report)
        reporter.event("done", trainLoss=result.metrics.get("trainLoss"), evalLoss=result.metrics.get("evalLoss"))
        return EXIT_OK
    except TrainerError as e:
        progress = progress or (
            reporter.last and {k: v for k, v in reporter.last.items() if k not in ("tokensPerSecond", "version")}
        )
        write_status(status_file, build_status(progress=progress, error=(e.reason, e.message)), keep_error=distributed)
        level = "warning" if e.reason == INTERRUPTED else "error"
        ProgressReporter(enabled=True).event("error", level=level, reason=e.reason, message=e.message, rank=rank)
        return e.exit_code
    except Exception as e:
        print(scrub(traceback.format_exc()), file=sys.stderr, end="")
        message = scrub(f"{type(e).__name__}: {e}")
        failed = build_status(progress=progress, error=(TRAINING_FAILED, message))
        write_status(status_file, failed, keep_error=distributed)
        ProgressReporter(enabled=True).event("error", level="error", reason=TRAINING_FAILED, message=message, rank=rank)
        return EXIT_FAILED
    finally:
        reporter.close()


if __name__ == "__main__":
    sys.exit(main())
