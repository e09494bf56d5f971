"""`ftcluster plan --json` and docs/plan.schema.json agree for a job spec and for a pipeline (an array,
one plan per stage), and the schema still rejects what is not a plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def plan_json(path: str):
    out = subprocess.run([sys.executable, "-m", "ftcluster.cli", "plan", path, "--json", "--offline"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_pipeline_plan_json_follows_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs/plan.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    stages = plan_json("examples/pipeline-cpt-then-lora.yaml")
    assert isinstance(stages, list) and len(stages) == 2
    jsonschema.validate(stages, schema)
    one = plan_json("examples/quickstart.yaml")
    jsonschema.validate(one, schema)
    for bad in ([], [{"job": "x"}], {"job": "x"}, [one, 3]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
