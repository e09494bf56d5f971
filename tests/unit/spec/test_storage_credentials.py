"""Credentials in ``storage_options`` (output, data, model) are refused by name, at the option, with the
store's own variable to use instead; before, some (an S3 SSE-C key) were copied into every render.

Each case renders the spec for Slurm and for Kubernetes: a credential that loads is a credential in the
sbatch script and in the manifest (the job's payload carries the whole spec).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.errors import SpecError
from ftcluster.render import render
from ftcluster.spec.loader import load_spec
from tests.support.specs import TINY_LORA

ROOT = Path(__file__).resolve().parents[3]
# Low-entropy made-up values: the value screen (ftcluster.spec.secrets.secret_kind) lets them through,
# so only the option's name can stop them.
SSE_KEY = "my-own-32-byte-sse-c-key-abcdefg"
WEAK = "password-of-the-team"

# (URI, storage_options YAML at 4 spaces, the option's field path under storage_options, what the fix names)
CASES = {
    "s3-sse-c": ("s3://b/r", "s3_additional_kwargs:\n  SSECustomerAlgorithm: AES256\n  SSECustomerKey: " + SSE_KEY,
                 "s3_additional_kwargs.SSECustomerKey", "FSSPEC_S3"),
    "s3-sse-c-md5": ("s3://b/r", "s3_additional_kwargs:\n  SSECustomerKeyMD5: " + SSE_KEY,
                     "s3_additional_kwargs.SSECustomerKeyMD5", "FSSPEC_S3"),
    "s3-sse_customer_key": ("s3://b/r", "sse_customer_key: " + SSE_KEY, "sse_customer_key", "FSSPEC_S3"),
    "s3-copy-source-sse-c": ("s3://b/r", "s3_additional_kwargs:\n  CopySourceSSECustomerKey: " + SSE_KEY,
                             "s3_additional_kwargs.CopySourceSSECustomerKey", "FSSPEC_S3"),
    "s3-secret": ("s3://b/r", "secret: " + WEAK, "secret", "AWS_SECRET_ACCESS_KEY"),
    "s3-token": ("s3://b/r", "token: " + WEAK, "token", "AWS_SESSION_TOKEN"),
    "s3-client_kwargs": ("s3://b/r", "client_kwargs:\n  aws_secret_access_key: " + WEAK,
                         "client_kwargs.aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    "gcs-token-dict": ("gs://b/r", "token:\n  type: service_account\n  private_key_id: " + WEAK
                       + "\n  client_email: sa@p.iam.gserviceaccount.com", "token", "GOOGLE_APPLICATION_CREDENTIALS"),
    "gcs-token-string": ("gs://b/r", "token: " + WEAK, "token", "GOOGLE_APPLICATION_CREDENTIALS"),
    "azure-account_key": ("abfs://c/r", "account_name: acct\naccount_key: " + WEAK, "account_key",
                          "AZURE_STORAGE_ACCOUNT_KEY"),
    "azure-sas_token": ("az://c/r", "sas_token: " + WEAK, "sas_token", "AZURE_STORAGE_SAS_TOKEN"),
    "azure-connection_string": ("abfs://c/r", "connection_string: " + WEAK, "connection_string",
                                "AZURE_STORAGE_CONNECTION_STRING"),
    "azure-client_secret": ("abfs://c/r", "tenant_id: t\nclient_id: c\nclient_secret: " + WEAK, "client_secret",
                            "AZURE_STORAGE_CLIENT_SECRET"),
    "http-authorization": ("https://h/r", "headers:\n  Authorization: token " + WEAK, "headers.Authorization",
                           "environment"),
}
SECTIONS = {  # where storage_options appear in a job spec, and how to put the URI there
    "output": lambda uri: ("  uri: file:///tmp/ftc-out", f"  uri: {uri}"),
    "data": lambda uri: ("  seq_len: 128", "  seq_len: 128\n  eval: " + uri + "/eval.jsonl"),
    "model": lambda uri: ("  random_init: {preset: tiny}", "  path: " + uri),
}


def spec_text(section: str, uri: str, options: str) -> str:
    old, new = SECTIONS[section](uri)
    indented = textwrap.indent(options, "    ")
    text = TINY_LORA.replace(old, f"{new}\n  storage_options:\n{indented}")
    if section == "model":  # tokenizer: none in a random folder; make it explicit so only the option matters
        text += "tokenizer: {train_vocab_size: 512}\n"
    return text


def load_or_problems(text: str, tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        return load_spec(p), None
    except SpecError as exc:
        return None, str(exc)


@pytest.mark.parametrize("section", sorted(SECTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_credential_options_are_refused_not_rendered(tmp_path, case, section):
    uri, options, field, fix = CASES[case]
    spec, err = load_or_problems(spec_text(section, uri, options), tmp_path)
    if spec is not None:  # before the fix: the credential is in the launch files
        for target in ("slurm", "pytorchjob"):
            rendered = "\n".join(render(spec, target).values())
            assert WEAK not in rendered and SSE_KEY not in rendered, f"{case} leaked into the {target} render"
        pytest.fail(f"{case}: {section}.storage_options.{field} was accepted")
    assert err is not None
    (line,) = err.splitlines()
    assert "job.yaml:" in line and f": {section}.storage_options.{field}: " in line, line
    assert fix in line and ("slurm.env_passthrough" in line or "header" in line), line
    assert WEAK not in line and SSE_KEY not in line


def test_the_refusal_is_at_the_option(tmp_path):
    text = spec_text("output", "s3://b/r", "s3_additional_kwargs:\n  SSECustomerAlgorithm: AES256\n"
                     "  SSECustomerKey: " + SSE_KEY)
    _, err = load_or_problems(text, tmp_path)
    assert err is not None and err.startswith(f"{tmp_path / 'job.yaml'}:13:7: output.storage_options."
                                              "s3_additional_kwargs.SSECustomerKey: "), err


@pytest.mark.parametrize("token", ["google_default", "cloud", "anon", "cache", "/var/secrets/gcs/key.json",
                                   "gs://bucket/keys/sa.json"])
def test_gcs_token_methods_and_key_file_paths_are_references(tmp_path, token):
    spec, err = load_or_problems(spec_text("output", "gs://b/r", f"token: {token}"), tmp_path)
    assert err is None and spec is not None and spec.output.storage_options == {"token": token}


def test_a_key_file_path_is_a_reference_only_for_gcs(tmp_path):
    _, err = load_or_problems(spec_text("output", "s3://b/r", "token: /var/secrets/key.json"), tmp_path)
    assert err is not None and "AWS_SESSION_TOKEN" in err


def test_empty_credential_options_pass(tmp_path):
    spec, err = load_or_problems(spec_text("output", "s3://b/r", "key: null\nsecret: ''\ntoken: null"), tmp_path)
    assert err is None and spec is not None


def test_endpoint_and_kms_options_pass(tmp_path):
    spec, err = load_or_problems(spec_text("output", "s3://b/r", (
        "client_kwargs: {endpoint_url: 'http://127.0.0.1:9000', region_name: eu-west-1}\n"
        "s3_additional_kwargs: {ServerSideEncryption: 'aws:kms', SSEKMSKeyId: 'arn:aws:kms:eu-west-1:1:key/abc'}\n"
        "profile: training")), tmp_path)
    assert err is None, err


@pytest.mark.parametrize("name, value", [
    ("FSSPEC_S3", json.dumps({"s3_additional_kwargs": {"SSECustomerKey": SSE_KEY}})),
    ("FSSPEC_ABFS_ACCOUNT_KEY", WEAK),
    ("FSSPEC_GCS", json.dumps({"token": {"private_key": WEAK}})),
])
def test_fsspec_variables_with_credentials_are_refused_in_env(tmp_path, name, value):
    _, err = load_or_problems(TINY_LORA + f"env:\n  {name}: '{value}'\n", tmp_path)
    assert err is not None and f": env.{name}: " in err, err
    assert "slurm.env_passthrough" in err and SSE_KEY not in err and WEAK not in err


def test_fsspec_reads_an_sse_c_key_from_the_job_environment():
    """The documented by-reference path for SSE-C: the job's FSSPEC_S3 variable (JSON), which fsspec reads
    at import and merges under the spec's storage_options (fsspec.config.set_conf_env / apply_config)."""
    code = textwrap.dedent("""\
        from ftcluster.storage.uri import fs_and_path
        fs, _ = fs_and_path("s3://bucket/run", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}})
        print(sorted(fs.s3_additional_kwargs.items()))
        """)
    env = {"FSSPEC_S3": json.dumps({"s3_additional_kwargs": {"SSECustomerAlgorithm": "AES256",
                                                             "SSECustomerKey": SSE_KEY}}), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([("SSECustomerAlgorithm", "AES256"), ("SSECustomerKey", SSE_KEY)])
