"""Generate the small example datasets in this folder, deterministically (no download).

    python examples/data/make_data.py            # (re)write the files
    python examples/data/make_data.py --check    # exit 1 if a checked-in file differs (CI)

Files (JSON Lines, UTF-8, one record per line):

    instruct.jsonl        1600 instruction records {instruction, input, output}: arithmetic, facts about
                          invented countries, string operations. Templated and regular, so the tiny
                          quickstart model visibly learns them within 60 LoRA steps.
    instruct_eval.jsonl   200 held-out records from the same generators (no record also in the train set).
    general_eval.jsonl    general English prose {text}, unrelated to the tasks: its loss before and
                          after fine-tuning shows forgetting.
    chat.jsonl            300 conversations {messages: [{role, content}]}, 1-3 user/assistant turns,
                          sometimes a system turn (format: chat).
    text.jsonl            300 short documents {text} (format: text).

Everything derives from ``random.Random(SEED)`` streams and fixed word lists, so the bytes only
change when this script changes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

SEED = 20261129
HERE = Path(__file__).resolve().parent

WORDS = (
    "apple river stone cloud garden window candle forest bridge mirror silver pocket rabbit lantern "
    "harbor meadow thunder basket pepper ladder marble castle feather violin shadow planet ribbon "
    "orange pillow rocket saddle tunnel whistle anchor butter carpet dragon engine falcon ginger "
    "hammer island jacket kettle lemon magnet needle oyster parrot quartz rocket spider tomato "
    "umbrella velvet walnut yellow zipper copper dinner helmet jungle koala lizard mango napkin "
    "olive puzzle quiet rubber sugar timber vessel winter yogurt zebra button cactus donkey ember"
).split()
WORDS = sorted(set(WORDS))

SYLL_A = ["ka", "lo", "mi", "ve", "ta", "ro", "sa", "ni", "du", "be", "zo", "fi", "ga", "pe", "lu", "ry"]
SYLL_B = ["ran", "dor", "vel", "mis", "tor", "lia", "nor", "sk", "vin", "dal", "ria", "mont", "gar", "ost"]


def _names(rng: random.Random, n: int, suffixes: list[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        name = (rng.choice(SYLL_A) + rng.choice(SYLL_A) + rng.choice(suffixes)).capitalize()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def world(rng: random.Random) -> list[dict[str, str]]:
    """Invented countries with a capital, a language and a national animal."""
    countries = _names(rng, 40, ["ria", "land", "stan", "via", "nia", "ora"])
    capitals = _names(rng, 60, SYLL_B)
    capitals = [c for c in capitals if c not in countries][:40]
    animals = ["fox", "owl", "bear", "lynx", "heron", "otter", "wolf", "crane", "stag", "hare"]
    return [{"country": c, "capital": capitals[i], "language": c[:-3].rstrip("aeiou") + "ish",
             "animal": animals[i % len(animals)]} for i, c in enumerate(countries)]


# --------------------------------------------------------------------------- task generators
# Each returns (instruction, input, output).

Task = Callable[[random.Random], tuple[str, str, str]]


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a = rng.randint(0, 60)
        b = rng.randint(0, a)
        return f"What is {a} minus {b}?", "", f"{a} minus {b} is {a - b}."
    if kind == 2:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"What is {a} times {b}?", "", f"{a} times {b} is {a * b}."
    n = rng.randint(0, 99)
    return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def facts(rng: random.Random, table: list[dict[str, str]]) -> tuple[str, str, str]:
    f = rng.choice(table)
    kind = rng.randrange(4)
    if kind == 0:
        return f"What is the capital of {f['country']}?", "", f"The capital of {f['country']} is {f['capital']}."
    if kind == 1:
        return f"Which country has {f['capital']} as its capital?", "", f"{f['capital']} is the capital of {f['country']}."
    if kind == 2:
        return f"What language is spoken in {f['country']}?", "", f"People in {f['country']} speak {f['language']}."
    return f"What is the national animal of {f['country']}?", "", f"The national animal of {f['country']} is the {f['animal']}."


def strings(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    kind = rng.randrange(5)
    if kind == 0:
        return "Reverse the word.", w, w[::-1]
    if kind == 1:
        return "Write the word in capital letters.", w, w.upper()
    if kind == 2:
        return "Spell the word with dashes between the letters.", w, "-".join(w)
    if kind == 3:
        return "How many letters does the word have?", w, f"{w} has {len(w)} letters."
    return "What is the first letter of the word?", w, f"The first letter of {w} is {w[0]}."


def lists(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(0, 30) for _ in range(rng.randint(3, 5))]
    kind = rng.randrange(3)
    shown = ", ".join(map(str, nums))
    if kind == 0:
        return "Sort the numbers from smallest to largest.", shown, ", ".join(map(str, sorted(nums)))
    if kind == 1:
        return "What is the largest number in the list?", shown, f"The largest number is {max(nums)}."
    n = rng.randint(0, 98)
    return f"What number comes after {n}?", "", f"After {n} comes {n + 1}."


def task_stream(seed: int, table: list[dict[str, str]]) -> Iterator[tuple[str, str, str]]:
    rng = random.Random(seed)
    tasks: list[Task] = [arithmetic, lambda r: facts(r, table), strings, lists]
    while True:
        yield rng.choice(tasks)(rng)


def instruction_sets(table: list[dict[str, str]], n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Unique train records, then eval records that are not in the train set."""
    seen: set[tuple[str, str, str]] = set()
    train: list[dict] = []
    for t in task_stream(SEED + 1, table):
        if len(train) == n_train:
            break
        if t not in seen:
            seen.add(t)
            train.append({"instruction": t[0], "input": t[1], "output": t[2]})
    ev: list[dict] = []
    for t in task_stream(SEED + 2, table):
        if len(ev) == n_eval:
            break
        if t not in seen:
            seen.add(t)
            ev.append({"instruction": t[0], "input": t[1], "output": t[2]})
    return train, ev


def user_turn(instruction: str, inp: str) -> str:
    return f"{instruction} {inp}".strip() if not inp else f"{instruction}\n{inp}"


def chats(table: list[dict[str, str]], n: int) -> list[dict]:
    rng = random.Random(SEED + 3)
    stream = task_stream(SEED + 4, table)
    systems = ["You are a helpful assistant.", "Answer briefly and exactly.", "You know the atlas of invented lands."]
    out = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.4:
            msgs.append({"role": "system", "content": rng.choice(systems)})
        for _ in range(rng.randint(1, 3)):
            ins, inp, ans = next(stream)
            msgs += [{"role": "user", "content": user_turn(ins, inp)}, {"role": "assistant", "content": ans}]
        out.append({"messages": msgs})
    return out


def documents(table: list[dict[str, str]], n: int) -> list[dict]:
    rng = random.Random(SEED + 5)
    out = []
    for _ in range(n):
        f = rng.choice(table)
        g = rng.choice(table)
        sents = [f"{f['country']} is a small country whose capital is {f['capital']}.",
                 f"Most people there speak {f['language']}, and the {f['animal']} is the national animal.",
                 f"Travellers often go from {f['capital']} to {g['capital']}, the capital of {g['country']}.",
                 f"In {g['country']} people speak {g['language']}."]
        rest = sents[1:]
        rng.shuffle(rest)
        out.append({"text": " ".join([sents[0], *rest[: rng.randint(1, 3)]])})
    return out


GENERAL = [
    "Bread rises because yeast turns sugar into carbon dioxide, which gets trapped in the dough.",
    "A good cup of tea depends on fresh water, the right temperature and patience while it steeps.",
    "Many birds fly south in autumn, following routes that their parents used for generations.",
    "The library opens at nine in the morning and closes early on Sundays.",
    "Rain in the mountains feeds the rivers that water the farms in the valley below.",
    "When you learn a new language, short daily practice helps more than long weekly sessions.",
    "The old bridge was repaired last summer, and now cyclists cross it every morning.",
    "Tomatoes grow best in warm soil with plenty of sun and regular watering.",
    "A map is only useful if you know where you are standing when you read it.",
    "The museum keeps its oldest paintings in a dark room to protect the colours from light.",
    "Children often ask why the sky is blue; sunlight scatters in the air, and blue scatters most.",
    "The train was late, so the passengers waited on the platform and talked about the weather.",
    "Writing a clear letter takes time: first the main point, then the details, then a kind ending.",
    "In winter the lake freezes, and on clear days families walk across it to the island.",
    "A healthy breakfast might include fruit, grains and something with protein.",
    "The engineer checked every bolt before the crane lifted the heavy steel beam.",
    "Music can change the mood of a room faster than almost anything else.",
    "After the storm, the neighbours helped each other clear the fallen branches from the road.",
    "Saving a little money every month adds up to a useful amount after a few years.",
    "The market is busiest on Saturday, when farmers bring vegetables, cheese and flowers.",
    "Good shoes matter on a long hike, and so does a map, water and a warm layer.",
    "The teacher read the story aloud while the class listened quietly.",
    "Honey never really spoils if it is kept sealed, dry and away from heat.",
    "Most plants need light, water and air, but they also need time to grow roots.",
    "The city added new bus lines so that people could reach the hospital more easily.",
    "A quiet walk in the park can clear your head after a long day at work.",
    "Cats sleep for much of the day and become more active in the evening.",
    "The recipe asks for two eggs, a cup of flour and a pinch of salt.",
    "Before painting a wall, clean it, fill the holes and let everything dry.",
    "The festival ended with fireworks over the harbour and music until midnight.",
    "Clocks were once set by the sun, until railways needed the same time in every town.",
    "A small garden can feed a family with herbs and salad for much of the year.",
    "The river carries sand to the sea, where it slowly builds long beaches.",
    "People who read before sleep often say they rest better than those who watch screens.",
    "The doctor advised drinking more water and taking short walks after meals.",
    "Snow fell all night, and in the morning the whole village was white and silent.",
]


def general(n: int) -> list[dict]:
    rng = random.Random(SEED + 6)
    return [{"text": " ".join(rng.sample(GENERAL, rng.randint(2, 4)))} for _ in range(n)]


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def build() -> dict[str, str]:
    table = world(random.Random(SEED))
    train, ev = instruction_sets(table, 1600, 200)
    return {
        "instruct.jsonl": render(train),
        "instruct_eval.jsonl": render(ev),
        "general_eval.jsonl": render(general(60)),
        "chat.jsonl": render(chats(table, 300)),
        "text.jsonl": render(documents(table, 300)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this script)")
    args = ap.parse_args(argv)
    stale = []
    for name, text in build().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8", newline="\n")
    if stale:
        print(f"{', '.join(stale)}: out of date; run python examples/data/make_data.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
