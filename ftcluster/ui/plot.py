"""``ftcluster plot RUN_OR_URI...``: one picture comparing runs, variants, stages or adapters.

Every target is a run id (its output root: a job array's variants and a pipeline's stages are under
it), a run id with a path inside its output (``RUN/qa``), or an output URI or path; the runs are the
folders at or under it (two levels) that hold a ``metrics.jsonl``, read through fsspec (local, S3,
...). Four panels:

* training loss (and eval loss, as markers) against tokens seen;
* the loss on ``data.general_eval`` before and after training (the forgetting check), per run;
* tokens/s per step, with each checkpoint's blocked seconds marked, and the planner's prediction;
* peak GPU memory per step (CPU runs: the process's max RSS), with the planner's prediction.

The planner's predictions come from the spec the run trained with (the ``ftcluster_meta.json`` of
its final artifact or adapter, else of its newest step adapter); a run without one has no
reference lines. A PNG (matplotlib, the Agg backend: no display needed) rather than an HTML page: it
opens anywhere, attaches to an issue or a pull request, and diffs as a file; the numbers behind it
are printed as a table too (terminal-only settings) and are in each run's metrics.jsonl.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from ..errors import FtclusterError
from ..storage.layout import ADAPTERS, ARTIFACTS, META, METRICS


@dataclass
class Series:
    """One run's metrics."""

    label: str
    uri: str
    records: list[dict[str, Any]]
    spec: dict[str, Any] | None = None
    predicted: dict[str, float] = field(default_factory=dict)  # "mem_gb", "tokens_per_s"

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]


def _read_jsonl(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _runs_under(fs: Any, root: str, depth: int = 2) -> list[str]:
    """Folders at or under ``root`` (fs paths) holding a metrics.jsonl, at most ``depth`` levels down."""
    if fs.exists(posixpath.join(root, METRICS)):
        return [root]
    if depth == 0:
        return []
    try:
        children = sorted(p.rstrip("/") for p in fs.ls(root, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[str] = []
    for child in children:
        name = child.rsplit("/", 1)[-1]
        if name.startswith(".") or name in (*ARTIFACTS, ADAPTERS, "checkpoints"):
            continue
        if fs.isdir(child):
            found += _runs_under(fs, child, depth - 1)
    return found


def _spec_of(fs: Any, root: str) -> dict[str, Any] | None:
    """The spec the run trained with, from an artifact's or step adapter's ftcluster_meta.json."""
    candidates = [posixpath.join(root, name, META) for name in ARTIFACTS]
    try:
        steps = sorted(p.rstrip("/") for p in fs.ls(posixpath.join(root, ADAPTERS), detail=False))
        candidates += [posixpath.join(p, META) for p in reversed(steps)]
    except (FileNotFoundError, NotADirectoryError):
        pass
    for path in candidates:
        try:
            if fs.exists(path):
                meta = json.loads(fs.cat_file(path))
                spec = meta.get("training") if isinstance(meta, dict) else None  # the spec it trained with
                if isinstance(spec, dict):
                    return spec
        except (OSError, ValueError):
            continue
    return None


def _predict(spec: dict[str, Any]) -> dict[str, float]:
    """The planner's memory and tokens/s for ``spec`` (its own GPUs), or {} when it cannot say."""
    try:
        from ..plan.planner import build_plan
        from ..spec.loader import load_spec_text

        plan = build_plan(load_spec_text(json.dumps(spec), "<the run's spec>"), network=False, count_data=False,
                          alternatives=False)
        req = plan.requested
        if req is None or not req.step_time_s:
            return {}
        return {"mem_gb": req.memory.total / 1e9, "tokens_per_s": req.tokens_per_step / req.step_time_s}
    except Exception:  # noqa: BLE001 - a reference line is optional: a spec the planner cannot read has none
        return {}


def collect(targets: list[str]) -> list[Series]:
    """The runs that ``targets`` name (see the module docstring), each with its records and predictions."""
    from .. import api
    from ..storage.uri import fs_and_path

    series: list[Series] = []
    for target in targets:
        uri, options = api.artifact_source(target)
        fs, root = fs_and_path(uri, options)
        roots = _runs_under(fs, root.rstrip("/"))
        if not roots:
            raise FtclusterError(f"{target}: no {METRICS} at or under {uri} (two levels); give a run id, or the "
                                 "output.uri of a run that has started training")
        base = uri.rstrip("/")
        for r in roots:
            rel = r[len(root.rstrip("/")):].strip("/")
            label = posixpath.join(target, rel) if rel else target
            text = fs.cat_file(posixpath.join(r, METRICS)).decode("utf-8", errors="replace")
            s = Series(label, f"{base}/{rel}" if rel else base, _read_jsonl(text))
            s.spec = _spec_of(fs, r)
            if s.spec is not None:
                s.predicted = _predict(s.spec)
            series.append(s)
    labels = [s.label for s in series]
    for i, s in enumerate(series):  # the same run named twice keeps both, told apart
        if labels.count(s.label) > 1:
            s.label = f"{s.label} #{i + 1}"
    return series


def table(series: list[Series]) -> str:
    """The numbers behind the picture, one line per run."""
    head = ("run", "steps", "tokens", "train loss", "eval loss", "general before -> after", "tok/s (median)",
            "peak mem GB")
    rows = []
    for s in series:
        train, evals = s.kind("train"), s.kind("eval")
        gen = {r.get("when"): r.get("loss") for r in s.kind("general_eval")}
        tps = sorted(r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float)))
        mem = max((r.get("peak_mem_gb") or 0 for r in train), default=0)
        rows.append((s.label, str(train[-1]["step"]) if train else "-",
                     f"{train[-1].get('tokens_seen', 0):,}" if train else "-",
                     f"{train[-1]['loss']:.4f}" if train else "-", f"{evals[-1]['loss']:.4f}" if evals else "-",
                     f"{gen['before']:.4f} -> {gen['after']:.4f}" if gen.get("before") is not None
                     and gen.get("after") is not None else "-",
                     f"{tps[len(tps) // 2]:,.0f}" if tps else "-", f"{mem:.2f}" if mem else "-"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*r) for r in rows)])


def draw(series: list[Series], path: str) -> None:
    """Write the four panels to ``path`` (PNG, or any format matplotlib infers from the suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FtclusterError("ftcluster plot draws with matplotlib: pip install 'ftcluster[plot]'") from None
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    (ax_loss, ax_gen), (ax_tps, ax_mem) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(series):
        c = colors[i % len(colors)]
        train = s.kind("train")
        by_step = {r["step"]: r.get("tokens_seen", 0) for r in train}
        if train:
            ax_loss.plot([r.get("tokens_seen", r["step"]) for r in train], [r["loss"] for r in train], color=c,
                         lw=1.2, label=f"{s.label} (train)")
            steps = [r["step"] for r in train]
            tps = [r.get("tokens_per_s") for r in train]
            ax_tps.plot(steps, tps, color=c, lw=1.0, label=s.label)
            ax_mem.plot(steps, [r.get("peak_mem_gb") for r in train], color=c, lw=1.0, label=s.label)
        evals = s.kind("eval")
        if evals:
            ax_loss.plot([by_step.get(r.get("step"), 0) for r in evals], [r["loss"] for r in evals], "o--", color=c,
                         ms=4, lw=0.8, label=f"{s.label} (eval)")
        for r in s.kind("checkpoint"):
            blocked = r.get("ckpt_blocked_s")
            ax_tps.axvline(r.get("step", 0), color=c, ls=":", lw=0.8)
            if blocked:
                ax_tps.annotate(f"{blocked:.1f}s", (r.get("step", 0), ax_tps.get_ylim()[1]), color=c, fontsize=7,
                                rotation=90, va="top", ha="right")
        if s.predicted.get("tokens_per_s"):
            ax_tps.axhline(s.predicted["tokens_per_s"], color=c, ls="--", lw=0.8, alpha=0.7)
        if s.predicted.get("mem_gb"):
            ax_mem.axhline(s.predicted["mem_gb"], color=c, ls="--", lw=0.8, alpha=0.7)
    # forgetting: general-eval loss before and after, per run
    gens: list[tuple[Series, dict[str, float]]] = []
    for s in series:
        g = {str(r.get("when")): r.get("loss") for r in s.kind("general_eval")}
        if isinstance(g.get("before"), (int, float)) and isinstance(g.get("after"), (int, float)):
            gens.append((s, {"before": float(g["before"]), "after": float(g["after"])}))  # type: ignore[arg-type]
    if gens:
        xs = range(len(gens))
        ax_gen.bar([x - 0.2 for x in xs], [g["before"] for _, g in gens], 0.4, label="before", color="#999999")
        ax_gen.bar([x + 0.2 for x in xs], [g["after"] for _, g in gens], 0.4, label="after",
                   color=[colors[series.index(s) % len(colors)] for s, _ in gens])
        for x, (_, g) in zip(xs, gens, strict=True):
            drift = g["after"] - g["before"]
            ax_gen.annotate(f"{drift:+.3f}", (x + 0.2, g["after"]), ha="center", va="bottom", fontsize=8)
        ax_gen.set_xticks(list(xs), [s.label for s, _ in gens], rotation=20, ha="right", fontsize=8)
        ax_gen.legend(fontsize=8)
    else:
        ax_gen.text(0.5, 0.5, "no data.general_eval in these runs\n(the forgetting check)", ha="center",
                    va="center", transform=ax_gen.transAxes, color="#666666")
        ax_gen.set_xticks([])
    ax_loss.set(title="loss", xlabel="tokens seen", ylabel="loss (nats/token)")
    ax_gen.set(title="forgetting: loss on data.general_eval before -> after", ylabel="loss")
    ax_tps.set(title="tokens/s (all GPUs); dotted: checkpoints (blocked s); dashed: planned", xlabel="step",
               ylabel="tokens/s")
    ax_mem.set(title="peak memory per GPU; dashed: planned", xlabel="step", ylabel="GB")
    for ax in (ax_loss, ax_tps, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(", ".join(s.label for s in series)[:160], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
