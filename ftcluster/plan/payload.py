"""The payload the training entry point reads, and how a task of a job array picks its own.

A payload is ``{"ftcluster_version", "spec", "deepspeed"}``; the payload of a job array is
``{"base": ..., "variants": [{"variant", "set", "unset", "deepspeed"}]}`` where ``set`` and
``unset`` are JSON Pointer changes to the base spec (:mod:`ftcluster.plan.launch` builds both). Pure
JSON, no spec models: the training runtime reads it before anything else is imported.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..errors import TrainError


def _pointer(keys: tuple[Any, ...]) -> str:
    """A JSON Pointer (RFC 6901): ("lora", "r") -> "/lora/r"; "~" and "/" in keys are escaped."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


def _keys(pointer: str) -> list[str]:
    return [k.replace("~1", "/").replace("~0", "~") for k in pointer.split("/")[1:]]


def json_changes(base: Any, other: Any, path: tuple[Any, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """What turns JSON value ``base`` into ``other``: ({JSON Pointer: new value}, [JSON Pointer removed]).

    Mappings are compared key by key; any other value that differs is replaced whole.
    """
    if not (isinstance(base, dict) and isinstance(other, dict)):
        return ({} if base == other else {_pointer(path): other}), []
    changed: dict[str, Any] = {}
    removed = [_pointer(path + (k,)) for k in base if k not in other]
    for key, value in other.items():
        if key not in base:
            changed[_pointer(path + (key,))] = value
            continue
        c, r = json_changes(base[key], value, path + (key,))
        changed.update(c)
        removed += r
    return changed, removed


def apply_changes(base: Any, changed: dict[str, Any], removed: list[str]) -> Any:
    """Inverse of :func:`json_changes`: a copy of ``base`` with the changes applied."""
    out = copy.deepcopy(base)
    for pointer, value in changed.items():
        keys = _keys(pointer)
        if not keys:
            out = copy.deepcopy(value)
            continue
        target = out
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = copy.deepcopy(value)
    for pointer in removed:
        keys = _keys(pointer)
        target = out
        for key in keys[:-1]:
            target = target[key]
        target.pop(keys[-1], None)
    return out


def select_payload(payload: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The payload this process trains: ``payload`` itself, or for a job with variants the entry
    of this process's variant.

    ``FTCLUSTER_VARIANT`` (a variant name or index; for launchers other than Slurm) wins over
    ``SLURM_ARRAY_TASK_ID`` (set by Slurm in every task of a job array). Pure: reads only
    ``environ``. Raises :class:`~ftcluster.errors.TrainError` when no variant is chosen.
    """
    variants = payload.get("variants")
    if variants is None:
        return payload
    names = [str(v.get("variant")) for v in variants]
    index = _variant_index(names, environ)
    entry, base = variants[index], payload["base"]
    return {"ftcluster_version": payload.get("ftcluster_version"), "variant": entry["variant"],
            "group": (base.get("spec") or {}).get("name"),  # the job's name: its variants' shared tracker experiment
            "spec": apply_changes(base["spec"], entry.get("set", {}), entry.get("unset", [])),
            "deepspeed": entry["deepspeed"] if "deepspeed" in entry else base["deepspeed"]}


def _variant_index(names: list[str], environ: Mapping[str, str]) -> int:
    source = "FTCLUSTER_VARIANT" if environ.get("FTCLUSTER_VARIANT") else "SLURM_ARRAY_TASK_ID"
    want = (environ.get(source) or "").strip()
    if not want:
        raise TrainError(
            f"this payload holds {len(names)} variants ({', '.join(names)}); choose one with "
            "FTCLUSTER_VARIANT=<name or index>, or run it as a task of the Slurm job array")
    if want in names:
        return names.index(want)
    if want.isdigit() and int(want) < len(names):
        return int(want)
    raise TrainError(f"{source}={want} names no variant of this job; use one of {', '.join(names)} "
                     f"or an index 0-{len(names) - 1}")


def fit_to_world(payload: dict[str, Any], world: int) -> tuple[dict[str, Any], str | None]:
    """The payload for the ``world`` processes a job with ``resources.min_nodes`` actually got, and a line
    saying what changed (None when nothing did: the job got every node it asked for, has no min_nodes,
    or ``world`` is 0: not launched by torchrun).

    ``resources.nodes`` becomes the nodes the job runs on, and the gradient accumulation grows by
    the factor the processes shrank (the planned world x accumulation over ``world``) where that
    divides, so the global batch (micro-batch x accumulation x processes) and with it the learning
    rate schedule's meaning stay as planned; where it does not divide the accumulation stays and the
    line says the global batch changes. A DeepSpeed config's batch keys follow. Pure.
    """
    from ..spec.schema import ResourcesSpec

    spec = payload["spec"]
    res, tr = spec["resources"], spec["training"]
    if not world or res.get("min_nodes") is None:
        return payload, None
    nproc = ResourcesSpec.model_validate(res).nproc_per_node
    planned = int(res["nodes"]) * nproc
    if world == planned:
        return payload, None
    if world % nproc:
        raise TrainError(f"this job runs {world} processes, not a multiple of the {nproc} per node the spec sets "
                         "(resources.procs_per_node / gpus_per_node); launch whole nodes")
    nodes, accum, mb = world // nproc, int(tr["gradient_accumulation_steps"]), int(tr["micro_batch_size"])
    kept = (planned * accum) % world == 0
    new_accum = planned * accum // world if kept else accum
    out = {**payload, "spec": {**spec, "resources": {**res, "nodes": nodes},
                               "training": {**tr, "gradient_accumulation_steps": new_accum}}}
    if payload.get("deepspeed"):
        out["deepspeed"] = {**payload["deepspeed"], "gradient_accumulation_steps": new_accum,
                            "train_batch_size": mb * new_accum * world}
    where = f"running on {nodes} of {res['nodes']} nodes (resources.min_nodes {res['min_nodes']}): {world} process(es)"
    if kept:
        return out, (f"{where}, gradient accumulation {new_accum} instead of {accum}: the global batch stays "
                     f"{mb * accum * planned} sequences")
    return out, (f"{where}; the global batch CHANGES from {mb * accum * planned} to {mb * accum * world} sequences "
                 f"({planned} x {accum} is not a multiple of {world}: choose nodes whose ratio divides the accumulation)")
