"""GPU facts and prices: memory, dense bf16 peak, HBM and GPU-to-GPU bandwidth, $/GPU-hour.

Memory is what ``torch.cuda.get_device_properties().total_memory`` reports (MiB figures from
nvidia-smi; the H200 one is the measured 143,771 MiB in docs/BENCHMARKS.md). Peak FLOP/s are
the datasheets' dense bf16 tensor-core numbers. ``link_gbps`` is a collective bus bandwidth
(GB/s) between GPUs of one node (NVLink or PCIe); between nodes the planner assumes
``INTER_NODE_GBPS`` per GPU (8 x 400 Gb/s InfiniBand per 8-GPU node).

Prices are rough on-demand cloud list prices in USD per GPU-hour (late 2026). They differ a
lot between providers and contracts: set your own in ``~/.config/ftcluster/prices.yaml``, in
the file named by ``FTCLUSTER_PRICES``, or with ``ftcluster plan --price``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...errors import FtclusterError

MIB = 2**20
INTER_NODE_GBPS = 45.0
PCIE_GBPS = 25.0  # host <-> GPU copies (offload)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float
    hbm_tbps: float
    link_gbps: float
    price_per_hour: float


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("b200", 183_359 * MIB, 2250, 8.0, 700, 6.00),
    Gpu("h200", 143_771 * MIB, 989, 4.8, 370, 3.80),
    Gpu("h100", 81_559 * MIB, 989, 3.35, 370, 2.90),
    Gpu("h100-pcie", 81_559 * MIB, 756, 2.0, 25, 2.40),
    Gpu("a100-80g", 81_920 * MIB, 312, 2.0, 230, 1.80),
    Gpu("a100-40g", 40_960 * MIB, 312, 1.55, 230, 1.30),
    Gpu("l40s", 46_068 * MIB, 362, 0.86, 25, 1.00),
    Gpu("l4", 23_034 * MIB, 121, 0.3, 16, 0.60),
    Gpu("a10g", 23_028 * MIB, 70, 0.6, 16, 0.80),
    Gpu("mi300x", 196_592 * MIB, 1307, 5.3, 300, 2.80),
)}

_ALIASES = {"h100-80g": "h100", "h100-sxm": "h100", "h100-80gb": "h100", "h200-141g": "h200",
            "a100": "a100-40g",  # ambiguous: the smaller one, so a plan never promises memory it may not have
            "a100-80gb": "a100-80g", "a100-40gb": "a100-40g", "a100-sxm4-80gb": "a100-80g",
            "a100-sxm4-40gb": "a100-40g", "l40s-48g": "l40s"}


def normalise(name: str) -> str:
    """'NVIDIA-H200', 'nvidia_h200', 'H100 80GB HBM3' -> the table's key (or the cleaned name)."""
    n = name.strip().lower().replace("_", "-").replace(" ", "-")
    for prefix in ("nvidia-", "amd-", "tesla-"):
        n = n.removeprefix(prefix)
    n = n.removesuffix("-hbm3").removesuffix("-hbm3e")
    return _ALIASES.get(n, n)


def price_file() -> Path | None:
    """The price file in force: $FTCLUSTER_PRICES, else ~/.config/ftcluster/prices.yaml if it exists."""
    env = os.environ.get("FTCLUSTER_PRICES")
    if env:
        return Path(env)
    p = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "ftcluster" / "prices.yaml"
    return p if p.is_file() else None


def load_gpus(path: Path | None = None) -> dict[str, Gpu]:
    """The GPU table with a price file applied.

    The file maps GPU types to a price (``h200: 2.5``) or to fields, which may also define a
    type the table lacks: ``my-gpu: {price_per_hour: 1.2, memory_gb: 48, bf16_tflops: 300}``.
    """
    path = path if path is not None else price_file()
    table = dict(GPUS)
    if path is None:
        return table
    from ruamel.yaml import YAML

    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FtclusterError(f"{path}: no such price file (FTCLUSTER_PRICES)") from None
    except Exception as exc:  # a YAML error: one line, the file named
        raise FtclusterError(f"{path}: not a readable YAML price file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FtclusterError(f"{path}: write a mapping of GPU type to $/GPU-hour, e.g. 'h200: 3.5'")
    for raw, val in data.items():
        table[normalise(str(raw))] = _entry(path, normalise(str(raw)), val, table.get(normalise(str(raw))))
    return table


def _entry(path: Path, name: str, val: Any, base: Gpu | None) -> Gpu:
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        val = {"price_per_hour": val}
    if not isinstance(val, dict):
        raise FtclusterError(f"{path}: {name}: write a price (a number) or a mapping with price_per_hour")
    known = {"price_per_hour", "memory_gb", "bf16_tflops", "hbm_tbps", "link_gbps"}
    bad = sorted(set(val) - known)
    if bad:
        raise FtclusterError(f"{path}: {name}: unknown key {bad[0]!r}; valid keys: {', '.join(sorted(known))}")
    if base is None:
        need = {"price_per_hour", "memory_gb", "bf16_tflops"} - set(val)
        if need:
            raise FtclusterError(f"{path}: {name}: a GPU type the planner does not know needs {', '.join(sorted(need))}")
        base = Gpu(name, 0, 0.0, 2.0, 25.0, 0.0)
    g = replace(base, **{k: float(v) for k, v in val.items() if k in ("price_per_hour", "bf16_tflops", "hbm_tbps", "link_gbps")})
    if "memory_gb" in val:
        g = replace(g, memory_bytes=int(float(val["memory_gb"]) * 1e9))
    return g


STAND_IN = "h100"  # whose speed and price a GPU known only by its memory is planned with


def spec_gpu(raw: str | None, memory_gb: float | None, table: dict[str, Gpu]) -> Gpu | None:
    """The GPU a spec names (``resources.gpu_type``, ``resources.gpu_memory_gb``): the table's entry,
    with the spec's memory when it gives one; a type the table lacks but whose memory the spec gives
    is planned with that memory and the stand-in's speed and price (:data:`STAND_IN`); None when
    the type is unknown and no memory is given (or neither is given)."""
    name = normalise(raw) if raw else None
    base = table.get(name) if name else None
    if memory_gb is None:
        return base
    return replace(base or table.get(STAND_IN) or GPUS[STAND_IN], name=name or (base.name if base else STAND_IN),
                   memory_bytes=int(float(memory_gb) * 1e9))
