"""``ftcluster prepare-data``'s worker: tokenize a raw corpus once into a prepared corpus.

``python -m ftcluster.train.prepare (--spec PAYLOAD.json | --spec-env VAR) [--task I --tasks N] [--workers W]``

The layout is :mod:`ftcluster.corpus.format`'s. One invocation is one task: it lists the sources
(``data.prepare.source``, sorted), writes ``prepare.json`` or refuses a rerun whose sources or tokenizer
changed, saves the tokenizer once, then prepares the source files it owns (``I, I+N, I+2N, ...``) over
``W`` processes: each file is streamed, its documents tokenized in batches, stored as
``bos? + ids + eos`` and cut into shards at document boundaries, then its ``done/`` marker is written.
A file whose marker matches is skipped, so a killed prepare redoes only unfinished files. Every task
ends by finalizing: when every source has a marker, it checks the shards and writes ``manifest.json``
(deterministic bytes, so tasks finishing together write the same file). No separate final job is needed.

Exit status: 0 done (this task's files; the manifest when it was the last); 1 on an error, one line on
stderr (the traceback with FTCLUSTER_DEBUG=1). Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..corpus.format import (
    DONE_DIR,
    FORMAT,
    MANIFEST,
    PREPARE,
    TOKENIZER_DIR,
    VERSION,
    CorpusError,
    Manifest,
    Shard,
    done_name,
    dtype_for,
    join,
    put_json,
    shard_name,
    tokenizer_fingerprint,
    write_shard,
)
from ..errors import TrainError
from ..storage.testhook import signal_at
from ..storage.uri import fs_and_path, put_file

BATCH_DOCS = 512  # documents tokenized per call (the fast tokenizer's batch)
BATCH_CHARS = 4 << 20  # ... or fewer, when they add up to this many characters
READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One raw source file: its fsspec path, the URI shown and recorded, size and version key."""

    path: str
    uri: str
    size: int
    key: str

    def record(self) -> dict[str, Any]:
        return {"path": self.uri, "size": self.size, "key": self.key}


@dataclass(frozen=True)
class Job:
    """What every process of a task needs (picklable: spawned workers get it as an argument)."""

    corpus: str
    storage_options: dict[str, Any]
    sources: tuple[Source, ...]
    file_format: str
    text_field: str
    shard_tokens: int
    dtype: str
    tokenizer_dir: str  # a local folder every worker loads the tokenizer from
    bos: int | None
    eos: int


def _log(msg: str) -> None:
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- sources


def _version_key(fs: Any, path: str, info: dict[str, Any]) -> str:
    """What changes when the file's content does: the object's ETag on object stores, else its mtime."""
    for name in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified"):
        if info.get(name) is not None:
            value = info[name]
            return f"{name}:{value.isoformat() if hasattr(value, 'isoformat') else value}"
    return f"ukey:{fs.ukey(path)}"


def list_sources(source: str, file_format: str, storage_options: dict[str, Any]) -> tuple[Any, list[Source]]:
    """The filesystem and the sorted source files ``source`` names (TrainError naming it when none match)."""
    from .data import resolve_files

    fs, files = resolve_files(source, file_format, storage_options, text_files=True)
    fs.invalidate_cache()
    out = []
    for path in files:
        info = fs.info(path)
        out.append(Source(path=path, uri=fs.unstrip_protocol(path), size=int(info.get("size") or 0),
                          key=_version_key(fs, path, info)))
    return fs, out


# ----------------------------------------------------------------------------- prepare.json


def _fingerprint(folder: Path, spec: Any) -> str:
    """The tokenizer's identity as training will see it: loaded back from the folder saved with the
    corpus, the way a run loads it (:func:`ftcluster.train.stream.load_corpus_tokenizer`)."""
    from .tokenizer import load_tokenizer_folder

    return tokenizer_fingerprint(load_tokenizer_folder(folder, spec, "the prepared tokenizer"))


def plan_record(job: Job, fingerprint: str, vocab_size: int) -> dict[str, Any]:
    """The content of ``prepare.json``: what is being prepared."""
    return {"format": FORMAT, "version": VERSION, "sources": [s.record() for s in job.sources],
            "tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size, "dtype": job.dtype,
            "shard_tokens": job.shard_tokens, "text_field": job.text_field, "file_format": job.file_format}


def _short(value: Any) -> str:
    text = str(value)
    return text[:16] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def plan_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a corpus's ``prepare.json`` and this run's, each with both values."""
    changes = []
    before = {s["path"]: s for s in old.get("sources", [])}
    now = {s["path"]: s for s in new["sources"]}
    changes += [f"source {p} was added" for p in now if p not in before]
    changes += [f"source {p} was removed" for p in before if p not in now]
    for p in now:
        if p in before:
            for k in ("size", "key"):
                if before[p].get(k) != now[p][k]:
                    what = "size" if k == "size" else "version"
                    changes.append(f"source {p} changed: {what} {before[p].get(k)} -> {now[p][k]}")
    if old.get("tokenizer_fingerprint") != new["tokenizer_fingerprint"]:
        changes.append(f"tokenizer changed: fingerprint {_short(old.get('tokenizer_fingerprint'))} -> "
                       f"{_short(new['tokenizer_fingerprint'])} (vocabulary {old.get('vocab_size')} -> "
                       f"{new['vocab_size']})")
    for k in ("shard_tokens", "text_field", "file_format", "format", "version"):  # dtype follows the vocabulary
        if old.get(k) != new[k]:
            changes.append(f"{k} changed: {old.get(k)} -> {new[k]}")
    return changes


def check_or_write_plan(fs: Any, root: str, job: Job, record: dict[str, Any]) -> None:
    """Write ``prepare.json``, or refuse a corpus started with other sources, tokenizer or settings."""
    path = join(root, PREPARE)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raw = None
    if raw is None:
        put_json(fs, root, PREPARE, record)
        return
    try:
        old = json.loads(raw)
    except ValueError as exc:
        raise CorpusError(f"{job.corpus}/{PREPARE}: not JSON ({exc}); delete the corpus folder and prepare again") from exc
    changes = plan_changes(old, record)
    if changes:
        more = f" (and {len(changes) - 2} more)" if len(changes) > 2 else ""
        raise CorpusError(f"{job.corpus}: refusing to mix corpora: {'; '.join(changes[:2])}{more}, since "
                          f"{PREPARE} was written; prepare into a new output URI (data.train), or delete "
                          f"{job.corpus} to start over")


def save_tokenizer(fs: Any, root: str, local_dir: Path) -> None:
    """``<corpus>/tokenizer/`` once: tokenizer.json is uploaded last, so its presence means complete."""
    target = join(root, TOKENIZER_DIR)
    if fs.exists(join(target, "tokenizer.json")):
        return
    files = sorted((p for p in local_dir.iterdir() if p.is_file()), key=lambda p: (p.name == "tokenizer.json", p.name))
    for f in files:
        put_file(fs, f, join(target, f.name))


# ----------------------------------------------------------------------------- one source file


class _Hashing(io.RawIOBase):
    """A raw reader that hashes every byte read through it (the source's sha256, computed while reading)."""

    def __init__(self, fh: Any):
        self.fh, self.sha = fh, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.fh.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        return n

    def drain(self) -> str:
        while self.readinto(bytearray(READ_BLOCK)):
            pass
        return self.sha.hexdigest()


class ShardWriter:
    """Documents in, shards of at most ``cap`` tokens out, cut at document boundaries; a document longer
    than ``cap`` is cut into pieces that each fill a shard (each piece then counts as a document)."""

    def __init__(self, fs: Any, root: str, source: int, cap: int, dtype: str):
        self.fs, self.root, self.source, self.cap, self.dtype = fs, root, source, cap, np.dtype(dtype)
        self.parts: list[np.ndarray] = []
        self.ends: list[int] = []
        self.n = 0
        self.shards: list[Shard] = []

    def add(self, ids: list[int]) -> None:
        doc = np.asarray(ids, dtype=np.int64)
        if doc.size and (doc.max() > np.iinfo(self.dtype).max or doc.min() < 0):
            raise CorpusError(f"token id {int(doc.max())} does not fit {self.dtype} (the tokenizer's length "
                              "understates its ids); report it with the tokenizer's name")
        doc = doc.astype(self.dtype)
        while doc.size:
            room = self.cap - self.n
            if doc.size > room and self.n:
                self.flush()  # start the document in a shard of its own
                continue
            piece, doc = doc[:room], doc[room:]
            self.parts.append(piece)
            self.n += int(piece.size)
            self.ends.append(self.n)
            if self.n == self.cap:
                self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        tokens = np.concatenate(self.parts)
        name = shard_name(self.source, len(self.shards))
        self.shards.append(write_shard(self.fs, self.root, name, tokens, np.asarray(self.ends, dtype=np.int64),
                                       self.source))
        self.parts, self.ends, self.n = [], [], 0


def _documents(fs: Any, src: Source, fmt: str, text_field: str) -> tuple[Any, Any]:
    """(texts of the file, a function giving the file's sha256 once they are read)."""
    import fsspec.compression
    from fsspec.utils import infer_compression

    from .data import file_records

    if fmt == "parquet":  # pyarrow seeks: hash in a pass of its own
        def sha() -> str:
            h = hashlib.sha256()
            with fs.open(src.path, "rb") as fh:
                for block in iter(lambda: fh.read(READ_BLOCK), b""):
                    h.update(block)
            return h.hexdigest()
        records = file_records(fs, src.path, fmt, src.uri, text_field)
    else:
        hashing = _Hashing(fs.open(src.path, "rb", block_size=READ_BLOCK))
        stream: Any = io.BufferedReader(hashing, READ_BLOCK)
        compression = infer_compression(src.path)
        if compression:
            stream = fsspec.compression.compr[compression](stream, mode="rb")
        records = file_records(fs, src.path, fmt, src.uri, text_field, fh=stream)

        def sha() -> str:
            digest = hashing.drain()
            hashing.fh.close()
            return digest

    def texts():
        for k, rec in enumerate(records, 1):
            if text_field not in rec or rec[text_field] is None:
                raise TrainError(f"{src.uri}: record {k} has no field {text_field!r} (it has {sorted(rec)}); set "
                                 "data.fields.text to the field that holds the text")
            value = rec[text_field]
            if isinstance(value, str):
                yield value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield str(value)
            else:
                raise TrainError(f"{src.uri}: record {k}: field {text_field!r} holds a {type(value).__name__}, "
                                 "expected text; set data.fields.text to the field that holds the text")
    return texts(), sha


def _batches(texts: Any):
    batch: list[str] = []
    chars = 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(folder: str) -> Any:
    if folder not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[folder] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _TOKENIZERS[folder]


def marker_matches(fs: Any, root: str, src: Source, index: int) -> bool:
    """Is source ``index`` committed: its marker names this very file and its shards are all there?"""
    try:
        marker = json.loads(fs.cat_file(join(root, done_name(index))))
        if {k: marker.get(k) for k in ("path", "size", "key")} != src.record():
            return False
        shards, dtype = [Shard(**s) for s in marker["shards"]], np.dtype(marker["dtype"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or damaged: prepare the file again
        return False
    return not shard_problems(fs, root, shards, dtype)


def shard_problems(fs: Any, root: str, shards: list[Shard], dtype: np.dtype) -> list[str]:
    """The shards whose files are missing or of the wrong size."""
    problems = []
    for s in shards:
        try:
            size = fs.size(join(root, s.tokens_path))
            has_index = fs.exists(join(root, s.index_path))
        except FileNotFoundError:
            size, has_index = None, False
        if size != s.tokens * dtype.itemsize or not has_index:
            problems.append(f"{s.name} ({'missing' if size is None or not has_index else f'{size} bytes, expected {s.tokens * dtype.itemsize}'})")
    return problems


def prepare_file(job: Job, index: int) -> tuple[int, int, int, bool]:
    """Prepare source ``index`` (skipped when its marker matches): (index, tokens, documents, skipped)."""
    fs, root = fs_and_path(job.corpus, job.storage_options)
    src = job.sources[index]
    if marker_matches(fs, root, src, index):
        marker = json.loads(fs.cat_file(join(root, done_name(index))))
        return index, int(marker["tokens"]), int(marker["documents"]), True
    from .data import file_format_of

    tok = _tokenizer(job.tokenizer_dir)
    src_fs, _ = fs_and_path(src.uri, job.storage_options)
    texts, sha = _documents(src_fs, src, file_format_of(src.path, job.file_format, text_files=True), job.text_field)
    writer = ShardWriter(fs, root, index, job.shard_tokens, job.dtype)
    bos = [job.bos] if job.bos is not None else []
    eos = [job.eos]
    docs = 0
    for batch in _batches(texts):
        for ids in tok(batch, add_special_tokens=False)["input_ids"]:
            writer.add(bos + list(ids) + eos)
            docs += 1
    writer.flush()
    tokens = sum(s.tokens for s in writer.shards)
    marker = {**src.record(), "sha256": sha(), "source": index, "dtype": job.dtype, "tokens": tokens,
              "documents": docs, "shards": [asdict(s) for s in writer.shards]}
    put_json(fs, root, done_name(index), marker)
    signal_at("prepare-file-committed")  # test-only: a prepare killed after its first committed file
    return index, tokens, docs, False


def _init_worker() -> None:
    """One thread per process: the processes are the parallelism. Set before torch is imported (if it ever
    is: tokenizing does not need it, and importing it would cost every worker seconds)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _prepare_one(args: tuple[Job, int]) -> tuple[int, int, int, bool]:
    return prepare_file(*args)


def run_files(job: Job, owned: list[int], workers: int) -> None:
    """Prepare the ``owned`` source files over ``workers`` processes, with a progress line per file."""
    start, tokens, done = time.monotonic(), 0, 0
    items = [(job, i) for i in owned]
    if workers <= 1 or len(owned) <= 1:
        results = map(_prepare_one, items)
        pool = None
    else:
        import multiprocessing

        # forkserver/spawn, not fork: the tokenizers library's threads do not survive a fork.
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(owned)), initializer=_init_worker)
        results = pool.imap_unordered(_prepare_one, items)
    try:
        for index, n, docs, skipped in results:
            done += 1
            tokens += 0 if skipped else n
            rate = tokens / max(time.monotonic() - start, 1e-9)
            what = "already committed, skipped" if skipped else f"{n:,} tokens, {docs:,} documents"
            _log(f"file {done}/{len(owned)} {job.sources[index].uri}: {what}; {tokens:,} tokens at {rate:,.0f} tokens/s")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


# ----------------------------------------------------------------------------- finalize


def finalize(job: Job, fingerprint: str, vocab_size: int) -> Manifest | None:
    """Write ``manifest.json`` when every source has its marker (None while some are missing)."""
    fs, root = fs_and_path(job.corpus, job.storage_options)
    fs.invalidate_cache()
    markers = []
    for i, src in enumerate(job.sources):
        try:
            marker = json.loads(fs.cat_file(join(root, done_name(i))))
        except FileNotFoundError:
            return None
        if {k: marker.get(k) for k in ("path", "size", "key")} != src.record():
            return None
        markers.append(marker)
    shards = [Shard(**s) for m in markers for s in m["shards"]]
    bad = shard_problems(fs, root, shards, np.dtype(job.dtype))
    if bad:
        raise CorpusError(f"{job.corpus}: shard(s) {', '.join(bad[:3])} listed in {DONE_DIR}/ are missing or "
                          "truncated; delete their done/ markers and rerun `ftcluster prepare-data`")
    manifest = Manifest(dtype=job.dtype, vocab_size=vocab_size, tokenizer_fingerprint=fingerprint, shards=shards,
                        sources=[{"path": m["path"], "size": m["size"], "sha256": m["sha256"]} for m in markers],
                        text_field=job.text_field, created_by=f"ftcluster {__version__} prepare-data",
                        extra={"shard_tokens": job.shard_tokens, "file_format": job.file_format})
    data = manifest.to_json()
    try:
        same = fs.cat_file(join(root, MANIFEST)) == data
    except FileNotFoundError:
        same = False
    if not same:
        from ..storage.uri import put_bytes

        put_bytes(fs, join(root, MANIFEST), data)
    _log(f"{job.corpus}: {MANIFEST} {'already complete' if same else 'written'}: {len(manifest.shards)} shards, "
         f"{manifest.tokens:,} tokens, {manifest.documents:,} documents")
    return manifest


# ----------------------------------------------------------------------------- a task


def prepare_spec(spec: Any) -> Any:
    """The spec whose tokenizer prepare uses: ``data.train`` is the raw source, so a tokenizer trained here
    (``tokenizer.train_vocab_size``, or a random_init model without one) learns from the corpus itself."""
    p = spec.data.prepare
    data = spec.data.model_copy(update={"train": p.source, "file_format": p.file_format})
    return spec.model_copy(update={"data": data})


def run_task(spec: Any, task: int = 0, tasks: int = 1, workers: int = 1,
             cache_dir: Path | None = None) -> Manifest | None:
    """Prepare task ``task`` of ``tasks``: its files, then the manifest if every file is done."""
    from .tokenizer import load_or_train_tokenizer

    ds, p = spec.data, spec.data.prepare
    if p is None:
        raise TrainError("data.prepare: not set; add data.prepare.source (the raw corpus) to the spec")
    if not 0 <= task < tasks:
        raise TrainError(f"--task {task}: must be in 0..{tasks - 1} (--tasks {tasks})")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _, sources = list_sources(p.source, p.file_format, ds.storage_options)
    cache_dir = Path(cache_dir or os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster")
    tok = load_or_train_tokenizer(prepare_spec(spec), cache_dir / "tokenizers")
    vocab = len(tok)
    fs, root = fs_and_path(ds.train, ds.storage_options)
    with tempfile.TemporaryDirectory(prefix="ftc-prepare-tok-") as tmp:
        tok.save_pretrained(tmp)
        fingerprint = _fingerprint(Path(tmp), spec)
        job = Job(corpus=ds.train, storage_options=dict(ds.storage_options), sources=tuple(sources),
                  file_format=p.file_format, text_field=ds.fields.text, shard_tokens=p.shard_tokens,
                  dtype=dtype_for(vocab), tokenizer_dir=tmp, bos=tok.bos_token_id, eos=tok.eos_token_id)
        check_or_write_plan(fs, root, job, plan_record(job, fingerprint, vocab))
        save_tokenizer(fs, root, Path(tmp))
        _TOKENIZERS[tmp] = tok  # this process tokenizes with the very object it fingerprinted
        owned = list(range(task, len(sources), tasks))
        _log(f"task {task}/{tasks}: {len(owned)} of {len(sources)} source file(s), {workers} process(es), "
             f"into {ds.train}")
        try:
            run_files(job, owned, workers)
        finally:
            _TOKENIZERS.pop(tmp, None)
    manifest = finalize(job, fingerprint, vocab)
    if manifest is None:
        _log(f"task {task}/{tasks}: done; other tasks' files are not all committed yet, the last task to "
             f"finish writes {MANIFEST}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    from .__main__ import one_line_errors, read_payload

    parser = argparse.ArgumentParser(prog="python -m ftcluster.train.prepare", description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="payload JSON file written by ftcluster (payload.json)")
    src.add_argument("--spec-env", help="name of an environment variable holding the payload JSON")
    parser.add_argument("--task", type=int, default=None, help="this task's index (default: $JOB_COMPLETION_INDEX "
                        "of a Kubernetes indexed Job, else $SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--tasks", type=int, default=1, help="how many tasks share the source files")
    parser.add_argument("--workers", type=int, default=None, help="processes on this machine (default: CPU cores)")
    parser.add_argument("--json", action="store_true", help="print the manifest's totals as JSON on stdout")
    args = parser.parse_args(argv)

    def body() -> int:
        from ..spec.loader import spec_from_dict

        spec = spec_from_dict(read_payload(args.spec, args.spec_env)["spec"])
        p = spec.data.prepare
        workers = args.workers or (p.workers if p is not None and p.workers else len(os.sched_getaffinity(0)))
        task = args.task if args.task is not None else int(
            os.environ.get("JOB_COMPLETION_INDEX") or os.environ.get("SLURM_ARRAY_TASK_ID") or 0)
        manifest = run_task(spec, task, args.tasks, workers)
        if args.json:
            out = {"uri": spec.data.train, "complete": manifest is not None}
            if manifest is not None:
                out.update(shards=len(manifest.shards), tokens=manifest.tokens, documents=manifest.documents)
            print(json.dumps(out), flush=True)
        return 0

    return one_line_errors(body)


if __name__ == "__main__":
    sys.exit(main())
