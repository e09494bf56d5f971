"""A prepared corpus on any fsspec store: token shards, their indexes and a manifest (torch-free).

``ftcluster prepare-data`` writes it, the streaming data source reads it, the planner counts its
tokens. Layout under the corpus URI::

    prepare.json            what is being prepared (written first, before any shard): the sources
                            (path, size, version key), the tokenizer fingerprint and vocabulary size,
                            the settings. A rerun compares it and refuses a changed source or tokenizer.
    tokenizer/              the tokenizer that made the ids (save_pretrained), extended tokens included
    shards/<name>.tokens    little-endian token ids (uint16 when the vocabulary fits, else uint32),
                            the documents back to back; each document is bos? + text + eos
    shards/<name>.index     an .npz: ``doc_ends`` (int64, cumulative token ends of the documents) and
                            ``page_crc`` (uint32, crc32 of every PAGE_TOKENS tokens of the .tokens file)
    done/<source>.json      a source file's commit marker: its shards (tokens, documents, sha256 of both
                            files) and the source's sha256; written after its shards
    manifest.json           written last: every shard in order and the totals. A corpus without it is
                            incomplete and is not trained on.

Shard ``s000123-0004`` is part 4 of source file 123 (the sources sorted by path): shards never mix
files, so a task that owns a set of files owns their shards, and a rerun redoes only the files
without a marker. A reader verifies each index against its sha256 in the manifest, and every page
of tokens it reads against its crc32, so a corrupted shard stops training with its name before a
bad token reaches the model.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import TrainError
from ..storage.uri import fs_and_path, one_line, put_bytes

FORMAT = "ftcluster-corpus"
VERSION = 1
PAGE_TOKENS = 4096  # tokens per crc32 page: a 2048-token block reads at most 3 pages
MANIFEST = "manifest.json"
PREPARE = "prepare.json"
TOKENIZER_DIR = "tokenizer"
SHARDS_DIR = "shards"
DONE_DIR = "done"


class CorpusError(TrainError):
    """A prepared corpus is missing, incomplete, corrupted or does not match the run."""


def dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype for a vocabulary: uint16 up to 65,536 ids, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(source_index: int, part: int) -> str:
    return f"s{source_index:06d}-{part:04d}"


def done_name(source_index: int) -> str:
    return f"{DONE_DIR}/s{source_index:06d}.json"


def page_crcs(tokens: np.ndarray) -> np.ndarray:
    """crc32 of every PAGE_TOKENS tokens of ``tokens`` (little-endian bytes), the last page short."""
    raw = np.ascontiguousarray(tokens).view(np.uint8)
    step = PAGE_TOKENS * tokens.itemsize
    return np.fromiter((zlib.crc32(raw[i:i + step].tobytes()) for i in range(0, raw.size, step)), dtype=np.uint32,
                       count=(raw.size + step - 1) // step)


def encode_index(doc_ends: np.ndarray, tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, doc_ends=np.asarray(doc_ends, dtype=np.int64), page_crc=page_crcs(tokens))
    return buf.getvalue()


def decode_index(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ends, page_crc) of an index file's bytes."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return z["doc_ends"], z["page_crc"]
    except Exception as exc:  # noqa: BLE001 - a corrupted index is one line naming it
        raise CorpusError(f"{where}: not a corpus index ({one_line(exc)}); prepare the corpus again") from exc


def sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Shard:
    name: str
    tokens: int
    documents: int
    sha256: str  # of the .tokens file
    index_sha256: str  # of the .index file
    source: int  # index of the source file in the sorted source list

    @property
    def tokens_path(self) -> str:
        return f"{SHARDS_DIR}/{self.name}.tokens"

    @property
    def index_path(self) -> str:
        return f"{SHARDS_DIR}/{self.name}.index"


@dataclass
class Manifest:
    """The committed description of a prepared corpus (``manifest.json``)."""

    dtype: str
    vocab_size: int
    tokenizer_fingerprint: str
    shards: list[Shard]
    sources: list[dict[str, Any]]  # {path, size, sha256}
    text_field: str = "text"
    format: str = FORMAT
    version: int = VERSION
    page_tokens: int = PAGE_TOKENS
    created_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["tokens"], data["documents"] = self.tokens, self.documents
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
            if int(data.get("version", 0)) > VERSION:
                raise CorpusError(f"{where}: corpus format version {data['version']} is newer than this "
                                  f"ftcluster reads ({VERSION}); upgrade ftcluster")
            data.pop("tokens", None)
            data.pop("documents", None)
            data["shards"] = [Shard(**s) for s in data["shards"]]
            return cls(**data)
        except CorpusError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CorpusError(f"{where}: not an ftcluster corpus manifest ({one_line(exc)}); "
                              "prepare the corpus with `ftcluster prepare-data`") from exc


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}"


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None, *, fs: Any = None,
                  root: str | None = None) -> Manifest | None:
    """The manifest of the corpus at ``uri``; None when there is none (not a corpus, or unfinished)."""
    if fs is None or root is None:
        fs, root = fs_and_path(uri, storage_options)
    path = join(root, MANIFEST)
    try:
        raw = fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or a file: not a corpus
        return None
    except Exception as exc:  # noqa: BLE001
        raise CorpusError(f"{uri}: cannot read {MANIFEST}: {one_line(exc)}; check the URI, endpoint and "
                          "credentials") from exc
    return Manifest.from_json(raw, f"{uri}/{MANIFEST}")


def has_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, root = fs_and_path(uri, storage_options)
    try:
        return bool(fs.exists(join(root, MANIFEST)))
    except Exception:  # noqa: BLE001 - unreachable stores are reported by whoever reads the data
        return False


def write_shard(fs: Any, root: str, name: str, tokens: np.ndarray, doc_ends: np.ndarray,
                source: int) -> Shard:
    """Write one shard's .tokens and .index (each a single PUT, or a rename on a local disk)."""
    raw = np.ascontiguousarray(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False)).tobytes()
    index = encode_index(doc_ends, tokens)
    shard = Shard(name=name, tokens=int(tokens.size), documents=int(len(doc_ends)), sha256=sha256(raw),
                  index_sha256=sha256(index), source=source)
    put_bytes(fs, join(root, shard.tokens_path), raw)
    put_bytes(fs, join(root, shard.index_path), index)
    return shard


def check_pages(data: bytes, itemsize: int, first_page: int, crcs: np.ndarray, where: str) -> None:
    """Check ``data``, whole pages of a .tokens file from ``first_page`` on, against their crc32s."""
    step = PAGE_TOKENS * itemsize
    for k, start in enumerate(range(0, len(data), step)):
        page = first_page + k
        if page >= len(crcs) or zlib.crc32(data[start:start + step]) != int(crcs[page]):
            raise CorpusError(f"{where}: tokens {page * PAGE_TOKENS:,}-{(page + 1) * PAGE_TOKENS - 1:,} fail their "
                              "crc32 check: the shard is corrupted; nothing from it was trained on. Prepare the "
                              "corpus again into a new URI (or delete the shard's done/ marker and rerun "
                              "`ftcluster prepare-data`, which redoes only that source file)")


def put_json(fs: Any, root: str, rel: str, data: dict[str, Any]) -> None:
    put_bytes(fs, join(root, rel), json.dumps(data, indent=1, sort_keys=True).encode())


def streamed(data: Any) -> bool:
    """Does a spec's ``data`` section stream a prepared corpus? ``data.streaming`` says, else whether
    ``data.train`` holds a manifest.json (one HEAD on object stores)."""
    if data.streaming is not None:
        return bool(data.streaming)
    return has_manifest(data.train, data.storage_options)


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of everything that decides a tokenizer's ids: its full serialized state (vocabulary,
    merges, normalizer, pre-tokenizer, added and special tokens) and its length. Duck-typed on a
    transformers tokenizer, so this module stays free of transformers."""
    import hashlib

    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary, in id order
        h.update(json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1])).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tok, "special_tokens_map", {}).items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(str(len(tok)).encode())
    return h.hexdigest()
