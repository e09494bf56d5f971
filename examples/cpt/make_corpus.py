"""Write a synthetic domain corpus (invented case law) for continual pre-training, deterministically.

    python examples/cpt/make_corpus.py OUT_DIR --mb 20           # ~20 MB of text in jsonl.gz files
    python examples/cpt/make_corpus.py OUT_DIR --mb 1200 --files 64 --workers 2   # ~300M tokens

Each file is ``part-NNNNN.jsonl.gz`` with one ``{"text": ...}`` record per document (a ruling
of 150-1,500 words). The text is templated prose over a fixed legal vocabulary plus the domain
terms of ``domain_terms.txt`` (``tokenizer.add_tokens`` in examples/cpt-domain.yaml), so a tiny
model visibly learns it and the added tokens occur often. About 4 characters make one token
with a large BPE, so ``--mb 1200`` is ~300M tokens; a small trained BPE splits finer.

Every file derives from ``random.Random((SEED, file index))``: the bytes of file k depend only
on the script, k and ``--mb/--files``, so files are written in parallel and a rerun is identical.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SEED = 20261207
HERE = Path(__file__).resolve().parent
TERMS = tuple(t.strip() for t in (HERE / "domain_terms.txt").read_text().splitlines()
              if t.strip() and not t.startswith("#"))

COURTS = ("the Appellate Bench of Varnholt", "the High Court of Ostrelia", "the Circuit Court of Lindmere",
          "the Tribunal of Quessary", "the Supreme Court of Ardenvale", "the District Court of Morwick")
PARTIES = ("Halloran", "Vesk Shipping", "the Crown", "Dunmore Holdings", "Abernathy", "the Municipality",
           "Trelawny Mills", "Okonkwo", "the Revenue Office", "Castellan Freight", "Marsh", "Pemberton & Sons")
ISSUES = ("breach of contract", "negligent misstatement", "unjust enrichment", "a disputed easement",
          "wrongful dismissal", "the carriage of goods by sea", "a defective lease", "trademark dilution",
          "an insurance subrogation claim", "the sale of unascertained goods", "a restrictive covenant")
VERBS = ("held", "found", "concluded", "observed", "reasoned", "declined to accept", "affirmed", "noted")
CONNECT = ("Moreover", "However", "Accordingly", "In the alternative", "Furthermore", "Consequently",
           "On the facts", "By contrast", "It follows that")
WORDS = ("the claimant", "the respondent", "the tribunal", "the statute", "the covenant", "the contract",
         "the evidence", "the authorities", "the appeal", "the lower court", "the duty of care", "the remedy",
         "the limitation period", "the burden of proof", "the consideration", "the undertaking", "damages",
         "equity", "the precedent", "the doctrine", "the defence", "the injunction", "the parties")


def _sentence(rng: random.Random) -> str:
    a, b = rng.choice(WORDS), rng.choice(WORDS)
    term = rng.choice(TERMS)
    form = rng.randrange(5)
    if form == 0:
        return f"{rng.choice(CONNECT)}, the court {rng.choice(VERBS)} that {a} was bound by {term}."
    if form == 1:
        return f"Applying {term}, {a} could not displace {b}."
    if form == 2:
        return f"The doctrine of {term} was {rng.choice(VERBS)} in relation to {b}."
    if form == 3:
        return f"{rng.choice(CONNECT)}, {a} relied on {term} and on {rng.choice(TERMS)}."
    return f"Counsel for {a} submitted that {b} engaged {term}, which the bench {rng.choice(VERBS)}."


def ruling(rng: random.Random, number: int) -> str:
    court, p1, p2, issue = rng.choice(COURTS), rng.choice(PARTIES), rng.choice(PARTIES), rng.choice(ISSUES)
    head = (f"{p1} v {p2} [{1950 + number % 75}] case {number}. Before {court}. "
            f"The matter concerned {issue}.")
    paragraphs = []
    for _ in range(rng.randint(3, 20)):
        paragraphs.append(" ".join(_sentence(rng) for _ in range(rng.randint(3, 8))))
    verdict = rng.choice(("The appeal is allowed.", "The appeal is dismissed.", "Judgment for the claimant.",
                          "The matter is remitted for rehearing."))
    return head + "\n\n" + "\n\n".join(paragraphs) + "\n\n" + verdict


def write_file(out: str, k: int, target_bytes: int) -> tuple[str, int]:
    rng = random.Random(SEED * 1_000_003 + k)
    path = Path(out) / f"part-{k:05d}.jsonl.gz"
    tmp = path.with_name(path.name + ".tmp")
    written, doc = 0, 0
    # mtime=0: the gzip header holds no time, so the bytes are the same on every run
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as fh:
        while written < target_bytes:
            text = ruling(rng, k * 1_000_000 + doc)
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            fh.write(line.encode())
            written += len(text)
            doc += 1
    os.replace(tmp, path)
    return str(path), written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write part-NNNNN.jsonl.gz files into")
    ap.add_argument("--mb", type=float, default=20, help="megabytes of text in all (default 20)")
    ap.add_argument("--files", type=int, default=8, help="number of files (default 8)")
    ap.add_argument("--workers", type=int, default=1, help="processes writing files at once")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    per_file = int(args.mb * 1e6 / args.files)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        done = list(pool.map(write_file, [args.out] * args.files, range(args.files), [per_file] * args.files))
    total = sum(n for _, n in done)
    print(f"wrote {len(done)} files, {total / 1e6:.1f} MB of text, to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
