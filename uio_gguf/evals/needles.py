"""The needles of `uio-gguf eval qa` (RULER-style tasks) and the documents that hide them.

Tasks (each answer scored by exact match: every expected number or name must appear whole in the answer):
  passkey     the training task's pass-key sentence (uio_gguf.train.synthetic) at the depth asked
  single      "The special magic number for <word> is <7 digits>." at the depth asked
  multikey    4 such needles for different words (the asked one at the depth asked, the others anywhere)
  multivalue  3 numbers for one word (the first at the depth asked), all asked for
  vt          variable tracking: "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE." ... spread from the depth
              asked to the end; "Which variables are assigned the value 12345?" asks for every name

A document is the filler's tokens with each needle's tokens written over as many filler tokens (nothing
shifts), so only the segments a needle touches differ from the filler's.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.evals.passkey import filler_text
from uio_gguf.train.synthetic import KEY_NAMES, PASSKEY_QUESTION, passkey_fact

TASKS = ("passkey", "single", "multikey", "multivalue", "vt")
LOOP_NGRAM, LOOP_REPEATS = 4, 3
SPLICE_TRIES = 16  # shifts tried until the whole spliced text reads back as its tokens


# ----- tasks ------------------------------------------------------------------------------------------
@dataclass
class Sample:
    needles: list[tuple[str, float]]  # (sentence, depth) in book order
    question: str
    answers: list[str]  # every one must appear whole in the answer


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _magic(word: str, number: str) -> str:
    return f"The special magic number for {word} is {number}."


def _spread(depth: float, n: int) -> list[float]:
    """n depths from `depth` towards the end, in order."""
    return [depth + (1 - depth) * i / n for i in range(n)]


def make_sample(task: str, depth: float, rng: random.Random) -> Sample:
    if task == "passkey":
        key = str(rng.randint(10_000, 99_999))
        return Sample([(passkey_fact(int(key)), depth)], PASSKEY_QUESTION, [key])
    if task == "single":
        word, number = rng.choice(KEY_NAMES), _number(rng)
        return Sample([(_magic(word, number), depth)], f"What is the special magic number for {word}?", [number])
    if task == "multikey":
        words = rng.sample(KEY_NAMES, 4)
        numbers = [_number(rng) for _ in words]
        depths = [depth] + [rng.random() for _ in words[1:]]
        needles = sorted(((_magic(w, n), d) for w, n, d in zip(words, numbers, depths)), key=lambda x: x[1])
        return Sample(needles, f"What is the special magic number for {words[0]}?", [numbers[0]])
    if task == "multivalue":
        word = rng.choice(KEY_NAMES)
        numbers = [_number(rng) for _ in range(3)]
        depths = sorted([depth] + [rng.random() for _ in range(2)])
        return Sample(
            [(_magic(word, n), d) for n, d in zip(numbers, depths)],
            f"What are all the special magic numbers for {word}?",
            numbers,
        )
    if task == "vt":
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(5)]
        value = _number(rng, 5)
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return Sample(
            list(zip(chain, _spread(depth, len(chain)))),
            f"Which variables are assigned the value {value}? Name all of them.",
            names,
        )
    raise UIOError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")


def found(expected: str, answer: str) -> bool:
    """Exact match: `expected` appears whole (not inside a longer number or word)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(expected)}(?![0-9A-Za-z])", answer) is not None


def has_loop(answer: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Some n-gram of words and punctuation occurs `repeats` or more times."""
    words = re.findall(r"\w+|[^\w\s]", answer.lower())
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= repeats:
            return True
    return False


# ----- documents: needles spliced into the filler's tokens ----------------------------------------------
@dataclass
class Document:
    tokens: np.ndarray  # what the conversation reads before the question: template opening + book
    book: str  # the book's text (tokenizes, after the opening, back to exactly `tokens`)
    skip: int  # tokens of the template's opening
    where: list[int] = field(default_factory=list)  # each needle's first token


def _token_texts(model, tokens) -> list[bytes]:
    return [model.piece(int(t)) for t in tokens]


def base_document(model, length: int, texts: list[str], rng: random.Random) -> Document:
    """The template's opening and `length` tokens of filler."""
    from uio_gguf.llamacpp.template import document_tokens, opening

    head = model.tokenize(opening(model.chat_template()), add_special=True)
    book = filler_text(model, length, rng, texts).lstrip()  # no merge with the opening's last newline
    tokens = document_tokens(model, book)
    if not np.array_equal(tokens[: len(head)], head):
        raise UIOError("the filler's first token merges with the chat template's opening")
    return Document(tokens, book, len(head))


def filler_rng(seed: int, length: int, index: int) -> random.Random:
    """Where filler `index` of a length is drawn from (the first one as before there were several)."""
    return random.Random(f"{seed}:filler:{length}" + (f":{index}" if index else ""))


def needle_ids(model, sentence: str) -> np.ndarray:
    """A needle's tokens: the sentence on a line of its own."""
    return model.tokenize(f"\n{sentence}\n", add_special=False, parse_special=False)


def _reads_back(model, tokens: np.ndarray, start: int, end: int, margin: int = 8) -> bool:
    """Whether tokens[start:end] with `margin` tokens either side tokenize back to themselves (no merge
    across the seams)."""
    lo, hi = max(0, start - margin), min(len(tokens), end + margin)
    text = b"".join(_token_texts(model, tokens[lo:hi])).decode("utf-8", "replace")
    return np.array_equal(model.tokenize(text, add_special=False, parse_special=False), tokens[lo:hi])


def splice(model, base: Document, needles: list[tuple[str, float]]) -> Document:
    """Each needle, "\nsentence\n", written over as many of the base's tokens as it has, at the first
    token at or after its depth of the book where the result reads back as the same tokens (no merge
    across the seams). Nothing moves, so only the segments a needle touches change."""
    from uio_gguf.llamacpp.template import document_tokens

    needle_tokens = [needle_ids(model, s) for s, _ in needles]
    n_book = len(base.tokens) - base.skip
    if sum(len(i) for i in needle_tokens) > n_book:
        raise UIOError(f"a {n_book}-token book cannot hold the task's {len(needles)} needle(s)")
    for shift in range(SPLICE_TRIES):  # a seam that only the whole text shows: every needle one token on
        tokens, where, floor = base.tokens.copy(), [], base.skip
        for j, ((_, depth), ids) in enumerate(zip(needles, needle_tokens)):
            last = len(tokens) - sum(len(i) for i in needle_tokens[j:])  # leaves room for the needles to come
            start = min(max(base.skip + round(depth * (n_book - len(ids))) + shift, floor), last)
            while True:
                trial = tokens.copy()
                trial[start : start + len(ids)] = ids
                if _reads_back(model, trial, start, start + len(ids)) or start >= last:
                    break
                start += 1
            tokens = trial
            where.append(start)
            floor = start + len(ids)
        book = b"".join(_token_texts(model, tokens[base.skip :])).decode("utf-8", "replace")
        if np.array_equal(document_tokens(model, book), tokens):
            return Document(tokens, book, base.skip, where)
    raise UIOError("the needles could not be spliced into the filler's tokens so that they read back the same")
