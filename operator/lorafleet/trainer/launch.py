"""`python -m lorafleet.trainer.launch [torchrun options] -m lorafleet.trainer --config FILE`: torchrun that keeps
the trainer's exit codes.

Plain torchrun exits 1 whenever a worker fails, and on SIGTERM, so a Job's podFailurePolicy cannot tell a bad
dataset (2: fail at once) from a crash (1: retry) or a preemption after a checkpoint (3). This wrapper runs
torchrun's own code (torch.distributed.run) and, when it fails, exits with the code the trainer documents: the
reason in the status file the workers wrote decides, else the workers' exit codes (2 before 3 before 1).
It also gives the workers time to checkpoint on SIGTERM: --shutdown-timeout (torchrun's default is 30 s) defaults
to LORAFLEET_SHUTDOWN_TIMEOUT or 100 s, below the pod's terminationGracePeriodSeconds (120). torchrun before
torch 2.13 has no such option (CUDA images often pin an older torch): there the default is left out and torchrun's
own 30 s applies.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lorafleet.trainer.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_OK, exit_code_for
from lorafleet.trainer.status import read_status

DEFAULT_SHUTDOWN_TIMEOUT = "100"


def _trainer_status_file(argv: Sequence[str]) -> str | None:
    """The status file the workers write: --status-file, else the config's statusFile."""
    args = list(argv)
    for flag in ("--status-file", "--config"):
        if flag in args and args.index(flag) + 1 < len(args):
            value = args[args.index(flag) + 1]
            if flag == "--status-file":
                return value
            try:
                import json

                with open(value) as f:
                    status_file = json.load(f).get("statusFile", "/dev/termination-log")
                return str(status_file)
            except (OSError, ValueError):
                return None
    return None


def exit_code(status_file: str | None, worker_codes: Sequence[int]) -> int:
    """The documented exit code for a failed torchrun."""
    status = read_status(status_file) if status_file else None
    error = (status or {}).get("error")
    if isinstance(error, dict) and isinstance(error.get("reason"), str):
        return exit_code_for(error["reason"])
    if status is not None and "artifact" in status:
        return EXIT_OK  # finished and published before the signal arrived
    for code in (EXIT_INVALID_INPUT, EXIT_INTERRUPTED):
        if code in worker_codes:
            return code
    return EXIT_FAILED


def with_shutdown_timeout(args: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """torchrun's arguments with our --shutdown-timeout default, where this torchrun has the option."""
    known = {option for action in parser._actions for option in action.option_strings}
    given = any(a.startswith(("--shutdown-timeout", "--shutdown_timeout")) for a in args)
    if given or "--shutdown-timeout" not in known:
        return list(args)
    timeout = os.environ.get("LORAFLEET_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT)
    return [f"--shutdown-timeout={timeout}", *args]


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    args = parser.parse_args(with_shutdown_timeout(sys.argv[1:] if argv is None else argv, parser))
    status_file = _trainer_status_file(args.training_script_args)
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as e:
        return exit_code(status_file, [f.exitcode for f in e.failures.values()])
    except SignalException:
        # torchrun forwarded the signal and waited for the workers; they say whether they checkpointed.
        return exit_code(status_file, [EXIT_INTERRUPTED])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
