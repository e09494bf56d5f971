"""The tokenizer of a run: a folder (local or fetched once per node), a Hub id, or trained here.

Training (``tokenizer.train_vocab_size``, or a ``random_init`` model without a tokenizer) builds
a byte-level BPE with ``tokenizers`` on the training texts. It is deterministic, done once per
node under a file lock and cached under ``cache_dir/bpe-<hash>`` keyed by the texts, the vocab
size and the format, so every rank and every node gets the same ids without a download.

Domain terms (``tokenizer.add_tokens``) and special tokens (``tokenizer.add_special_tokens``) are
added last, in the spec's order, to whichever tokenizer that is (:func:`extend`): training and
``prepare-data`` call :func:`load_or_train_tokenizer`, so both tokenize with the same ids, and
:func:`ftcluster.corpus.format.tokenizer_fingerprint` tells a corpus prepared with another
tokenizer apart (and a checkpoint trained with another: :class:`TokenizerPart`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import TrainError
from ..storage.fetch import fetch_dir, file_lock
from .data import instruction_prompt, iter_records

log = logging.getLogger("ftcluster.train")

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
# Assistant turns end with eos and nothing else, so that the learned part is "answer + eos".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MAX_TRAIN_CHARS = 200_000_000  # enough for a BPE vocabulary; bounds time and memory on big corpora
FORMAT_VERSION = "1"  # bump when the training recipe changes, to invalidate caches


def load_or_train_tokenizer(spec: Any, cache_dir: Path) -> Any:
    """The tokenizer for ``spec`` with pad/eos (and bos when trained here) and, for chat, a template."""
    t, m = spec.tokenizer, spec.model
    cache_dir = Path(cache_dir)
    models_cache = cache_dir.parent / "models"
    if t.path:
        tok = _from_folder(fetch_dir(t.path, m.storage_options, models_cache), "tokenizer.path")
    elif t.hub_id:
        tok = _from_hub(t.hub_id, None, False, "tokenizer.hub_id")
    elif t.train_vocab_size:
        tok = train_tokenizer(spec, t.train_vocab_size, cache_dir)
    elif m.path:
        tok = _from_folder(fetch_dir(m.path, m.storage_options, models_cache), "model.path")
    elif m.hub_id:
        tok = _from_hub(m.hub_id, m.revision, m.trust_remote_code, "model.hub_id")
    else:
        tok = train_tokenizer(spec, m.random_init.vocab_size, cache_dir)
    return extend(_finish(tok, spec.data.format), t, m.storage_options)


def _from_folder(folder: Path, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{where}: no usable tokenizer in {folder} ({str(exc).splitlines()[0]}); "
                         "point tokenizer.path at a folder with tokenizer.json") from exc


def _from_hub(hub_id: str, revision: str | None, trust: bool, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hub_id, revision=revision, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{where}: cannot load the tokenizer of {hub_id!r} ({str(exc).splitlines()[0]})") from exc


def _finish(tok: Any, fmt: str) -> Any:
    if tok.eos_token is None:
        raise TrainError("tokenizer: it has no eos token; choose another tokenizer or set tokenizer.train_vocab_size")
    if tok.pad_token is None:
        # Padding is masked out of attention and loss, so reusing eos adds no embedding row.
        tok.pad_token = tok.eos_token
        log.info("tokenizer: no pad token; padding with eos (%s)", tok.eos_token)
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
        log.info("tokenizer: no chat template; using ftcluster's simple <|role|> template")
    return tok


# ----------------------------------------------------------------------------- added tokens


def spec_terms(tokenizer_spec: Any, storage_options: dict[str, Any] | None = None) -> list[str]:
    """``tokenizer.add_tokens`` as a list: the spec's list, or the terms file read here (the loader
    put a file it could see into the spec already; this one is on the machine the job runs on, or
    at a URI read with ``storage_options``)."""
    from ..spec.terms import FIELD, TermsFileError, parse_terms, read_terms
    from ..storage.uri import fs_and_path, is_local

    terms = tokenizer_spec.add_tokens
    if not isinstance(terms, str):
        return list(terms)
    try:
        if is_local(terms):
            return read_terms(terms)
        fs, path = fs_and_path(terms, storage_options)
        return parse_terms(fs.cat_file(path).decode("utf-8"))
    except TermsFileError as exc:
        raise TrainError(f"{FIELD}: {exc}; give a file of one term per line or a list of terms") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainError(f"{FIELD}: {terms}: cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def extend(tok: Any, tokenizer_spec: Any, storage_options: dict[str, Any] | None = None) -> Any:
    """``tok`` with the spec's terms and special tokens added, in order; tokens the vocabulary holds
    already are not added again (logged). Sets ``tok.ftcluster_base_vocab``: its size without the
    spec's tokens, also when ``tok`` was saved with them already (a prepared corpus's tokenizer, an
    adapter's): the ids at its end that the spec lists do not count."""
    terms, specials = spec_terms(tokenizer_spec, storage_options), list(tokenizer_spec.add_special_tokens)
    tok.ftcluster_base_vocab = _size_without(tok, set(terms) | set(specials))
    if not terms and not specials:
        return tok
    vocab = tok.get_vocab()
    for what, items, special in (("tokenizer.add_tokens", terms, False),
                                 ("tokenizer.add_special_tokens", specials, True)):
        new = [t for t in dict.fromkeys(items) if t not in vocab]  # first occurrence, spec order
        present = [t for t in dict.fromkeys(items) if t in vocab]
        if present:
            log.info("%s: %d already in the vocabulary, not added again: %s", what, len(present),
                     ", ".join(present[:10]) + (" ..." if len(present) > 10 else ""))
        if new:
            tok.add_tokens(new, special_tokens=special)
            vocab = tok.get_vocab()
    log.info("tokenizer: %d tokens added by the spec (vocabulary %d -> %d)", len(tok) - tok.ftcluster_base_vocab,
             tok.ftcluster_base_vocab, len(tok))
    return tok


def _size_without(tok: Any, listed: set[str]) -> int:
    """``len(tok)`` less the added tokens at its end that ``listed`` names."""
    size = len(tok)
    if not listed:
        return size
    by_id = {i: t for t, i in tok.get_added_vocab().items()}
    while size > 0 and by_id.get(size - 1) in listed:
        size -= 1
    return size


# ----------------------------------------------------------------------------- training


def training_texts(records: Iterable[dict[str, Any]], data_spec: Any) -> list[str]:
    """The texts a BPE is trained on: what the model will read, formatted as the data format says."""
    f, fmt = data_spec.fields, data_spec.format
    texts: list[str] = []
    total = 0
    for r in records:
        if fmt == "text":
            t = str(r.get(f.text, ""))
        elif fmt == "instruction":
            t = instruction_prompt(str(r.get(f.instruction, "")), str(r.get(f.input) or "")) + str(r.get(f.output, ""))
        else:
            msgs = r.get(f.messages) or []
            t = "\n".join(f"<|{m.get('role')}|>\n{m.get('content', '')}" for m in msgs if isinstance(m, dict))
        texts.append(t)
        total += len(t)
        if total >= MAX_TRAIN_CHARS:
            log.info("tokenizer: training on the first %d records (%d characters)", len(texts), total)
            break
    return texts


def train_tokenizer(spec: Any, vocab_size: int, cache_dir: Path) -> Any:
    """A byte-level BPE trained on ``spec.data.train`` (cached per node; deterministic)."""
    from transformers import PreTrainedTokenizerFast

    ds = spec.data
    specials = [PAD, BOS, EOS] + [f"<|{r}|>" for r in ROLES]
    if vocab_size < 256 + len(specials):
        raise TrainError(f"tokenizer.train_vocab_size: a byte-level BPE needs at least {256 + len(specials)} "
                         f"tokens (256 bytes + {len(specials)} special); got {vocab_size}")
    # Streamed: training_texts stops at MAX_TRAIN_CHARS, so a large corpus is never held whole. The copy of
    # the spec `ftcluster prepare-data` trains on reads the raw source (data.prepare), .txt/.md files included.
    records = iter_records(ds.train, ds.file_format, ds.storage_options, text_field=ds.fields.text,
                           text_files=ds.prepare is not None)
    texts = training_texts(records, ds)
    h = hashlib.sha256(f"{FORMAT_VERSION}|{vocab_size}|{ds.format}|".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    folder = Path(cache_dir) / f"bpe-{vocab_size}-{h.hexdigest()[:16]}"
    with file_lock(Path(cache_dir) / f"{folder.name}.lock"):
        if not (folder / "tokenizer.json").exists():
            _train_into(folder, texts, vocab_size, specials)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    tok.chat_template = tok.chat_template or CHAT_TEMPLATE
    return tok


def _train_into(folder: Path, texts: list[str], vocab_size: int, specials: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    log.info("training a byte-level BPE tokenizer (vocab %d) on %d texts", vocab_size, len(texts))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=specials[3:], clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_tokenizer_folder(folder: Path, spec: Any, where: str) -> Any:
    """A saved tokenizer folder, finished for ``spec`` as :func:`load_or_train_tokenizer` finishes one
    (the spec's added tokens too: a corpus prepared with them holds them already)."""
    tok = _finish(_from_folder(Path(folder), where), spec.data.format)
    t = getattr(spec, "tokenizer", None)  # a spec's data section alone (tests) has no additions
    return tok if t is None else extend(tok, t, spec.model.storage_options)


# ----------------------------------------------------------------------------- in checkpoints


class TokenizerPart:
    """The run's tokenizer as a checkpoint part (``checkpoints/step-N/tokenizer/``): every checkpoint
    carries the vocabulary its weights were trained with, added tokens included. On resume the
    saved one must be the run's (the same fingerprint): rows trained for one set of ids mean
    nothing under another. A checkpoint written before tokenizers were saved loads as before."""

    resharding = "global"  # rank 0 saves it, the same on every rank: resumes on any number of processes

    def __init__(self, tok: Any):
        self.tok = tok

    def save(self, folder: Path, rank: int, writer: Any = None) -> None:
        if rank != 0:
            return
        if writer is not None:
            writer.write("tokenizer", lambda: self.tok.save_pretrained(str(folder)))
        else:
            self.tok.save_pretrained(str(folder))

    def load(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        from ..corpus.format import tokenizer_fingerprint

        if not (folder / "tokenizer_config.json").exists():
            return  # rank 0 alone writes it; an older checkpoint has none
        saved = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        # The runtime sets pad and the chat template after loading (_finish); compare like with like.
        if saved.pad_token is None and self.tok.pad_token == self.tok.eos_token:
            saved.pad_token = saved.eos_token
        if tokenizer_fingerprint(saved) != tokenizer_fingerprint(self.tok):
            extra = sorted(set(saved.get_vocab()) ^ set(self.tok.get_vocab()))
            raise TrainError(f"output.uri: the checkpoint in {folder.parent.name} was trained with another tokenizer "
                             f"({len(saved)} tokens; this run has {len(self.tok)}"
                             + (f"; differing: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "")
                             + "); keep tokenizer.add_tokens as it was, or write to a new output.uri")
