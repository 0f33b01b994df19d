"""A deterministic long-document retrieval data set: passkeys and needles in 2K-8K tokens.

Two kinds of case, each a long document with one fact hidden at a given depth and a question
about it; the prompt ends with the start of the answer, so a greedy continuation should begin
with the hidden number:

- ``passkey``: the classic repeated filler ("The grass is green. ...") around
  "The pass key is NNNNN. Remember it. NNNNN is the pass key.";
- ``needle``: varied generated sentences around "The secret number of the <adj> <animal> is
  NNNNN.", asked by name (other adjective/animal pairs appear in the filler without numbers).

`make_cases` builds the full grid (6 lengths x 5 depths x 2 kinds = 60 cases by default) with a
seeded ``random.Random``: the same seed and tokenizer always give the same prompts and token
ids. Lengths are measured with the tokenizer the cases are built for (the prompt, chat template
included, is at most ``target_tokens`` long and within one filler sentence of it).

Run ``python benchmarks/passkey.py --tokenizer PATH`` to print a summary of the grid.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any

LENGTHS = (2048, 3072, 4096, 5120, 6144, 8192)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
KINDS = ("passkey", "needle")

_PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
_PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
_NEEDLE_INTRO = (
    "Read the following notes carefully. One of them gives the secret number of an animal. "
    "I will ask you about it."
)
_ADJ = (
    "red", "quiet", "golden", "tiny", "brave", "sleepy", "silver", "clever", "striped", "ancient",
    "purple", "gentle", "wild", "frozen", "lucky", "hungry",
)  # fmt: skip
_ANIMALS = (
    "fox", "owl", "otter", "falcon", "tortoise", "badger", "heron", "lynx", "beetle", "whale",
    "pony", "salmon", "gecko", "moose", "raven", "panda",
)  # fmt: skip
_PLACES = (
    "near the old mill", "by the river", "in the northern valley", "at the harbour",
    "behind the library", "on the hill", "in the market square", "under the bridge",
    "along the coast", "in the orchard",
)  # fmt: skip
_VERBS = (
    "was seen walking", "spent the morning", "rested for an hour", "searched for food",
    "watched the clouds", "listened to the rain", "waited patiently", "built a small nest",
)  # fmt: skip
_EXTRAS = (
    "The weather was mild and the wind came from the west.",
    "Many visitors wrote about it in their travel journals.",
    "Nobody could remember a calmer season than that one.",
    "The local school organised a small exhibition about the region.",
    "Farmers said the harvest would be early this year.",
    "A light fog covered the fields until noon.",
    "The council repainted the fences along the main road.",
    "Children collected smooth stones and colourful leaves.",
)


@dataclass(frozen=True)
class Case:
    """One prompt: ``input_ids`` (``len == num_tokens <= target_tokens``) and the expected
    ``answer`` (a 5-digit number written as text)."""

    case_id: str
    kind: str
    target_tokens: int
    depth: float
    answer: str
    prompt: str
    input_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def _needle_sentence(rng: random.Random, avoid: tuple[str, str]) -> str:
    while True:
        adj, animal = rng.choice(_ADJ), rng.choice(_ANIMALS)
        if (adj, animal) != avoid:
            break
    if rng.random() < 0.3:
        return rng.choice(_EXTRAS)
    return f"The {adj} {animal} {rng.choice(_VERBS)} {rng.choice(_PLACES)}."


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _wrap(tokenizer: Any, document: str, question: str, answer_prefix: str) -> str:
    user = f"{document}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return f"{head}{answer_prefix}"
    return f"{user}\n{answer_prefix}"


def _build(
    tokenizer: Any,
    target: int,
    depth: float,
    intro: str,
    filler: list[str],
    needle: str,
    question: str,
    answer_prefix: str,
) -> tuple[str, list[int]]:
    """Fit intro + filler (with the needle at ``depth``) + question into ``target`` tokens."""

    def render(n: int) -> str:
        body = filler[:n]
        at = round(depth * len(body))
        doc = " ".join([intro, *body[:at], needle, *body[at:]])
        return _wrap(tokenizer, doc, question, answer_prefix)

    # Grow by the per-sentence estimate, then settle on the largest count that fits.
    base = len(_encode(tokenizer, render(0)))
    per = [len(_encode(tokenizer, " " + s)) for s in filler]
    n, total = 0, base
    while n < len(filler) and total + per[n] <= target:
        total += per[n]
        n += 1
    ids = _encode(tokenizer, render(n))
    while len(ids) > target and n > 0:
        n -= 1
        ids = _encode(tokenizer, render(n))
    while n < len(filler):
        more = _encode(tokenizer, render(n + 1))
        if len(more) > target:
            break
        n, ids = n + 1, more
    return render(n), ids


def make_case(tokenizer: Any, kind: str, target: int, depth: float, seed: int) -> Case:
    """One case; deterministic in (kind, target, depth, seed) for a given tokenizer."""
    rng = random.Random(f"{seed}:{kind}:{target}:{depth}")
    number = str(rng.randint(10000, 99999))
    max_sentences = target  # every sentence is several tokens, so this always suffices
    if kind == "passkey":
        filler = [_PASSKEY_FILLER] * (max_sentences // 20 + 1)
        needle = f"The pass key is {number}. Remember it. {number} is the pass key."
        question = "What is the pass key?"
        prefix = "The pass key is"
        intro = _PASSKEY_INTRO
    elif kind == "needle":
        adj, animal = rng.choice(_ADJ), rng.choice(_ANIMALS)
        filler = [_needle_sentence(rng, (adj, animal)) for _ in range(max_sentences // 8 + 1)]
        needle = f"The secret number of the {adj} {animal} is {number}."
        question = f"What is the secret number of the {adj} {animal}?"
        prefix = f"The secret number of the {adj} {animal} is"
        intro = _NEEDLE_INTRO
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    prompt, ids = _build(tokenizer, target, depth, intro, filler, needle, question, prefix)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and not getattr(tokenizer, "chat_template", None) and ids[:1] != [bos]:
        ids = [bos, *ids[: target - 1]]
    return Case(
        case_id=f"{kind}-{target}-d{int(depth * 100):02d}" + (f"-s{seed}" if seed else ""),
        kind=kind,
        target_tokens=target,
        depth=depth,
        answer=number,
        prompt=prompt,
        input_ids=tuple(ids),
    )


def make_cases(
    tokenizer: Any,
    lengths: tuple[int, ...] = LENGTHS,
    depths: tuple[float, ...] = DEPTHS,
    kinds: tuple[str, ...] = KINDS,
    seed: int = 0,
) -> list[Case]:
    """The full grid, ordered by length, then depth, then kind."""
    return [
        make_case(tokenizer, kind, n, d, seed) for n in lengths for d in depths for kind in kinds
    ]


def spread_cases(
    tokenizer: Any,
    target: int,
    num: int,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
) -> list[Case]:
    """``num`` cases of ``target`` tokens: every (depth, kind) pair once per round, the seed
    advancing by one per round (the case set of both accuracy benchmarks)."""
    grid = [(d, k) for d in DEPTHS for k in kinds]
    return [
        make_case(tokenizer, grid[i % len(grid)][1], target, grid[i % len(grid)][0],
                  seed + i // len(grid))
        for i in range(num)
    ]  # fmt: skip


def pick(cases: list[Case], num: int) -> list[Case]:
    """``num`` cases spread evenly over the grid (deterministic; all when ``num >= len``)."""
    if num >= len(cases):
        return list(cases)
    step = len(cases) / num
    return [cases[int(i * step)] for i in range(num)]


def answer_found(answer: str, generated_text: str) -> bool:
    """The case is solved when the number appears in the continuation."""
    return answer in generated_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a transformers tokenizer folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    for c in make_cases(tok, seed=args.seed):
        print(f"{c.case_id:24s} tokens={c.num_tokens:5d} answer={c.answer}")


if __name__ == "__main__":
    main()
