"""``ftcluster plot``: which runs a target names, the numbers printed, the planner's reference lines from the
spec a run trained with, and one-line errors. The picture itself from real runs: tests/e2e (quickstart, and
the Slurm job array's variants)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from ftcluster.errors import FtclusterError  # noqa: E402
from ftcluster.spec.loader import load_spec_text  # noqa: E402
from ftcluster.ui import plot as P  # noqa: E402

SPEC = """name: {name}
method: lora
model: {{random_init: {{preset: llama-3-8b}}}}
data: {{train: x.jsonl, seq_len: 2048}}
training: {{max_steps: 3, micro_batch_size: 2}}
resources: {{gpus_per_node: 1, gpu_type: h200}}
output: {{uri: file:///nowhere}}
"""


def run_folder(root: Path, name: str, losses: list[float], general: tuple[float, float] | None = None,
               spec: bool = False) -> Path:
    out = root / name
    out.mkdir(parents=True)
    recs = [{"kind": "eval", "step": 0, "loss": losses[0] + 0.1}]
    for i, loss in enumerate(losses, 1):
        recs.append({"kind": "train", "step": i, "loss": loss, "tokens_seen": 100 * i, "tokens_per_s": 1000.0 + i,
                     "peak_mem_gb": 1.5})
    recs.append({"kind": "checkpoint", "step": len(losses), "final": True, "ckpt_blocked_s": 0.4})
    recs.append({"kind": "eval", "step": len(losses), "loss": losses[-1] + 0.05})
    if general:
        recs += [{"kind": "general_eval", "step": 0, "when": "before", "loss": general[0]},
                 {"kind": "general_eval", "step": len(losses), "when": "after", "loss": general[1]}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "train", "st')
    if spec:
        (out / "adapter").mkdir()
        dump = load_spec_text(SPEC.format(name=name), "s.yaml").model_dump(mode="json")
        (out / "adapter" / "ftcluster_meta.json").write_text(json.dumps({"kind": "adapter", "training": dump}))
    return out


def test_a_root_with_variants_is_one_series_each_and_the_table_has_their_numbers(tmp_path):
    run_folder(tmp_path / "out", "qa", [3.0, 2.5, 2.0], general=(4.0, 4.2), spec=True)
    run_folder(tmp_path / "out", "chat", [3.0, 2.8, 2.6])
    series = P.collect([str(tmp_path / "out")])
    assert [s.label for s in series] == [f"{tmp_path / 'out'}/chat", f"{tmp_path / 'out'}/qa"]
    assert len(series[1].kind("train")) == 3  # the line cut mid-write is skipped
    text = P.table(series)
    qa = text.splitlines()[2]
    assert " 3 " in qa and "2.0000" in qa and "2.0500" in qa and "4.0000 -> 4.2000" in qa and "1,002" in qa, text
    # the reference lines: the planner's figures for the spec the qa adapter trained with
    assert series[1].predicted["mem_gb"] > 10 and series[1].predicted["tokens_per_s"] > 1000
    assert series[0].predicted == {}
    png = tmp_path / "p.png"
    P.draw(series, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_target_without_metrics_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtclusterError) as err:
        P.collect([str(tmp_path / "empty")])
    assert "no metrics.jsonl at or under" in str(err.value) and "\n" not in str(err.value)


def test_the_same_target_twice_is_told_apart(tmp_path):
    run_folder(tmp_path, "a", [2.0, 1.0])
    series = P.collect([str(tmp_path / "a"), str(tmp_path / "a")])
    assert [s.label for s in series] == [f"{tmp_path / 'a'} #1", f"{tmp_path / 'a'} #2"]
