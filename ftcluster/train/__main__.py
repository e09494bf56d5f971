"""Entry point: ``python -m ftcluster.train --spec PAYLOAD.json`` (one process per rank, under torchrun).

Exit status: 0 done; 143 stopped by SIGUSR2/SIGTERM, with everything saved so far committed
(resubmit or requeue to resume); 1 on an error, printed as one line (the traceback with
FTCLUSTER_DEBUG=1). docs/training.md, "Stops and crashes", lists what each moment leaves behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_payload(spec_path: str | None, spec_env: str | None) -> dict[str, Any]:
    from ..errors import TrainError

    if spec_env:
        text = os.environ.get(spec_env)
        if not text:
            raise TrainError(f"--spec-env {spec_env}: the variable is not set or empty")
        where = f"${spec_env}"
    else:
        try:
            text = Path(spec_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TrainError(f"--spec {spec_path}: cannot read the payload ({exc.strerror})") from None
        where = spec_path
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise TrainError(f"{where}: not JSON ({exc}); pass the payload.json that ftcluster rendered") from None
    if not isinstance(payload, dict) or not ("spec" in payload or "variants" in payload):
        raise TrainError(f"{where}: not an ftcluster payload (no 'spec' key); pass the payload.json that "
                         "ftcluster rendered")
    return payload


def main(argv: list[str] | None = None) -> int:
    from .lifeline import tie_to_parent

    tie_to_parent()  # first: die with the launcher, even one that died before this line (docs/lifecycle.md)

    from ..storage.testhook import signal_at
    from .signals import StopFlag

    # Then: a stop from here on sets the flag instead of killing the process (issue #8).
    # Kept installed until the process exits, so a late forwarded copy cannot kill it either.
    stop = StopFlag().install()
    signal_at("startup")  # test-only; a no-op unless FTCLUSTER_TEST_SIGNAL_AT is set
    parser = argparse.ArgumentParser(prog="python -m ftcluster.train", description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="payload JSON file written by ftcluster (payload.json)")
    src.add_argument("--spec-env", help="name of an environment variable holding the payload JSON")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")

    def body() -> int:
        payload = read_payload(args.spec, args.spec_env)
        from .runtime import run

        return run(payload, stop)

    return worker_errors(body, rank)


def worker_errors(body: Callable[[], int], rank: str) -> int:
    """``body()``, or a training process's failure: one line that says whether it is an infrastructure
    fault (exit 170, restarted) or an error in the code or data (exit 1, not retried), naming the rank
    and host that failed first (:func:`ftcluster.train.faults.exit_for`; docs/lifecycle.md)."""
    from ..errors import FtclusterError
    from .faults import exit_for

    prefix = f"error (rank {rank})"
    try:
        return body()
    except Exception as exc:  # noqa: BLE001 - every failure is classified
        debug = os.environ.get("FTCLUSTER_DEBUG", "") not in ("", "0")
        if debug:
            import traceback

            traceback.print_exc()
        code, tail = exit_for(exc, int(rank))
        if isinstance(exc, FtclusterError):
            lines = str(exc).splitlines() or [type(exc).__name__]
        else:
            hint = "" if debug else " (set FTCLUSTER_DEBUG=1 for the traceback)"
            lines = [f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}{hint}"]
        lines[-1] += tail
        for text in lines:
            print(f"{prefix}: {text}", file=sys.stderr, flush=True)
        return code


def one_line_errors(body: Callable[[], int], prefix: str = "error") -> int:
    """``body()``, or 1 with an error as one ``PREFIX: ...`` line per problem on stderr (the traceback instead
    with FTCLUSTER_DEBUG=1): what the workers that ftcluster starts as commands print."""
    from ..errors import FtclusterError

    debug = os.environ.get("FTCLUSTER_DEBUG", "") not in ("", "0")
    try:
        return body()
    except FtclusterError as exc:
        if debug:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"{prefix}: {line}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line unless debugging
        if debug:
            raise
        first = (str(exc).splitlines() or [""])[0]
        print(f"{prefix}: {type(exc).__name__}: {first} (set FTCLUSTER_DEBUG=1 for the traceback)",
              file=sys.stderr, flush=True)
        return 1

if __name__ == "__main__":
    sys.exit(main())
