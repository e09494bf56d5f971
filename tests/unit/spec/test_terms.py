"""tokenizer.add_tokens as a file (ftcluster/spec/terms.py): read at load time into the spec, so the
payload carries the terms to every process; a missing or broken file is one located line before
anything is queued; a file the loader cannot see stays a path for the runtime."""

from __future__ import annotations

import json
import textwrap

import pytest

from ftcluster.errors import SpecError
from ftcluster.plan.launch import compile_plan
from ftcluster.spec.loader import load_spec
from ftcluster.spec.terms import parse_terms
from ftcluster.spec.variants import resolve_variants

TERMS = ["habeas corpus", "res judicata", "C#"]


def job(tokenizer: str = "{add_tokens: terms.txt}", extra: str = "") -> str:
    return textwrap.dedent(f"""\
        name: t
        method: lora
        model: {{random_init: {{preset: tiny}}}}
        tokenizer: {tokenizer}
        data: {{train: x.jsonl, seq_len: 64}}
        resources: {{gpus_per_node: 0}}
        """) + extra


def test_a_terms_file_skips_blank_and_comment_lines_and_keeps_a_hash_inside_a_term():
    assert parse_terms("# terms\nhabeas corpus\n\n  res judicata  \n   # indented comment\nC#\r\n") == TERMS


def test_the_terms_are_read_at_load_and_carried_by_the_payload(tmp_path):
    (tmp_path / "terms.txt").write_text("# domain terms\nhabeas corpus\n\n  res judicata  \nC#\n")
    (tmp_path / "job.yaml").write_text(job(extra="output: {uri: file:///tmp/o}\n"))
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.tokenizer.add_tokens == TERMS
    assert json.loads(compile_plan(spec).payload_json())["spec"]["tokenizer"]["add_tokens"] == TERMS


def test_a_kubernetes_pod_gets_the_terms_of_the_file_beside_the_spec(tmp_path):
    (tmp_path / "terms.txt").write_text("\n".join(TERMS))
    (tmp_path / "k8s.yaml").write_text(job(extra="backend: kubernetes\noutput: {uri: s3://b/o}\n"
                                                  "kubernetes: {image: 'reg/ftc:1'}\n"))
    assert load_spec(tmp_path / "k8s.yaml").tokenizer.add_tokens == TERMS
    # Not beside the spec: a path in the container, read there by the runtime.
    (tmp_path / "k8s.yaml").write_text(job("{add_tokens: /data/terms.txt}", "backend: kubernetes\n"
                                           "output: {uri: s3://b/o}\nkubernetes: {image: 'reg/ftc:1'}\n"))
    assert load_spec(tmp_path / "k8s.yaml").tokenizer.add_tokens == "/data/terms.txt"


def test_a_missing_or_broken_terms_file_is_one_located_line(tmp_path):
    (tmp_path / "job.yaml").write_text(job("{add_tokens: nope.txt}", "output: {uri: file:///tmp/o}\n"))
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "job.yaml")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"{tmp_path / 'job.yaml'}:4:")
    assert f"tokenizer.add_tokens: {tmp_path / 'nope.txt'}: no such file" in msg
    (tmp_path / "bad.txt").write_bytes(b"habeas corpus\nres \xff judicata\n")
    (tmp_path / "job.yaml").write_text(job("{add_tokens: bad.txt}", "output: {uri: file:///tmp/o}\n"))
    with pytest.raises(SpecError, match=rf"^{tmp_path / 'bad.txt'}:2: tokenizer\.add_tokens: not UTF-8"):
        load_spec(tmp_path / "job.yaml")


def test_a_variants_terms_file_is_read_for_that_variant_and_a_missing_one_is_named_at_its_value(tmp_path):
    (tmp_path / "terms.txt").write_text("habeas corpus\n")
    (tmp_path / "other.txt").write_text("res judicata\n")
    text = job(extra=textwrap.dedent("""\
        output: {uri: file:///tmp/o}
        variants:
          - name: a
            set: {tokenizer.add_tokens: other.txt}
          - name: b
            set: {lora.r: 4}
        """))
    (tmp_path / "job.yaml").write_text(text)
    spec = load_spec(tmp_path / "job.yaml")
    assert [v.tokenizer.add_tokens for v in resolve_variants(spec)] == [["res judicata"], ["habeas corpus"]]
    (tmp_path / "other.txt").unlink()
    with pytest.raises(SpecError, match=r"job\.yaml:10:\d+: variants\[0\]\.set\.tokenizer\.add_tokens: variant 'a': "
                                        r".*other\.txt: no such file"):
        load_spec(tmp_path / "job.yaml")
