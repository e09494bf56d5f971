"""Compare streaming-data libraries for continual pre-training (issue #20): litdata, mosaicml-streaming, datatrove.

Not part of ftcluster and never imported by tests: it needs a scratch venv with the libraries, e.g.

    python3 -m venv /work/libeval/venv
    /work/libeval/venv/bin/pip install torch==2.13.0          # CPU build; pin it, see below
    /work/libeval/venv/bin/pip install torch==2.13.0 torchvision==0.28.0 litdata mosaicml-streaming \
        datatrove orjson 'moto[server]' s3fs tokenizers numpy
    # (unpinned, litdata/mosaicml-streaming pull torchvision 0.29.1 -> torch 2.14.1 + ~4 GB of CUDA wheels)
    python examples/cpt/make_corpus.py /work/libeval/corpus --mb 200 --files 16 --workers 2
    PYTHON=/work/libeval/venv/bin/python S3_LAB=/work/libeval/s3 bash /work/shared/ci/s3-up.sh 5601
    OMP_NUM_THREADS=1 /work/libeval/venv/bin/python benchmarks/data_libs.py \
        --corpus /work/libeval/corpus --work /work/libeval/run --s3 http://127.0.0.1:5601 \
        --libs litdata,mosaic,datatrove --steps import,prepare,read,resume,scale --torchvision-stub
    S3_LAB=/work/libeval/s3 bash /work/shared/ci/s3-down.sh

--torchvision-stub: `import streaming` imports torchvision; the only torchvision 0.28 wheel on the
package index is built against the CUDA torch and fails with the CPU torch ("operator
torchvision::nms does not exist"), so the subprocesses get a stub torchvision on PYTHONPATH.
litdata's obstore client refuses http:// endpoints; for an http:// --s3 the script patches
litdata's client options (module level, LIBBENCH_LITDATA_HTTP) unless --no-litdata-patch.
datatrove's DataLoader worker is spawned for remote stores (fork after s3fs use fails).

What it does, per library, on the same corpus and the same tokenizer (byte-level BPE, vocab 8192, trained
on the first 4 MB of text; every document ends with <|endoftext|>; tokens stored as uint16):
  prepare   tokenize the corpus with the library's own writer (2 processes) to a local folder and to S3 (moto):
            wall time, output bytes; then a second run of the same command (idempotence).
  read      one rank, seq_len 2048 (2049-token blocks), batch 8, one background DataLoader worker: time to
            first batch, tokens/s over --read-tokens tokens, peak RSS; from file:// and from s3:// (moto).
  resume    on a small 2-file prepare: (1) 1 rank, K batches, state_dict -> new loader -> next M batches
            equal the uninterrupted run's; (2) 2 ranks (separate processes) K batches each, then the saved
            state loaded into 1 rank read to the end of the epoch: blocks repeated / skipped.
  scale     first batch and peak RSS over the local output and over a --scale times larger copy made of
            hard links to the same shards (start-up and memory against corpus size).
  import    whether `import <lib>` loads torch.
Prints one table; --json writes the raw figures.
Each measurement runs in its own subprocess (`--task ...`) so imports and caches do not leak.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SEQ = 2048
BLOCK = SEQ + 1
BATCH = 8
EOS = "<|endoftext|>"
BUCKET = "libbench"


# ----------------------------------------------------------------------------------------- common pieces
def corpus_files(corpus: str) -> list[str]:
    return sorted(str(p) for p in Path(corpus).glob("*.jsonl.gz"))


def iter_texts(path: str):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_tokenizer(corpus: str, out: str, mb: int = 4) -> str:
    if os.path.exists(out):
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        n = 0
        for p in corpus_files(corpus):
            for t in iter_texts(p):
                n += len(t)
                yield t
                if n > mb * 2**20:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample(), trainers.BpeTrainer(vocab_size=8192, special_tokens=[EOS],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(out)
    return out


_TOK = None


def encode_file(path: str, tok_path: str):
    """Yield one uint16 array per document, EOS appended (the same stream for every library)."""
    import numpy as np
    from tokenizers import Tokenizer

    global _TOK
    if _TOK is None:
        _TOK = Tokenizer.from_file(tok_path)
    eos = _TOK.token_to_id(EOS)
    batch = []
    for t in iter_texts(path):
        batch.append(t)
        if len(batch) == 256:
            for e in _TOK.encode_batch(batch):
                yield np.array(e.ids + [eos], dtype=np.uint16)
            batch = []
    for e in _TOK.encode_batch(batch):
        yield np.array(e.ids + [eos], dtype=np.uint16)


def s3_opts(endpoint: str) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-west-2"}}


def set_aws_env(endpoint: str) -> None:
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-west-2",
                      AWS_REGION="us-west-2", AWS_ENDPOINT_URL=endpoint, S3_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")


def out_size(path: str, endpoint: str | None) -> int:
    if path.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**s3_opts(endpoint))
        return int(sum(v["size"] for v in fs.find(path, detail=True).values()))
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def block_hash(a) -> str:
    import numpy as np

    return hashlib.blake2b(np.asarray(a, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the box is shared: wall time is noisy)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime, 1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- litdata
if os.environ.get("LIBBENCH_LITDATA_HTTP"):  # module level: also runs in litdata's spawned optimize workers
    # litdata builds its obstore S3Store with fixed client_options (litdata/streaming/downloader.py,
    # _OBSTORE_CLIENT_OPTIONS / _build_obstore_s3_store) and no allow_http, so any http:// endpoint (moto,
    # MinIO without TLS) fails: "obstore.exceptions.GenericError: ... HTTP error: builder error".
    import litdata.streaming.downloader as _ldd

    _ldd._OBSTORE_CLIENT_OPTIONS = dict(_ldd._OBSTORE_CLIENT_OPTIONS, allow_http="true")

def _ld_fn(path):  # module level: litdata pickles it into its workers
    yield from encode_file(path, os.environ["LIBBENCH_TOK"])


def litdata_prepare(files, out, endpoint):
    import torch  # noqa: F401  (litdata imports it anyway)
    from litdata import TokensLoader, optimize

    kw = {"storage_options": {"endpoint_url": endpoint}} if out.startswith("s3://") else {}
    optimize(fn=_ld_fn, inputs=files, output_dir=out, chunk_size=BLOCK * 1024, item_loader=TokensLoader(),
             num_workers=2, mode="overwrite" if os.environ.get("LIBBENCH_OVERWRITE") else None, **kw)


def litdata_loader(src, cache, endpoint, rank=0, world=1):
    import litdata.utilities.env as env
    from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

    env._DistributedEnv.detect = classmethod(lambda cls: cls(world, rank, 1))  # simulated ranks, no process group
    kw = {"storage_options": {"endpoint_url": endpoint}} if src.startswith("s3://") else {}
    ds = StreamingDataset(src, cache_dir=cache if src.startswith("s3://") else None, item_loader=TokensLoader(block_size=BLOCK),
                          shuffle=True, seed=7, drop_last=True, **kw)  # default False on 1 rank, True on >1:
    # with the default, loading a 2-rank state on 1 rank raises "The provided `drop_last` state doesn't match"
    dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=1)
    return dl, (lambda b: [x.numpy() for x in b]), dl.state_dict, dl.load_state_dict


# --------------------------------------------------------------------------------------- mosaicml-streaming
def _mds_write(args):
    files, out, tok = args
    import numpy as np
    from streaming import MDSWriter

    buf = np.zeros(0, dtype=np.uint16)
    with MDSWriter(out=out, columns={"tokens": f"ndarray:uint16:{BLOCK}"}, size_limit="8mb") as w:
        for p in files:
            for doc in encode_file(p, tok):
                buf = np.concatenate([buf, doc])
                while len(buf) >= BLOCK:  # llm-foundry style: concatenate, cut fixed blocks, boundaries = EOS
                    w.write({"tokens": buf[:BLOCK]})
                    buf = buf[BLOCK:]


def mosaic_prepare(files, out, endpoint):
    from concurrent.futures import ProcessPoolExecutor

    from streaming.base.util import merge_index

    tok = os.environ["LIBBENCH_TOK"]
    halves = [files[0::2], files[1::2]]
    if out.startswith("s3://"):
        loc = os.environ["LIBBENCH_SCRATCH"] + "/mds_upload"
        shutil.rmtree(loc, ignore_errors=True)
        outs = [(f"{loc}/{k}", f"{out}/{k}") for k in range(2)]
    else:
        outs = [f"{out}/{k}" for k in range(2)]
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(_mds_write, [(h, o, tok) for h, o in zip(halves, outs, strict=True)]))
    if out.startswith("s3://"):
        merge_index((os.environ["LIBBENCH_SCRATCH"] + "/mds_merge", out), keep_local=False)
    else:  # keep_local=False on a plain local path deletes the whole output folder
        merge_index(out, keep_local=True)


def mosaic_loader(src, cache, endpoint, rank=0, world=1):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")  # streaming calls init_process_group itself
    from streaming import StreamingDataLoader, StreamingDataset

    if src.startswith("s3://"):
        ds = StreamingDataset(remote=src, local=cache, shuffle=True, shuffle_seed=7, batch_size=BATCH, num_canonical_nodes=1)
    else:
        ds = StreamingDataset(local=src, shuffle=True, shuffle_seed=7, batch_size=BATCH, num_canonical_nodes=1)
    dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=1)
    return dl, (lambda b: [x for x in b["tokens"].numpy()]), dl.state_dict, dl.load_state_dict


# ------------------------------------------------------------------------------------------------ datatrove
def datatrove_prepare(files, out, endpoint):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    folder = (out, s3_opts(endpoint)) if out.startswith("s3://") else out
    data_dir = str(Path(files[0]).parent)
    names = [Path(f).name for f in files]
    glob = "part-0000[01].jsonl.gz" if len(names) == 2 else "*.jsonl.gz"
    ex = LocalPipelineExecutor(
        pipeline=[JsonlReader(data_dir, glob_pattern=glob, text_key="text"),
                  DocumentTokenizer(folder, tokenizer_name_or_path=os.environ["LIBBENCH_TOK"], eos_token=EOS,
                                    shuffle_documents=False, batch_size=256)],
        tasks=len(names), workers=2, logging_dir=os.environ["LIBBENCH_SCRATCH"] + "/dt_logs/" + hashlib.md5(out.encode()).hexdigest()[:8])
    ex.run()


class _DtState:
    """datatrove has no loader state: the map-style dataset is indexed by the sample number, which we keep."""

    def __init__(self):
        self.consumed = 0  # global samples consumed


def datatrove_loader(src, cache, endpoint, rank=0, world=1, start=0):
    import torch
    from datatrove.utils.dataset import DatatroveFolderDataset

    folder = (src, s3_opts(endpoint)) if src.startswith("s3://") else src
    ds = DatatroveFolderDataset(folder, seq_len=SEQ, token_size=2, shuffle=True, seed=7, return_positions=True)
    idx = list(range(start + rank, len(ds), world))  # hand-written: contiguous reads, global position = one int
    # fork after s3fs was used in the parent (the file listing) fails in the worker with
    # "RuntimeError: This class is not fork-safe" (fsspec/asyn.py): spawn the worker for remote stores
    ctx = "spawn" if "://" in src and not src.startswith("file://") else None
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=idx, num_workers=1, multiprocessing_context=ctx)
    st = _DtState()
    st.consumed = start

    def state_dict():
        return {"consumed": st.consumed}

    def load_state_dict(s):
        raise RuntimeError("use start=")

    def conv(b):
        st.consumed += BATCH * world
        return [x.numpy() for x in b["input_ids"]]

    return dl, conv, state_dict, load_state_dict


def replicate(lib: str, src: str, dst: str, times: int) -> None:
    """A `times`-fold larger dataset of hard links to the same shards (start-up/memory vs corpus size)."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    s = Path(src)
    if lib == "datatrove":
        for r in range(times):
            for f in s.iterdir():
                os.link(f, f"{dst}/r{r:03d}_{f.name}")
        return
    idx = json.loads((s / "index.json").read_text())
    if lib == "litdata":
        chunks = []
        for r in range(times):
            for c in idx["chunks"]:
                os.link(s / c["filename"], f"{dst}/r{r:03d}-{c['filename']}")
                chunks.append(dict(c, filename=f"r{r:03d}-{c['filename']}"))
        idx["chunks"] = chunks
    else:  # mosaic: shards listed by basename in the root index.json
        shards = []
        for r in range(times):
            for sh in idx["shards"]:
                b = sh["raw_data"]["basename"]
                os.makedirs(os.path.dirname(f"{dst}/r{r:03d}/{b}"), exist_ok=True)
                os.link(s / b, f"{dst}/r{r:03d}/{b}")
                shards.append(dict(sh, raw_data=dict(sh["raw_data"], basename=f"r{r:03d}/{b}")))
        idx["shards"] = shards
    Path(dst, "index.json").write_text(json.dumps(idx))


LIBS = {
    "litdata": (litdata_prepare, litdata_loader, "litdata"),
    "mosaic": (mosaic_prepare, mosaic_loader, "streaming"),
    "datatrove": (datatrove_prepare, datatrove_loader, "datatrove"),
}


# -------------------------------------------------------------------------------------------------- tasks
def task_prepare(a):
    set_aws_env(a.s3) if a.s3 else None
    files = corpus_files(a.corpus)[: a.nfiles or None]
    t = time.perf_counter()
    LIBS[a.lib][0](files, a.out, a.s3)
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 1), "cpu_s": cpu_s(), "bytes": out_size(a.out, a.s3), "peak_rss_mb": round(peak_rss_mb())}


def _make(a, rank=0, world=1, start=0):
    kw = {"start": start} if a.lib == "datatrove" else {}
    return LIBS[a.lib][1](a.out, a.cache, a.s3, rank, world, **kw)


def task_read(a):
    set_aws_env(a.s3) if a.s3 else None
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dl, conv, _, _ = _make(a)
    n = 0
    first = None
    for b in dl:
        blocks = conv(b)
        if first is None:
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
        else:
            n += sum(len(x) for x in blocks)
        if n >= a.read_tokens:
            break
    dt = time.perf_counter() - t1
    return {"first_batch_s": round(first, 2), "tokens_per_s": int(n / dt), "tokens": n, "cpu_s": cpu_s(),
            "peak_rss_mb": round(peak_rss_mb())}


def task_resume(a):
    """Mode 'same': K batches, state, new loader, M batches vs uninterrupted. Mode 'rank': one rank of a world."""
    import torch

    torch.set_num_threads(1)
    K, M = a.k, a.m
    if a.mode == "same":
        dl, conv, sd, _ = _make(a)
        ref = []
        for i, b in enumerate(dl):
            ref += [block_hash(x) for x in conv(b)]
            if i + 1 == K + M:
                break
        del dl
        dl, conv, sd, _ = _make(a)
        it = iter(dl)
        for _ in range(K):
            conv(next(it))
        state = sd()
        del it, dl
        kw = {"start": state["consumed"]} if a.lib == "datatrove" else {}
        dl, conv, _, load = LIBS[a.lib][1](a.out, a.cache, a.s3, 0, 1, **kw)
        if a.lib != "datatrove":
            load(state)
        got = []
        for i, b in enumerate(dl):
            got += [block_hash(x) for x in conv(b)]
            if i + 1 == M:
                break
        return {"exact": got == ref[K * BATCH:], "matching_blocks": sum(x == y for x, y in zip(got, ref[K * BATCH:], strict=False)),
                "compared": len(got)}
    if a.mode == "rank":  # rank `a.rank` of `a.world`, K batches, write its state + hashes
        dl, conv, sd, _ = _make(a, a.rank, a.world)
        seen = []
        it = iter(dl)
        for _ in range(K):
            seen += [block_hash(x) for x in conv(next(it))]
        state = sd()
        return {"seen": seen, "state": json.loads(json.dumps(state, default=str))}
    if a.mode == "finish":  # 1 rank, load a.state, read to the end of the epoch
        state = json.loads(Path(a.state).read_text())
        kw = {"start": state["consumed"]} if a.lib == "datatrove" else {}
        dl, conv, _, load = LIBS[a.lib][1](a.out, a.cache, a.s3, 0, 1, **kw)
        if a.lib != "datatrove":
            try:
                load(state)
            except Exception as e:  # noqa: BLE001
                return {"error": f"{type(e).__name__}: {e}"[:400]}
        seen = []
        for b in dl:
            seen += [block_hash(x) for x in conv(b)]
        return {"seen": seen}
    if a.mode == "all":  # full uninterrupted epoch on 1 rank
        dl, conv, _, _ = _make(a)
        return {"seen": [block_hash(x) for b in dl for x in conv(b)]}
    raise SystemExit(a.mode)


def task_import(a):
    t = time.perf_counter()
    __import__(LIBS[a.lib][2])
    return {"imports_torch": "torch" in sys.modules, "import_s": round(time.perf_counter() - t, 2)}


# ------------------------------------------------------------------------------------------------ driver
def sub(args: list[str], env=None, timeout=1800, background=False):
    cmd = [sys.executable, __file__, *args]
    e = dict(os.environ, **(env or {}))
    if background:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    return _result(p.returncode, p.stdout, p.stderr)


def _result(rc, out, err):
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = [ln for ln in err.splitlines() if ln.strip()][-3:]
    return {"error": f"rc={rc}: " + " | ".join(tail)[-600:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=False)
    ap.add_argument("--work", default="/tmp/libbench")
    ap.add_argument("--s3", default=None, help="S3 endpoint URL (moto), e.g. http://127.0.0.1:5601")
    ap.add_argument("--libs", default="litdata,mosaic,datatrove")
    ap.add_argument("--steps", default="import,prepare,read,resume,scale")
    ap.add_argument("--read-tokens", type=int, default=20_000_000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--torchvision-stub", action="store_true", help="stub torchvision for `import streaming`")
    ap.add_argument("--scale", type=int, default=28, help="replication factor for the 'scale' step")
    ap.add_argument("--no-litdata-patch", dest="litdata_patch", action="store_false",
                    help="do not patch litdata's obstore client to allow http:// endpoints (shows the failure)")
    # internal
    ap.add_argument("--task")
    ap.add_argument("--lib")
    ap.add_argument("--out")
    ap.add_argument("--cache")
    ap.add_argument("--nfiles", type=int, default=0)
    ap.add_argument("--mode")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--state")
    a = ap.parse_args()
    if a.task:
        r = {"prepare": task_prepare, "read": task_read, "resume": task_resume, "import": task_import}[a.task](a)
        print("RESULT " + json.dumps(r), flush=True)
        os._exit(0)  # some loaders leave worker/prefetch threads behind

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(a.corpus, str(work / "tokenizer.json"))
    env0 = {"LIBBENCH_TOK": tok, "LIBBENCH_SCRATCH": str(work / "scratch")}
    if a.torchvision_stub:
        stub = work / "stubs" / "torchvision"
        (stub / "transforms").mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text("")
        (stub / "datasets.py").write_text("class VisionDataset:\n    pass\n\n\nclass CIFAR10:\n    pass\n")
        (stub / "transforms" / "__init__.py").write_text("")
        (stub / "transforms" / "functional.py").write_text("def to_tensor(x):\n    raise NotImplementedError\n")
        env0["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "stubs"), os.environ.get("PYTHONPATH")]))
    if a.s3:
        import s3fs

        set_aws_env(a.s3)
        fs = s3fs.S3FileSystem(**s3_opts(a.s3))
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
    steps = a.steps.split(",")
    res: dict = {}
    for lib in a.libs.split(","):
        r = res[lib] = {}
        local, small, remote = str(work / lib / "full"), str(work / lib / "small"), f"s3://{BUCKET}/{lib}"
        base = ["--corpus", a.corpus, "--lib", lib] + (["--s3", a.s3] if a.s3 else [])
        env = dict(env0, **({"LIBBENCH_LITDATA_HTTP": "1"} if lib == "litdata" and a.s3 and a.s3.startswith("http:") and a.litdata_patch else {}))
        if "import" in steps:
            r["import"] = sub(["--task", "import", "--lib", lib], env)
        if "prepare" in steps:
            for name, out, extra in [("local", local, []), ("small", small, ["--nfiles", "2"])] + ([("s3", remote, [])] if a.s3 else []):
                if not out.startswith("s3://"):
                    shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(work / "scratch" / "dt_logs", ignore_errors=True) if name == "local" else None
                r[f"prepare_{name}"] = sub(["--task", "prepare", "--out", out, *base, *extra], env)
                print(lib, name, r[f"prepare_{name}"], flush=True)
            r["prepare_again"] = sub(["--task", "prepare", "--out", local, *base], env)
            print(lib, "again", r["prepare_again"], flush=True)
        if "read" in steps:
            for name, src in [("local", local)] + ([("s3", remote)] if a.s3 else []):
                cache = str(work / "cache" / lib / name)
                shutil.rmtree(cache, ignore_errors=True)
                r[f"read_{name}"] = sub(["--task", "read", "--out", src, "--cache", cache, "--read-tokens", str(a.read_tokens), *base], env)
                print(lib, "read", name, r[f"read_{name}"], flush=True)
        if "resume" in steps:
            cache = str(work / "cache" / lib / "resume")
            rb = ["--out", small, "--cache", cache, *base]
            r["resume_same"] = sub(["--task", "resume", "--mode", "same", *rb], env)
            print(lib, "resume same", r["resume_same"], flush=True)
            allb = sub(["--task", "resume", "--mode", "all", *rb], env)
            ps = [sub(["--task", "resume", "--mode", "rank", "--rank", str(k), "--world", "2", *rb], env, background=True) for k in range(2)]
            ranks = []
            for p in ps:
                o, e = p.communicate(timeout=900)
                ranks.append(_result(p.returncode, o, e))
            out = {"epoch_blocks": len(allb.get("seen", []))}
            if all("seen" in x for x in ranks) and "seen" in allb:
                sp = work / "scratch" / f"{lib}_state.json"
                sp.parent.mkdir(parents=True, exist_ok=True)
                sp.write_text(json.dumps(ranks[0]["state"]))
                fin = sub(["--task", "resume", "--mode", "finish", "--state", str(sp), *rb], env)
                if "seen" in fin:
                    before = ranks[0]["seen"] + ranks[1]["seen"]
                    after = fin["seen"]
                    allset = set(allb["seen"])
                    out.update(two_rank_disjoint=not (set(ranks[0]["seen"]) & set(ranks[1]["seen"])),
                               before=len(before), after=len(after),
                               repeated=len(before) + len(after) - len(set(before) | set(after)),
                               skipped=len(allset - set(before) - set(after)))
                else:
                    out["error"] = fin.get("error")
            else:
                out["error"] = [x.get("error") for x in ranks + [allb] if "error" in x]
            r["resume_2to1"] = out
            print(lib, "resume 2->1", out, flush=True)
        if "scale" in steps:  # same loader, 1x and Nx the corpus (hard links), local: first batch + RSS
            for times in (1, a.scale):
                dst = str(work / lib / f"x{times}")
                replicate(lib, local, dst, times)
                r[f"scale_x{times}"] = sub(["--task", "read", "--out", dst, "--cache", str(work / "cache" / lib / f"x{times}"),
                                            "--read-tokens", "2000000", *base], env)
                print(lib, "scale", times, r[f"scale_x{times}"], flush=True)
                shutil.rmtree(dst, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    global SCALE
    SCALE = a.scale
    print_table(res)


SCALE = 28


def print_table(res):
    def g(d, *ks):
        for k in ks:
            if not isinstance(d, dict) or k not in d:
                return "-"
            d = d[k]
        return d

    rows = [("imports torch", "import", "imports_torch"),
            ("prepare local s", "prepare_local", "seconds"), ("prepare local CPU s", "prepare_local", "cpu_s"), ("output MB", "prepare_local", "bytes"),
            ("prepare S3 s", "prepare_s3", "seconds"), ("prepare S3 CPU s", "prepare_s3", "cpu_s"), ("re-run same prepare s", "prepare_again", "seconds"),
            ("first batch local s", "read_local", "first_batch_s"), ("tokens/s local", "read_local", "tokens_per_s"),
            ("read RSS MB local", "read_local", "peak_rss_mb"),
            ("first batch S3 s", "read_s3", "first_batch_s"), ("tokens/s S3", "read_s3", "tokens_per_s"),
            ("read RSS MB S3", "read_s3", "peak_rss_mb"),
            ("first batch 1x s", "scale_x1", "first_batch_s"), ("RSS 1x MB", "scale_x1", "peak_rss_mb"),
            ("first batch Nx s", f"scale_x{SCALE}", "first_batch_s"), ("RSS Nx MB", f"scale_x{SCALE}", "peak_rss_mb"),
            ("resume exact (1 rank)", "resume_same", "exact"),
            ("2->1 repeated blocks", "resume_2to1", "repeated"), ("2->1 skipped blocks", "resume_2to1", "skipped"),
            ("epoch blocks (small)", "resume_2to1", "epoch_blocks")]
    libs = list(res)
    print("\n| measure | " + " | ".join(libs) + " |\n|---|" + "---|" * len(libs))
    for label, *ks in rows:
        vals = []
        for lib in libs:
            v = g(res[lib], *ks)
            if v == "-" and isinstance(res[lib].get(ks[0]), dict) and "error" in res[lib][ks[0]]:
                v = "error"
            if ks[-1] == "bytes" and isinstance(v, int):
                v = round(v / 2**20, 1)
            vals.append(str(v))
        print(f"| {label} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
