"""The continual pre-training corpus at benchmark size: generate it, prepare it, stream it (issue #20).

1. ``examples/cpt/make_corpus.py`` writes ``--mb`` MB of generated case law (1,700 MB: ~300M tokens
   with the example's 2,048-token BPE) in ``--files`` jsonl.gz files, in parallel.
2. ``ftcluster prepare-data`` tokenizes it with ``--workers`` processes into a prepared corpus: wall
   time, tokens/s, shards, bytes.
3. The streaming reader (:class:`ftcluster.train.stream.StreamingCorpus`) on that corpus, rank 0 of 8,
   seq_len 2048, micro-batch 4: time to the first batch, tokens/s over ``--read-s`` seconds, and the
   process's resident memory before and after.

Prints one JSON object per phase and writes ``results.json`` to RESULTS_DIR. Everything else goes
under ``--work-dir`` (about 2.5 GB for 1,700 MB; removed at the end unless ``--keep``).

    python benchmarks/cpt_corpus.py RESULTS_DIR [--work-dir DIR] [--mb 1700] [--files 64] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--mb", type=float, default=1700)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--read-s", type=float, default=20)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    results = args.results_dir.resolve()
    work = (args.work_dir or results / "work").resolve()
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"cpus": os.cpu_count(), "workers": args.workers, "mb": args.mb}

    def report(key: str, value: dict) -> None:
        out[key] = value
        print(json.dumps({key: value}), flush=True)
        (results / "results.json").write_text(json.dumps(out, indent=1))

    raw, corpus = work / "raw", work / "corpus"
    t0 = time.time()
    subprocess.run([sys.executable, str(ROOT / "examples/cpt/make_corpus.py"), str(raw), "--mb", str(args.mb),
                    "--files", str(args.files), "--workers", str(args.workers)], check=True)
    report("generate", {"wall_s": round(time.time() - t0, 1), "files": args.files,
                        "bytes_gz": sum(p.stat().st_size for p in raw.iterdir())})

    spec = work / "cpt.yaml"
    text = (ROOT / "examples/cpt-domain.yaml").read_text()
    text = text.replace("cpt/domain_terms.txt", str(ROOT / "examples/cpt/domain_terms.txt"))
    text = text.replace("file://../out/cpt/corpus", str(corpus)).replace("../out/cpt/raw", str(raw))
    text = text.replace("shard_tokens: 1048576", "shard_tokens: 4194304")  # the default, not the example's small shards
    spec.write_text(text)
    env = {**os.environ, "FTCLUSTER_CACHE": str(work / "cache"), "FTCLUSTER_HOME": str(work / "home"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    prep = subprocess.run([sys.executable, "-m", "ftcluster.cli", "prepare-data", str(spec), "--workers",
                           str(args.workers)], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if prep.returncode != 0:
        print(prep.stderr[-3000:], file=sys.stderr)
        return 1
    from ftcluster.corpus.format import read_manifest

    m = read_manifest(str(corpus))
    assert m is not None
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    report("prepare", {"wall_s": round(wall, 1), "tokens": m.tokens, "documents": m.documents,
                       "shards": len(m.shards), "tokens_per_s": round(m.tokens / wall),
                       "bytes": sum(p.stat().st_size for p in (corpus / "shards").iterdir()),
                       "cpu_s_children": round(children.ru_utime + children.ru_stime, 1),
                       "tokenizer": m.tokenizer_fingerprint[:12], "vocab": m.vocab_size})

    import torch  # noqa: F401 - imported before the clock and the first reading: a training process has it

    from ftcluster.train.stream import StreamingCorpus

    before = rss_mb()
    t0 = time.time()
    src = StreamingCorpus(str(corpus), None, 2048, 4, 0, 8, seed=1)
    src.next_batch()
    first_s = time.time() - t0
    n, t1 = 0, time.time()
    while time.time() - t1 < args.read_s:
        n += src.next_batch()["input_ids"].numel()
    rate = n / (time.time() - t1)
    src.close()
    report("stream", {"first_batch_s": round(first_s, 3), "tokens_per_s": round(rate), "rss_mb_before": round(before),
                      "rss_mb_after": round(rss_mb()), "seq_len": 2048, "micro_batch": 4, "rank": "0 of 8"})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
