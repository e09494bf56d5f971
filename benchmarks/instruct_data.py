"""Synthetic instruction data with a realistic length spread, for the packing-vs-padding benchmark.

    python benchmarks/instruct_data.py OUT.jsonl [--profile sharegpt] [--records 3000] [--seed 0]

Writes ftcluster's ``instruction`` format (``{instruction, input, output}``, one JSON object a
line), deterministically from ``--seed``. Prompt and answer lengths, in tokens, are drawn from
two independent log-normals per profile, parametrised by their mean and the sigma of the log:
``mu = ln(mean) - sigma**2 / 2``.

Profiles (an ASSUMPTION, not a fit to the raw data, which cannot be downloaded here): the means
are the per-example averages that Wang et al., "How Far Can Camels Go? Exploring the State of
Instruction Tuning on Open Resources" (2023), Table 1, gives in Llama tokens, as recalled, not
re-checked; they agree with the Hugging Face dataset cards' sizes (Alpaca: ~48 MB for 52,002
records with every text twice, ~4 characters a token). The sigmas are chosen so the tails look
like those sets' published length histograms (a long right tail; ShareGPT past 2,048):

- ``alpaca`` (Alpaca, 52K single-turn): prompt mean 28 tokens (sigma 0.7), answer mean 65
  (sigma 0.9); ~106 tokens per example with the template, bos and eos; none near 2,048.
- ``sharegpt`` (ShareGPT, multi-turn, flattened to one prompt and one answer): 3.2 rounds of
  71 prompt + 358 answer tokens, so prompt mean 227 (sigma 1.0), answer mean 1,146 (sigma 0.9);
  ~1,390 tokens before truncation, 18 % longer than 2,048 (truncated by ftcluster, so the
  mean that trains at seq_len 2,048 is ~1,140).
- ``smoke``: prompt 8, answer 16 tokens: the CPU smoke case (tiny model, seq 128).

Text is lowercase words from a fixed list with a period after every ninth word. A byte-level
BPE trained on this data (``tokenizer.train_vocab_size`` >= ~700; it stops at ~674 ids) learns
every word, with and without its leading space, as one token, and the period is one token, so
a text meant as N tokens is N tokens, and an example is prompt + answer + 12 (bos, the
``### Instruction:``/``### Response:`` template, eos), its labels answer + 1 (``tests/unit/train/test_instruct_data.py`` checks the lengths through ftcluster's own tokenizer
and ``build_examples``). A smaller vocabulary (the smoke case's 400) splits words, so lengths
come out ~2x longer there. The random-init model does not care what the words say.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train import WORDS as _WORDS  # noqa: E402 - benchmarks/ is on sys.path

WORDS = sorted({w.lower() for w in _WORDS})
# profile -> ((prompt mean, sigma), (answer mean, sigma)), in tokens of the text alone
PROFILES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "alpaca": ((28.0, 0.7), (65.0, 0.9)),
    "sharegpt": ((227.0, 1.0), (1146.0, 0.9)),
    "smoke": ((8.0, 0.5), (16.0, 0.6)),
}
MAX_TOKENS = 8192  # a cap on one field; the tail beyond seq_len is truncated by ftcluster anyway


def lognormal_tokens(rng: random.Random, mean: float, sigma: float) -> int:
    return max(1, min(MAX_TOKENS, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma))))


def words_text(rng: random.Random, n_tokens: int) -> str:
    """Exactly ``n_tokens`` tokens once every word is a token: 9 words then a period, repeated."""
    out: list[str] = []
    for k in range(n_tokens):
        if k % 10 == 9:
            out[-1] += "."
        else:
            out.append(rng.choice(WORDS))
    return " ".join(out)


def records(profile: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` instruction records; ``prompt_tokens``/``answer_tokens`` are the lengths intended."""
    (pm, ps), (am, asig) = PROFILES[profile]
    rng = random.Random(f"{profile}:{seed}")
    out = []
    for _ in range(n):
        p, a = lognormal_tokens(rng, pm, ps), lognormal_tokens(rng, am, asig)
        out.append({"instruction": words_text(rng, p), "input": "", "output": words_text(rng, a),
                    "prompt_tokens": p, "answer_tokens": a})
    return out


def write(path: Path, profile: str, n: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        for r in records(profile, n, seed):
            fh.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="sharegpt")
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write(a.out, a.profile, a.records, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
