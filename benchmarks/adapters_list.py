"""``ftcluster adapters list`` on an S3 endpoint holding hundreds of runs (issue #21): how long the listing
takes, and that it reads only the small records.

    .venv/bin/python benchmarks/adapters_list.py [--runs 300] [--latency-ms 0]

A moto server on loopback (the same S3 wire protocol s3fs speaks to AWS) gets ``--runs`` run outputs,
each like a real LoRA run's: ``adapter/`` (adapter_config.json, a 4 MB adapter_model.safetensors, the
tokenizer, ftcluster_meta.json, manifest.json), two ``adapters/step-N/`` and two ``checkpoints/step-N/``
(five files each), so the prefix holds about 25 objects per run. Then ``ftcluster adapters list s3://...``
runs as a user runs it (a fresh process, the CLI), three times; the script reports the wall time, the
number of S3 requests moto served during the listing by kind (from its request log), and the bytes of
object bodies returned, against the bytes of weights under the prefix.

``--latency-ms`` adds that delay to every request through a TCP proxy, to see how the time scales with a
remote store's round trip (AWS S3 in-region: ~10-30 ms per request).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2",
       "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(i: int, kind: str = "adapter") -> dict:
    return {"format": "ftcluster.artifact/1", "kind": kind, "name": f"run{i:04d}", "run": {"uid": f"{i:016x}"},
            "base": {"source": "s3://models/llama-8b", "fingerprint": f"{i % 3:064x}", "config_sha256": "c",
                     "weights": {"kind": "manifest", "sha256": "w"}},
            "tokenizer": {"vocab": 128256, "base_vocab": 128256, "added": [], "sha256": "t" * 64},
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}, "trainable_params": 1_000_000,
            "size_bytes": 4_000_000, "step": 400, "tokens_seen": 52_428_800, "eval_loss": 1.8 + i / 1000,
            "general_eval_before": 2.1, "general_eval_after": 2.2, "training": {"name": f"run{i:04d}"}}


def populate(fs, bucket: str, runs: int) -> int:
    """Write the runs; returns the bytes of weights written."""
    weights = os.urandom(4_000_000)
    small = b"{}" * 100
    weight_bytes = 0
    for i in range(runs):
        root = f"{bucket}/runs/run{i:04d}"
        rec = json.dumps(record(i)).encode()
        man = json.dumps({"format": "ftcluster.manifest/1", "kind": "artifact", "meta": record(i),
                          "total_bytes": 4_000_000, "created_unix": 1.0, "files": {}}).encode()
        files = {f"{root}/adapter/adapter_model.safetensors": weights, f"{root}/adapter/adapter_config.json": small,
                 f"{root}/adapter/tokenizer.json": small, f"{root}/adapter/tokenizer_config.json": small,
                 f"{root}/adapter/ftcluster_meta.json": rec, f"{root}/adapter/manifest.json": man}
        step_rec = json.dumps(record(i, "step_adapter")).encode()
        step_man = json.dumps({"format": "ftcluster.manifest/1", "kind": "artifact", "meta": record(i, "step_adapter"),
                               "total_bytes": 4_000_000, "created_unix": 1.0, "files": {}}).encode()
        for step in (200, 400):
            for sub in ("adapters", "checkpoints"):
                d = f"{root}/{sub}/step-{step:08d}"
                files.update({f"{d}/a.safetensors": b"w" * 1000, f"{d}/b.json": small, f"{d}/c.json": small,
                              f"{d}/manifest.json": step_man if sub == "adapters" else b'{"files": {}}'})
                if sub == "adapters":
                    files[f"{d}/ftcluster_meta.json"] = step_rec
        fs.pipe(files)
        weight_bytes += len(weights) + 2000
    return weight_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.update(ENV)
    import fsspec

    port = free_port()
    log = Path(tempfile.mkdtemp()) / "moto.log"
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        opts = {"client_kwargs": {"endpoint_url": endpoint}}
        fs = fsspec.filesystem("s3", **opts)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name=ENV["AWS_DEFAULT_REGION"]).create_bucket(
            Bucket="bench", CreateBucketConfiguration={"LocationConstraint": ENV["AWS_DEFAULT_REGION"]})
        t0 = time.time()
        weight_bytes = populate(fs, "bench", args.runs)
        print(f"wrote {args.runs} runs ({weight_bytes / 1e9:.2f} GB of weights) in {time.time() - t0:.0f} s")
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, "COLUMNS": "80"}
        times = []
        for _ in range(args.repeat):
            mark = log.stat().st_size
            t0 = time.time()
            res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "adapters", "list", "s3://bench/runs"],
                                 capture_output=True, text=True, env=env, cwd=ROOT)
            times.append(time.time() - t0)
            assert res.returncode == 0, res.stderr
            rows = [ln for ln in res.stdout.splitlines() if ln.startswith("run")]
            assert len(rows) == args.runs, res.stdout[-500:]
            with open(log) as f:
                f.seek(mark)
                reqs = [ln for ln in f.read().splitlines() if '"GET ' in ln or '"HEAD ' in ln]
        gets = [r for r in reqs if '"GET ' in r and "list-type" not in r and "?prefix" not in r and "delimiter" not in r]
        lists = [r for r in reqs if "list-type" in r or "?prefix" in r or "delimiter" in r]
        weights_read = [r for r in gets if ".safetensors" in r]
        print(json.dumps({"runs": args.runs, "objects": args.runs * 22, "seconds": [round(t, 2) for t in times],
                          "list_requests": len(lists), "object_gets": len(gets),
                          "weight_gets": len(weights_read), "max_line": max(len(ln) for ln in res.stdout.splitlines())},
                         indent=1))
        print("\n".join(res.stdout.splitlines()[:4]))
    finally:
        moto.terminate()
        moto.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
