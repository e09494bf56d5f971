"""Streaming a prepared corpus (issue #20, section 2): loader throughput, start-up and memory against corpus size.

    .venv/bin/python benchmarks/stream_corpus.py --out /tmp/bench [--s3] [--big] [--two-ranks] [--json R.json]

CPU and I/O only (no GPU is involved: the loader reads, crc-checks and collates on the host).
What it measures, each in a fresh subprocess so imports, caches and peak RSS do not leak:

  throughput  the loader alone (``StreamingCorpus``, rank 0 of world 8, micro-batch 4, seq_len 2048
              and 4096): tokens/s delivered as collated torch tensors over ``--seconds`` (20) of
              steady reading after the first batch, and the time to that first batch; a 200M-token
              synthetic corpus (vocab 32000, uint16) on file://, and with ``--s3`` the same tokens
              written to a moto server on loopback, in the default 64 MB shards and in 8 MB shards,
              read through s3fs (and moto's cost of one range GET on each object size).
              ``--two-ranks`` adds ranks 0 and 1 of 8 read by two concurrent processes.
  startup     time from ``StreamingCorpus(...)`` to the first batch for 10M and (``--big``) 1B tokens
              on file://, and with ``--s3`` for 10M and 200M (both shard sizes); the reader's peak RSS
              on the 1B corpus beside the 10M one.
  e2e-startup the training runtime (``ftcluster.train.launch``, 1 process, tiny random-init Llama,
              LoRA, fp32, seq_len 256, vocab 32000) on the 10M and (``--big``) 1B corpora, after one
              untimed warm-up launch, interleaved: seconds from the launch to the log line of step 1,
              and to the worker's first line and its model line (tokenizer, data and model in between).
  memory      the training runtime for ``--steps`` (200) steps, seq_len 256, on a 10M and (``--big``)
              a 300M-token corpus (vocab 512): the worker's peak RSS (VmHWM) and the ratio.

The tokenizers are word-level, built here (``t3`` ... ``t<vocab-1>`` and <|pad|>/<|bos|>/<|eos|> as ids
0/1/2, the ids the synthetic corpora use), so their vocabularies match the corpora exactly.

How long (2 busy cores): about 3 minutes by default, 11 with ``--s3 --big --two-ranks``, 13 with
``--s3 --big --repeat 2``. ``--big`` writes a 2 GB corpus (1B tokens, 15-30 s) and later a 0.6 GB
one: check ``df -h`` of ``--out`` first; ``--s3`` holds 0.8 GB in the moto server (memory and its
spool files). Everything it writes under ``--out`` is deleted at the end (``--keep`` keeps it), and
the moto server, the readers and every training process it started are stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2",
          "AWS_EC2_METADATA_DISABLED": "true"}
TARGET_TOKS = 100_000  # 10x an 8B full fine-tune's ~10,000 tokens/s per H200


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (0 when it is gone)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **S3_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- subprocess task: read


def task_read(a: argparse.Namespace) -> None:
    """One rank's loader: time to first batch, then tokens/s over a.seconds; one JSON line on stdout."""
    t_imp = time.perf_counter()
    import torch  # a training process has torch loaded before its data; keep its import out of the figure

    from ftcluster.train.stream import StreamingCorpus

    t_imp = time.perf_counter() - t_imp
    opts = json.loads(a.storage_options) if a.storage_options else None
    base = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    c = StreamingCorpus(a.uri, opts, a.seq_len, a.mbs, rank=a.rank, world_size=a.world)
    t_open = time.perf_counter() - t0
    b = c.next_batch()
    t_first = time.perf_counter() - t0
    assert isinstance(b["input_ids"], torch.Tensor) and tuple(b["input_ids"].shape) == (a.mbs, a.seq_len)
    n, t1, cpu1 = 0, time.perf_counter(), time.process_time()
    while (dt := time.perf_counter() - t1) < a.seconds:
        b = c.next_batch()
        n += int(b["input_ids"].numel())
    cpu = time.process_time() - cpu1
    c.close()
    st = proc_status()
    print(json.dumps({"uri": a.uri, "seq_len": a.seq_len, "mbs": a.mbs, "rank": a.rank, "world": a.world,
                      "import_s": round(t_imp, 3), "open_s": round(t_open, 4), "first_batch_s": round(t_first, 4),
                      "tokens": n, "seconds": round(dt, 2), "tokens_per_s": round(n / dt),
                      "cpu_s": round(cpu, 2),
                      "corpus_tokens": c.manifest.tokens, "rss_before_open_mb": round(base / 2**20, 1),
                      "peak_rss_mb": round(st["VmHWM"] / 2**20, 1), "rss_end_mb": round(st["VmRSS"] / 2**20, 1),
                      "load": load()}), flush=True)


def read_cmd(uri: str, seq_len: int, seconds: float, opts: dict[str, Any] | None, rank: int = 0,
             world: int = 8, mbs: int = 4) -> list[str]:
    cmd = [PY, __file__, "--task", "read", "--uri", uri, "--seq-len", str(seq_len), "--seconds", str(seconds),
           "--rank", str(rank), "--world", str(world), "--mbs", str(mbs)]
    return cmd + (["--storage-options", json.dumps(opts)] if opts else [])


def run_read(uri: str, seq_len: int, seconds: float, opts: dict[str, Any] | None = None, moto: Any = None,
             **kw: Any) -> dict[str, Any]:
    server_cpu = moto.cpu_s() if moto else 0.0
    res = subprocess.run(read_cmd(uri, seq_len, seconds, opts, **kw), env=child_env(), capture_output=True,
                         text=True, timeout=seconds + 300)
    if res.returncode != 0:
        raise RuntimeError(f"read task failed ({res.returncode}):\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if moto:
        r["moto_cpu_s"] = round(moto.cpu_s() - server_cpu, 2)  # the whole run, first batch included
    print(f"  read {uri.split('/')[-1]:>8} seq {seq_len} rank {r['rank']}/{r['world']}: first batch "
          f"{r['first_batch_s']:.3f} s, {r['tokens_per_s']:,} tok/s over {r['seconds']} s, peak RSS "
          f"{r['peak_rss_mb']} MB, reader CPU {r['cpu_s']} s" + (f", moto CPU {r['moto_cpu_s']} s" if moto else "")
          + f", load {r['load']}", flush=True)
    return r


def run_reads_concurrently(uri: str, seq_len: int, seconds: float, ranks: list[int],
                           opts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    procs = [subprocess.Popen(read_cmd(uri, seq_len, seconds, opts, rank=r), env=child_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in ranks]
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=seconds + 300)
            if p.returncode != 0:
                raise RuntimeError(f"read task failed ({p.returncode}):\n{se[-3000:]}")
            out.append(json.loads(so.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r in out:
        print(f"  concurrent rank {r['rank']}/{r['world']} seq {seq_len}: {r['tokens_per_s']:,} tok/s, "
              f"first batch {r['first_batch_s']:.3f} s, load {r['load']}", flush=True)
    return out


# ----------------------------------------------------------------------------- corpora, S3


def write_corpus(uri: str, tokens: float, vocab: int, opts: dict[str, Any] | None = None,
                 shard_tokens: int = 1 << 25) -> dict[str, Any]:
    from ftcluster.corpus.synthetic import write_synthetic

    t0 = time.perf_counter()
    m = write_synthetic(uri, int(tokens), vocab=vocab, storage_options=opts, shard_tokens=shard_tokens)
    dt = time.perf_counter() - t0
    print(f"  wrote {uri}: {m.tokens:,} tokens, {len(m.shards)} shards, vocab {vocab}, {m.dtype}, {dt:.1f} s",
          flush=True)
    return {"uri": uri, "tokens": m.tokens, "shards": len(m.shards), "shard_tokens": shard_tokens, "vocab": vocab,
            "write_s": round(dt, 1)}


class Moto:
    """moto's S3 server on loopback (as tests/support/s3fixture.py starts it)."""

    def __init__(self, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.logf = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=child_env(), stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            end = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(self.url, timeout=2).read()
                    break
                except Exception:  # noqa: BLE001
                    if self.proc.poll() is not None or time.monotonic() > end:
                        raise RuntimeError(f"moto did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.2)
            self.opts = {"client_kwargs": {"endpoint_url": self.url}}
            import boto3

            os.environ.update(S3_ENV)
            boto3.client("s3", endpoint_url=self.url, region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(
                Bucket="bench", CreateBucketConfiguration={"LocationConstraint": S3_ENV["AWS_DEFAULT_REGION"]})
        except BaseException:
            self.stop()
            raise

    def range_get_cost(self, corpora: list[str], n: int = 20) -> dict[str, dict[str, float]]:
        """ms per 12 KB range GET (one 2048-token block's pages) on the first shard of each corpus: moto
        copies the whole object for every GET, so this grows with the object, unlike S3's."""
        import boto3

        c = boto3.client("s3", endpoint_url=self.url, region_name=S3_ENV["AWS_DEFAULT_REGION"])
        out = {}
        for name in corpora:
            key = f"{name}/shards/s000000-0000.tokens"
            try:
                size = c.head_object(Bucket="bench", Key=key)["ContentLength"]
            except Exception:  # noqa: BLE001 - not written in this run
                continue
            c.get_object(Bucket="bench", Key=key, Range="bytes=0-12287")["Body"].read()
            t = time.perf_counter()
            for i in range(n):
                c.get_object(Bucket="bench", Key=key, Range=f"bytes={i * 12288}-{i * 12288 + 12287}")["Body"].read()
            out[name] = {"object_mb": round(size / 2**20, 1), "ms_per_get": round((time.perf_counter() - t) / n * 1e3, 1)}
            print(f"  moto range GET on a {out[name]['object_mb']} MB object: {out[name]['ms_per_get']} ms", flush=True)
        return out

    def cpu_s(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return round(proc_status(self.proc.pid)["VmRSS"] / 2**20, 1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()


def word_tokenizer(folder: Path, vocab: int) -> Path:
    """A word-level tokenizer of exactly ``vocab`` ids: <|pad|>, <|bos|>, <|eos|> as 0, 1, 2, then t3..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="<|pad|>")
    fast.save_pretrained(str(folder))
    assert len(fast) == vocab, len(fast)
    return folder


# ----------------------------------------------------------------------------- the training runtime

SPEC = """\
name: bench-stream
method: lora
model: {{random_init: {{preset: tiny, vocab_size: {vocab}}}}}
tokenizer: {{path: {tok}}}
data: {{train: {corpus}, format: text, seq_len: {seq_len}}}
training: {{learning_rate: 1.0e-3, warmup_steps: 2, max_steps: {steps}, micro_batch_size: 4, log_every_steps: 1,
           precision: fp32, eval_every_steps: 100000}}
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj, down_proj]}}
env: {{OMP_NUM_THREADS: "1"}}
resources: {{gpus_per_node: 0, procs_per_node: 1}}
output: {{uri: {out}, checkpoint_every_steps: {ckpt}, keep_last: 1}}
"""

RUNNING: list[subprocess.Popen] = []


def run_train(work: Path, name: str, corpus: Path, tok: Path, vocab: int, steps: int, seq_len: int) -> dict[str, Any]:
    """Launch the runtime (1 process); follow its log, time stamping each line, and its worker's VmHWM."""
    import psutil

    from ftcluster.plan.launch import compile_plan
    from ftcluster.spec.loader import load_spec

    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    spec_path = d / "spec.yaml"
    spec_path.write_text(SPEC.format(tok=tok, vocab=vocab, corpus=corpus, seq_len=seq_len, steps=steps, out=(d / "out").as_uri(),
                                     ckpt=max(steps, 1)))
    payload = d / "payload.json"
    payload.write_text(compile_plan(load_spec(spec_path, overrides=[])).payload_json())
    env = child_env(FTCLUSTER_CACHE=str(work / "cache"), FTCLUSTER_LOCAL_DIR=str(d / "local"), HF_HUB_OFFLINE="1",
                    TORCH_ELASTIC_SHUTDOWN_TIMEOUT="60")
    cmd = [PY, "-m", "ftcluster.train.launch", "--standalone", "--nproc-per-node=1", "--max-restarts=0", "-m",
           "ftcluster.train", "--spec", str(payload)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    RUNNING.append(proc)
    lines: list[tuple[float, str]] = []
    hwm: dict[int, tuple[int, str]] = {}
    done = threading.Event()

    def watch() -> None:
        me = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                kids = me.children(recursive=True)
            except psutil.Error:
                break
            for k in kids:
                st = proc_status(k.pid)
                if st["VmHWM"] > hwm.get(k.pid, (0, ""))[0]:
                    try:
                        what = " ".join(k.cmdline())[-80:]
                    except psutil.Error:
                        what = "?"
                    hwm[k.pid] = (st["VmHWM"], what)
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
    rc = proc.wait()
    done.set()
    watcher.join()
    RUNNING.remove(proc)
    (d / "log.txt").write_text("".join(f"{t:8.3f} {s}\n" for t, s in lines))
    if rc != 0:
        raise RuntimeError(f"training run {name} failed ({rc}):\n" + "\n".join(s for _, s in lines[-40:]))

    def first(*needles: str) -> float | None:
        return next((round(t, 2) for t, s in lines if all(n in s for n in needles)), None)

    recs = [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("kind") == "train"]
    worker_pid, (worker_hwm, worker_cmd) = max(hwm.items(), key=lambda kv: kv[1][0])
    res = {"name": name, "corpus": str(corpus), "steps": len(train), "seq_len": seq_len,
           "launch_to_run_line_s": first("process(es) on"), "launch_to_model_line_s": first("trainable of"),
           "launch_to_step1_s": first("step 1/"),
           "step1_elapsed_s": train[0].get("elapsed_s") if train else None,
           "wall_s": round(lines[-1][0], 1) if lines else None,
           "worker_peak_rss_mb": round(worker_hwm / 2**20, 1), "worker_cmd": worker_cmd,
           "processes": {str(p): round(v[0] / 2**20, 1) for p, v in hwm.items()}, "load": load()}
    print(f"  train {name}: step 1 at {res['launch_to_step1_s']} s after launch, {len(train)} steps in "
          f"{res['wall_s']} s, worker peak RSS {res['worker_peak_rss_mb']} MB, load {res['load']}", flush=True)
    return res


# ----------------------------------------------------------------------------- the benchmark


def main_bench(a: argparse.Namespace) -> dict[str, Any]:
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "stream-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    only = set(a.only.split(",")) if a.only else {"throughput", "startup", "e2e-startup", "memory"}
    R: dict[str, Any] = {"machine": {"uname_m": os.uname().machine, "cores": os.cpu_count(),
                                     "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                                                     1), "python": sys.version.split()[0]},
                         "versions": versions(), "args": vars(a), "load_start": load(), "corpora": [], "throughput": [], "startup": [],
                         "e2e_startup": [], "memory": [], "notes": []}
    print(f"load at start: {load()}", flush=True)
    moto: Moto | None = None
    try:
        c = work / "corpora"
        c.mkdir()
        if only & {"throughput"} or (a.s3 and "startup" in only):
            R["corpora"].append(write_corpus(str(c / "c200m"), 2e8, 32000))
        if only & {"startup", "e2e-startup"}:
            R["corpora"].append(write_corpus(str(c / "c10m"), 1e7, 32000))
        if a.big and only & {"startup", "e2e-startup"}:
            R["corpora"].append(write_corpus(str(c / "c1b"), 1e9, 32000))
        if a.s3:
            moto = Moto(work / "moto.log")
            # c200m-s8: the same tokens in 4M-token (8 MB) shards; moto copies a whole object on every
            # range GET (FakeKey.value), so its figures show what the 64 MB default shards cost there.
            for name, n, st in (("c200m", 2e8, 1 << 25), ("c200m-s8", 2e8, 1 << 22), ("c10m", 1e7, 1 << 25)):
                if name == "c10m" and "startup" not in only:
                    continue
                R["corpora"].append(write_corpus(f"s3://bench/{name}", n, 32000, moto.opts, st))
            R["moto_range_get"] = moto.range_get_cost(["c200m", "c200m-s8", "c10m"])
            R["moto_rss_mb"] = moto.rss_mb()
            print(f"  moto server RSS {R['moto_rss_mb']} MB", flush=True)

        if "throughput" in only:
            print("throughput: rank 0 of 8, micro-batch 4", flush=True)
            for seq in (2048, 4096):
                for r in range(a.repeat):
                    R["throughput"].append({"store": "file", "repeat": r, **run_read(str(c / "c200m"), seq, a.seconds)})
                for name in ("c200m", "c200m-s8") if moto else ():
                    for r in range(a.repeat):
                        R["throughput"].append({"store": f"s3 {name}", "repeat": r,
                                                **run_read(f"s3://bench/{name}", seq, a.seconds, moto.opts, moto)})
            if a.two_ranks:
                for store, uri, opts in (("file", str(c / "c200m"), None),
                                         *((("s3 c200m-s8", "s3://bench/c200m-s8", moto.opts),) if moto else ())):
                    for r in run_reads_concurrently(uri, 2048, a.seconds, [0, 1], opts):
                        R["throughput"].append({"store": store, "concurrent": 2, **r})
        if "startup" in only:
            print("startup: StreamingCorpus(...) to the first batch (seq 2048, rank 0 of 8)", flush=True)
            cases = [("file", str(c / "c10m"), None)]
            if a.big:
                cases.append(("file", str(c / "c1b"), None))
            if moto:
                cases += [("s3", "s3://bench/c10m", moto.opts), ("s3", "s3://bench/c200m", moto.opts),
                          ("s3", "s3://bench/c200m-s8", moto.opts)]
            for store, uri, opts in cases:
                for r in range(3):
                    R["startup"].append({"store": store, "repeat": r,
                                         **run_read(uri, 2048, a.seconds if r == 0 else 2, opts,
                                                    moto if opts else None)})
        if "e2e-startup" in only:
            print("e2e start-up: the training runtime, tiny model, LoRA, vocab 32000", flush=True)
            tok = word_tokenizer(work / "tok32000", 32000)
            # the first launch of a session pays for cold caches whatever the corpus: one untimed warm-up,
            # then the corpora interleaved
            R["e2e_startup"].append({"warmup": True, **run_train(work, "start-warmup", c / "c10m", tok, 32000, 5, 256)})
            for r in range(a.repeat + 1):
                for name in ("c10m", *(("c1b",) if a.big else ())):
                    R["e2e_startup"].append({"repeat": r, **run_train(work, f"start-{name}-{r}", c / name, tok, 32000, 5,
                                                                      256)})
        if a.big:  # the big corpora go before the memory runs write theirs
            for name in ("c1b", "c200m"):
                shutil.rmtree(c / name, ignore_errors=True)
        if "memory" in only:
            print(f"memory: the training runtime, tiny model, LoRA, vocab 512, seq 256, {a.steps} steps", flush=True)
            tok = word_tokenizer(work / "tok512", 512)
            sizes = [("m10m", 1e7), *((("m300m", 3e8),) if a.big else ())]
            for name, n in sizes:
                R["corpora"].append(write_corpus(str(c / name), n, 512))
            for r in range(a.repeat):
                for name, _ in sizes:
                    R["memory"].append({"repeat": r, **run_train(work, f"mem-{name}-{r}", c / name, tok, 512, a.steps, 256)})
    finally:
        for p in list(RUNNING):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        if moto:
            moto.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    R["load_end"] = load()
    return R


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "numpy", "fsspec", "s3fs", "moto"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def summary(R: dict[str, Any]) -> str:
    rows = ["| measure | figure | target |", "|---|---|---|"]
    for t in R["throughput"]:
        tag = f"{t['store']}, seq {t['seq_len']}" + (f", rank {t['rank']} of 2 concurrent" if t.get("concurrent") else "")
        rows.append(f"| loader tok/s ({tag}) | {t['tokens_per_s']:,} (first batch {t['first_batch_s']:.2f} s; "
                    f"load {t['load']}) | >= {TARGET_TOKS:,} |")
    for t in R["startup"]:
        rows.append(f"| first batch, {t['store']} {t['uri'].split('/')[-1]}, {t['corpus_tokens']:,} tokens | {t['first_batch_s']:.3f} s "
                    f"(manifest {t['open_s']:.3f} s; reader peak RSS {t['peak_rss_mb']} MB, "
                    f"{t['rss_before_open_mb']} MB before opening) | seconds, flat |")
    for t in R["e2e_startup"]:
        rows.append(f"| runtime launch -> step 1, {Path(t['corpus']).name}{' (warm-up)' if t.get('warmup') else ''} | {t['launch_to_step1_s']} s "
                    f"(worker's first line at {t['launch_to_run_line_s']} s, model built at "
                    f"{t['launch_to_model_line_s']} s; load {t['load']}) | seconds, flat |")
    for t in R["memory"]:
        rows.append(f"| worker peak RSS, {Path(t['corpus']).name}, {t['steps']} steps | {t['worker_peak_rss_mb']} MB "
                    f"(load {t['load']}) | within 10 % |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench", help="scratch folder (corpora, runs); emptied at the end")
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--s3", action="store_true", help="also through S3 (a moto server on loopback)")
    ap.add_argument("--big", action="store_true", help="also the 1B-token (start-up) and 300M-token (memory) corpora")
    ap.add_argument("--two-ranks", action="store_true", help="also ranks 0 and 1 read by 2 concurrent processes")
    ap.add_argument("--only", help="comma list of throughput,startup,e2e-startup,memory")
    ap.add_argument("--seconds", type=float, default=20.0, help="steady reading time per throughput figure")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the memory runs")
    ap.add_argument("--repeat", type=int, default=1, help="repeats of the throughput and memory figures")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and runs under --out")
    # the subprocess task
    ap.add_argument("--task", choices=["read"], help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--mbs", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--storage-options", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.task == "read":
        task_read(a)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in main_bench's finally
    R = main_bench(a)
    print(summary(R))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(R, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
