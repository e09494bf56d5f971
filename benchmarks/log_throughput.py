"""Throughput of an ftcluster run from its log, for runs cut before speed.py wrote its summary.

The runtime logs one line per step with the real tokens per second of the whole job (every
rank's tokens over the step's wall time) and the peak allocated GB of rank 0. This prints the
median over the steps after ``--warmup`` divided by ``--gpus``, which is what speed.py reports
as tokens/s per GPU (checked on session 3's runs: 8,947 against 8,943 and 8,562 against 8,557).

    python benchmarks/log_throughput.py --gpus 2 RESULTS/a/z2-mb4-gc0.ft.log [...]
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

LINE = re.compile(r"step (\d+)/(\d+) \|.*?tokens/s ([\d,]+) \| peak_mem ([\d.]+) GB")


def summary(text: str, gpus: int, warmup: int) -> dict:
    steps = [(int(m[1]), int(m[2]), int(m[3].replace(",", "")), float(m[4])) for m in LINE.finditer(text)]
    timed = [t for s, _, t, _ in steps if s > warmup]
    if not timed:
        return {"steps": len(steps)}
    return {"steps": len(steps), "of": steps[-1][1], "timed_steps": len(timed),
            "tok_s_per_gpu": round(statistics.median(timed) / gpus), "peak_alloc_gb": max(p for *_, p in steps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    for p in args.logs:
        print(p, summary(p.read_text(), args.gpus, args.warmup))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
