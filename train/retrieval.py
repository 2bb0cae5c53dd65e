"""Retrieval crops: a pass-key or key-value question spliced, at token level, into an ordinary training
crop, with its facts in the memory segments (1..T-1) and the questions and answers at the crop's end.

Why, next to the synthetic documents of `uio-gguf data`: a random crop of the token stream rarely holds
both a synthetic document's fact and its question, and when it does the fact may sit in the raw window.
A retrieval crop always asks about something only the memory holds, so every such crop trains recall.
The sentences are those of train.synthetic; the filler is the crop's own train text, which keeps the
ordinary next-token loss on most of its tokens.
"""
from __future__ import annotations

import numpy as np

from train import synthetic
from uio_gguf.errors import UIOError

MAX_KEYS = 4  # key-value facts per crop (all of them asked)


class RetrievalCrops:
    """Turns train crops (T·l + 1 tokens) into retrieval crops, drawing every choice from one numpy rng
    (the training loop's data rng, so a resumed run makes the same crops)."""

    def __init__(self, tokenizer, segment: int, crop_tokens: int):
        self.tokenizer, self.segment = tokenizer, segment
        # The largest task (most keys, longest names) must fit: questions in the last segment, facts before.
        names = sorted(synthetic.KEY_NAMES, key=len)[-MAX_KEYS:]
        tail = len(self._ids("\n\n" + "\n".join(synthetic.key_value_answer(n, 99_999) for n in names)))
        facts = sum(len(self._ids(f"\n{synthetic.key_value_fact(n, 99_999)}\n")) for n in names)
        if tail >= segment or facts > crop_tokens - 1 - segment:
            raise UIOError(f"--retrieval-share needs segments of more than {tail} tokens and at least "
                           f"{facts} tokens before the last segment (the key-value task's questions and facts)")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _task(self, rng: np.random.Generator) -> tuple[list[str], str]:
        """(facts, questions with their answers) of a pass-key or a key-value task."""
        if rng.random() < 0.5:
            key = int(rng.integers(10_000, 100_000))
            return [synthetic.passkey_fact(key)], synthetic.passkey_answer(key)
        names = synthetic.KEY_NAMES
        chosen = rng.choice(len(names), size=int(rng.integers(2, MAX_KEYS + 1)), replace=False)
        pairs = [(names[i], int(rng.integers(10_000, 100_000))) for i in chosen]
        facts = [synthetic.key_value_fact(name, value) for name, value in pairs]
        asked = "\n".join(synthetic.key_value_answer(*pairs[i]) for i in rng.permutation(len(pairs)))
        return facts, asked

    def make(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The crop with the facts inserted (each on a line of its own) at random points that end
        before the last segment, and the questions closing the last segment."""
        facts, asked = self._task(rng)
        fact_ids = [self._ids(f"\n{fact}\n") for fact in facts]
        tail = self._ids(f"\n\n{asked}")
        n_facts = sum(map(len, fact_ids))
        memory_end = len(crop) - 1 - self.segment  # tokens in segments 1..T-1
        filler = crop[: len(crop) - len(tail) - n_facts].tolist()
        # Cut points in the filler such that every fact ends inside the memory segments.
        cuts = np.sort(rng.integers(0, memory_end - n_facts + 1, size=len(fact_ids)))
        out, previous = [], 0
        for cut, ids in zip(cuts, fact_ids):
            out += filler[previous:cut] + ids
            previous = cut
        out += filler[previous:] + tail
        return np.asarray(out, dtype=crop.dtype)
