"""Cold-start render speed: `ftcluster render` vs torchx's Slurm dry run, side by side.

Each command runs N times in a fresh interpreter (cold: new process each time); we
report the median wall time. The commands are interleaved (round i runs every command
once) so background load hits them alike, after one untimed warm-up run of each.
PYTHONDONTWRITEBYTECODE is removed from the environment of both tools, so they use
their .pyc files as a normal install does. torchx is installed into its own venv so it
cannot change ftcluster's environment. Usage:

    python benchmarks/render_speed.py [--runs 15] [--torchx-venv /tmp/torchx-venv]

Writes a Markdown table to stdout; docs/BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    """Wall time of one run of ``argv`` in a new process."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return elapsed


def medians(commands: list[list[str]], runs: int) -> list[float]:
    """Median wall time of each command: one warm-up run each, then ``runs`` interleaved rounds."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # use .pyc files
    for argv in commands:
        run_once(argv, env)  # writes missing .pyc files, fills the page cache
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(runs):
        for i, argv in enumerate(commands):
            times[i].append(run_once(argv, env))
    return [statistics.median(t) for t in times]


def torchx_python(venv: Path) -> str:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torchx==0.7.0"], check=True)
    return str(py)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--torchx-venv", default="/tmp/torchx-venv")
    ap.add_argument("--no-torchx", action="store_true")
    args = ap.parse_args()
    ftc = [sys.executable, "-m", "ftcluster.cli", "render"]
    rows = [
        ("bare interpreter (`python -c pass`)", [sys.executable, "-c", "pass"]),
        ("`ftcluster --help`", [sys.executable, "-m", "ftcluster.cli", "--help"]),
    ]
    for ex, target in [("quickstart", "slurm"), ("full-slurm-2node", "slurm"), ("lora-pytorchjob", "pytorchjob"),
                       ("full-trainjob", "trainjob")]:
        rows.append((f"`ftcluster render examples/{ex}.yaml --target {target}`", ftc + [f"examples/{ex}.yaml", "--target", target]))
    if not args.no_torchx:
        tx = torchx_python(Path(args.torchx_venv))
        tx_bin = str(Path(tx).parent / "torchx")
        rows.append(("torchx 0.7.0 `torchx run --dryrun -s slurm dist.ddp -j 2x8 --script train.py`",
                     [tx_bin, "run", "--dryrun", "-s", "slurm", "dist.ddp", "-j", "2x8", "--script", "train.py"]))
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"median of {args.runs} cold runs, interleaved, after one warm-up run each")
    print("| command | median wall (s) |\n|---|---|")
    for (label, _), median in zip(rows, medians([argv for _, argv in rows], args.runs), strict=True):
        print(f"| {label} | {median:.3f} |")


if __name__ == "__main__":
    main()
