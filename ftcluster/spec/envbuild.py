"""The environment of every training process, built from the spec.

Its own module because two layers need it: the plan (every launch file sets it) and the
variants check (all tasks of one job array share one environment, so a variant may not change it).
"""

from __future__ import annotations

from typing import Any

# The resolved spec travels to the training processes in this variable (sbatch script, pod template);
# one environment string may hold at most MAX_ARG_STRLEN (128 KiB) on Linux: renderers stay below this.
PAYLOAD_VAR = "FTCLUSTER_PAYLOAD"
PAYLOAD_LIMIT = 100_000

# Defaults a user can override through `env:` in the spec.
DEFAULT_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}


def build_env(spec: Any, backend_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every training process: defaults < spec.env < backend env."""
    env = dict(DEFAULT_ENV)
    uses_hub = spec.model.hub_id is not None or spec.tokenizer.hub_id is not None
    if not uses_hub:
        # No code path may reach a model hub unless the spec names one.
        env["HF_HUB_OFFLINE"] = "1"
        env["HF_DATASETS_OFFLINE"] = "1"
    cpus = spec.resources.cpus_per_node
    if cpus:
        env["OMP_NUM_THREADS"] = str(max(1, cpus // spec.resources.nproc_per_node))
    env.update(spec.env)
    env.update(backend_env or {})
    return dict(sorted(env.items()))
