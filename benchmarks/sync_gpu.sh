#!/usr/bin/env bash
# Copy this worktree's code and the plain baselines into /work/main/.gpu (git-ignored there),
# which the device tool carries to the GPU machine (the tool sends /work/main, not a worktree).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
dst=${GPU_DIR:-/work/main/.gpu}
rm -rf "$dst/repo"; mkdir -p "$dst/repo" "$dst/baselines"
tar -C "$src" --exclude=.git --exclude=.gpu --exclude=.whl --exclude=.venv --exclude=.ruff_cache --exclude=.pytest_cache --exclude=tests --exclude=benchmarks/results --exclude=__pycache__ -cf - . | tar -C "$dst/repo" -xf -
cp /work/shared/baselines/*.py "$dst/baselines/"
du -sh "$dst"
