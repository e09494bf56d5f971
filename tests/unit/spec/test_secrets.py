"""Secrets by value: every string of a spec (and every --set value) is checked, whatever its name.

A secret is rejected at its value's file:line:col with the reference-instead fix, and the value
never appears in the error nor in a rendered "Reproduce with" header.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.errors import SpecError
from ftcluster.render import command_for
from ftcluster.spec.loader import load_spec
from ftcluster.spec.secrets import generate, secret_kind
from tests.support.specs import TINY_LORA

ROOT = Path(__file__).resolve().parents[3]
GOOD = TINY_LORA  # tests/support/specs.py
# Made-up values of the right shapes (the Azure one is Azurite's published development key).
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
SSE_KEY = "K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols="
HF = "hf_QmVkZXJtYW5uWm9vS2VlcGVyUG9zdGJveA"
GHP = "ghp_R4nd0mT0k3nV4lu3F0rT3st1ngPurp0s3sXy"
BEARER = "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz"


def problems(text: str, tmp_path, overrides=None) -> list[str]:
    p = tmp_path / "job.yaml"
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(p, overrides)
    return str(info.value).splitlines()


@pytest.mark.parametrize("extra, where, value", [
    (f"env:\n  AZURE_STORAGE_ACCOUNT_KEY: \"{AZURE_KEY}\"\n", "11:30: env.AZURE_STORAGE_ACCOUNT_KEY", AZURE_KEY),
    (f"env:\n  AZURE_CONN: \"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={AZURE_KEY};\"\n",
     "11:15: env.AZURE_CONN", AZURE_KEY),
    (f"env:\n  NOTES: {HF}\n", "11:10: env.NOTES", HF),
    (f"slurm:\n  env:\n    GIT_REF: {GHP}\n", "12:14: slurm.env.GIT_REF", GHP),
    (f"kubernetes:\n  annotations:\n    owner: {GHP}\n", "12:12: kubernetes.annotations.owner", GHP),
    (f"description: {HF}\n", "10:14: description", HF),
])
def test_secret_values_rejected_at_the_value(tmp_path, extra, where, value):
    (msg,) = problems(GOOD + extra, tmp_path)
    assert f"job.yaml:{where}: the value looks like a secret" in msg
    assert "slurm.env_passthrough" in msg and "kubernetes.secret_env" in msg
    assert value not in msg and value[:12] not in msg


def test_storage_option_secrets_rejected(tmp_path):
    text = GOOD.replace("  uri: file:///tmp/ftc-out", (
        "  uri: s3://bucket/run\n"
        "  storage_options:\n"
        "    s3_additional_kwargs:\n"
        "      SSECustomerAlgorithm: AES256\n"
        f"      SSECustomerKey: \"{SSE_KEY}\"\n"
        "    headers:\n"
        f"      Authorization: \"{BEARER}\"\n"))
    lines = problems(text, tmp_path)
    assert len(lines) == 2, lines
    assert "job.yaml:13:23: output.storage_options.s3_additional_kwargs.SSECustomerKey:" in lines[0]
    assert "job.yaml:15:22: output.storage_options.headers.Authorization:" in lines[1]
    assert "FSSPEC_S3" in lines[0] and "through its environment" in lines[1]  # SSE-C: fsspec's own variable
    for line in lines:
        assert SSE_KEY not in line and "eyJ0" not in line


def test_secret_in_set_value_names_set_and_never_the_value(tmp_path):
    (msg,) = problems(GOOD, tmp_path, [f"env.MY_NOTE={GHP}"])
    assert msg.startswith("--set: env.MY_NOTE: the value looks like a secret (GitHub Token)")
    assert GHP not in msg


def test_secret_and_type_error_in_one_field_quote_nothing(tmp_path):
    lines = problems(GOOD + f"slurm:\n  signal_seconds: {GHP}\n", tmp_path)
    assert len(lines) == 1 and "slurm.signal_seconds" in lines[0] and GHP not in "\n".join(lines)


def test_secret_problems_come_with_other_problems(tmp_path):
    lines = problems(GOOD + f"env:\n  X: {HF}\ntraining:\n  max_steps: -1\n", tmp_path)
    assert len(lines) == 2 and "env.X" in lines[0] and "training.max_steps" in lines[1]


def test_references_are_not_secrets(tmp_path):
    from ftcluster.spec.loader import load_spec_text

    spec = load_spec_text(GOOD + textwrap.dedent("""\
        kubernetes:
          image: ghcr.io/acme/ftcluster-train@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
          secret_env: [{name: HF_TOKEN, secret: hf-token, key: token}]
          env_from_secrets: [aws-credentials]
          tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
        slurm:
          env_passthrough: [AWS_SECRET_ACCESS_KEY]
        """), "ok.yaml")
    assert spec.kubernetes.secret_env[0].key == "token"


@pytest.mark.parametrize("name, value", [
    ("hub_id", "meta-llama/Llama-3.2-1B-Instruct"),
    ("uri", "s3://ft-runs/support-bot-lora-experiment-2024-01-02/checkpoints"),
    ("image", "nvcr.io/nvidia/pytorch:24.05-py3@sha256:" + "0123456789abcdef" * 4),
    ("revision", "5f0b02c75b57c5855da9ae460ce51323ea669d8a"),  # a commit hash
    ("KEY_PREFIX", "experiments/2024"),
    ("secret", "hf-token"),
    ("endpoint_url", "http://127.0.0.1:9000"),
    ("NCCL_SOCKET_IFNAME", "eth0"),
    ("setup", "source /opt/venvs/ftcluster/bin/activate && export HF_HOME=/scratch/$USER/hf"),
])
def test_normal_values_pass(name, value):
    assert secret_kind(name, value) is None


def test_examples_are_clean_and_do_not_import_detect_secrets():
    """No false positive on any example, and a clean spec never pays detect-secrets' import."""
    code = textwrap.dedent("""\
        import glob, sys
        from ftcluster.spec.loader import load_spec
        from ftcluster.spec.pipeline import is_pipeline, load_pipeline
        from ftcluster.spec.yamlio import load_file
        for f in sorted(glob.glob('examples/*.yaml')):
            (load_pipeline if is_pipeline(load_file(f).data) else load_spec)(f)
        assert 'detect_secrets' not in sys.modules, 'detect-secrets imported for a clean spec'
        print('ok')
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_reproduce_header_hides_secret_looking_set_values():
    cmd = command_for("job.yaml", [f"env.NOTE={GHP}", "env.API_TOKEN=x", "training.max_steps=10"], "slurm")
    assert GHP not in cmd and "env.NOTE=<secret:env.NOTE>" in cmd and "env.API_TOKEN=<secret:env.API_TOKEN>" in cmd
    assert "training.max_steps=10" in cmd


def test_screen_matches_the_installed_detect_secrets():
    """ftcluster/spec/secret_patterns.py is the installed detect-secrets' plugin regexes: regenerate with
    `python -m ftcluster.spec.secrets` after upgrading it."""
    assert (ROOT / "ftcluster" / "spec" / "secret_patterns.py").read_text() == generate()


def test_jwt_screen_hit_is_confirmed_by_the_plugin():
    # The screen's regex matches any eyJ...x.y; detect-secrets' plugin also checks that the parts decode.
    assert secret_kind("note", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2ln") == "JSON Web Token"
    assert secret_kind("note", "eyJnot-json.eyJalso-not") is None
