"""Synthetic long-range tasks for the training mix: facts hidden at random depths in long real text, and
asked for at its end. Their answers lie far behind the raw window, so only the memory can give them.
The pass-key sentence and question (and insert_at, for a chosen depth) also build `uio-gguf eval passkey`'s
documents; this module imports nothing heavy, so the runtime can use it.

  passkey    "The pass key is 71432. Remember it. 71432 is the pass key." ... "What is the pass key?
             The pass key is 71432."
  key-value  several "The value of key amber-falcon is 48213." ... two of them asked for at the end
"""

from __future__ import annotations

import random

_ADJECTIVES = (
    "amber silent brisk copper distant eager frozen golden hollow ivory jagged lunar mellow "
    "narrow olive quiet rapid scarlet tidal velvet wild young azure bitter crimson"
).split()
_NOUNS = (
    "falcon harbor lantern meadow orchard pebble quarry river saddle thistle valley willow anchor "
    "beacon canyon dune ember glacier island kettle ledger marble nectar otter"
).split()


KEY_NAMES = [f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS]
PASSKEY_QUESTION = "What is the pass key?"


def passkey_fact(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_answer_only(key: int) -> str:
    return f"The pass key is {key}."


def passkey_answer(key: int) -> str:
    return f"{PASSKEY_QUESTION} {passkey_answer_only(key)}"


def key_value_fact(name: str, value: int) -> str:
    return f"The value of key {name} is {value}."


def key_value_answer(name: str, value: int) -> str:
    return f"What is the value of key {name}? The value of key {name} is {value}."


def passkey(filler: str, rng: random.Random) -> str:
    key = rng.randint(10_000, 99_999)
    text = _insert(filler, [passkey_fact(key)], rng)
    return f"{text}\n\n{passkey_answer(key)}"


def key_value(filler: str, rng: random.Random) -> str:
    names = rng.sample(KEY_NAMES, rng.randint(3, 8))
    values = {name: rng.randint(10_000, 99_999) for name in names}
    text = _insert(filler, [key_value_fact(name, value) for name, value in values.items()], rng)
    asked = rng.sample(names, 2)
    return text + "".join(f"\n\n{key_value_answer(n, values[n])}" for n in asked)


TASKS = {"passkey": passkey, "key-value": key_value}


def _insert(filler: str, sentences: list[str], rng: random.Random) -> str:
    """The sentences placed, in order, at uniformly random depths of the filler, each on a line of its own."""
    return _place(filler, sentences, [rng.randrange(len(filler) + 1) for _ in sentences])


def insert_at(filler: str, sentence: str, depth: float) -> str:
    """The sentence on a line of its own at the first line start at or after `depth` (0..1) of the filler."""
    return _place(filler, [sentence], [round(depth * len(filler))])


def _place(filler: str, sentences: list[str], positions: list[int]) -> str:
    cuts = sorted(_next_line(filler, p) for p in positions)
    pieces, previous = [], 0
    for cut, sentence in zip(cuts, sentences):
        pieces += [filler[previous:cut], f"{sentence}\n" if cut < len(filler) else f"\n{sentence}"]
        previous = cut
    pieces.append(filler[previous:])
    return "".join(pieces)


def _next_line(text: str, position: int) -> int:
    """The start of the first line at or after `position` (the end of the text if there is none)."""
    if position == 0:
        return 0
    found = text.find("\n", position - 1)
    return len(text) if found < 0 else found + 1


def filler(texts: list[str], length: int, rng: random.Random) -> tuple[str, list[int]]:
    """About `length` characters of real text: a random stretch of a random text, continued with further
    random texts when it is short. Returns the filler and the indices of the texts it used."""
    parts, used, size = [], [], 0
    while size < length:
        index = rng.randrange(len(texts))
        text = texts[index]
        start = rng.randrange(max(1, len(text) - (length - size)))
        start = text.rfind("\n", 0, start) + 1  # begin at a line
        part = text[start : start + length - size]
        parts.append(part)
        used.append(index)
        size += len(part) + 2
    return "\n\n".join(parts), used
