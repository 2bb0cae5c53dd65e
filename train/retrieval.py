"""Retrieval crops: a pass-key or key-value question spliced, at token level, into an ordinary training
crop, with its facts in the memory segments (1..T-1) and the questions and answers at the crop's end.

Why, next to the synthetic documents of `uio-gguf data`: a random crop of the token stream rarely holds
both a synthetic document's fact and its question, and when it does the fact may sit in the raw window.
A retrieval crop always asks about something only the memory holds, so every such crop trains recall.
The sentences are those of uio_gguf.train.synthetic; the filler is the crop's own train text, which keeps the
ordinary next-token loss on most of its tokens.

The tasks are tokenized once into a pool, saved as OUT/retrieval.npz next to tokens.npz, so that a run
that reuses them (--resume, or another machine) needs no tokenizer, as with tokens.npz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.train import synthetic
from uio_gguf.train.data import load_npz, load_or_build, save_npz

POOL_FILE = "retrieval.npz"
POOL_TASKS = 8192  # distinct tasks; each crop draws one
MAX_KEYS = 4  # key-value facts per task (all of them asked)

Task = tuple[list[list[int]], list[int]]  # (the facts' ids, one list per fact line; the questions' ids)


def _sentences(rng: np.random.Generator) -> tuple[list[str], str]:
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


def tokenize_task(tokenizer, facts: list[str], asked: str) -> Task:
    """A task as crops hold it: each fact on a line of its own, the questions after a blank line."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [ids(f"\n{fact}\n") for fact in facts], ids(f"\n\n{asked}")


def build_pool(tokenizer, count: int = POOL_TASKS, seed: int = 0) -> list[Task]:
    rng = np.random.default_rng(seed)
    return [tokenize_task(tokenizer, *_sentences(rng)) for _ in range(count)]


def save_pool(path: Path, pool: list[Task], base_fingerprint: str) -> None:
    """Flat ids with offsets: piece i is ids[piece_starts[i]:piece_starts[i+1]]; task j owns pieces
    task_starts[j] .. task_starts[j+1]-1, the last of them its questions."""
    pieces = [piece for facts, tail in pool for piece in (*facts, tail)]
    piece_starts = np.cumsum([0] + [len(p) for p in pieces])
    task_starts = np.cumsum([0] + [len(facts) + 1 for facts, _ in pool])
    save_npz(
        path,
        ids=np.concatenate(pieces).astype(np.int64),
        piece_starts=piece_starts,
        task_starts=task_starts,
        base_fingerprint=base_fingerprint,
    )


def load_pool(path: Path, base_fingerprint: str) -> list[Task]:
    saved = load_npz(path, base_fingerprint, ["ids", "piece_starts", "task_starts"], "tokenize the tasks again")
    ids, piece_starts, task_starts = saved["ids"].tolist(), saved["piece_starts"], saved["task_starts"]
    pieces = [ids[a:b] for a, b in zip(piece_starts[:-1], piece_starts[1:])]
    return [(pieces[a : b - 1], pieces[b - 1]) for a, b in zip(task_starts[:-1], task_starts[1:])]


class RetrievalCrops:
    """Turns train crops (T·l + 1 tokens) into retrieval crops, drawing every choice from one numpy rng
    (the training loop's data rng, so a resumed run makes the same crops)."""

    def __init__(self, pool: list[Task], segment: int, crop_tokens: int):
        self.pool, self.segment = pool, segment
        tail = max(len(t) for _, t in pool)
        facts = max(sum(map(len, f)) for f, _ in pool)
        if tail >= segment or facts > crop_tokens - 1 - segment:
            raise UIOError(
                f"--retrieval-share needs segments of more than {tail} tokens and at least "
                f"{facts} tokens before the last segment (the longest task's questions and facts)"
            )

    @classmethod
    def for_run(cls, out: Path, tokenizer, base_fingerprint: str, segment: int, crop_tokens: int) -> RetrievalCrops:
        """The run's task pool: read from OUT/retrieval.npz, or tokenized and saved there."""
        pool = load_or_build(
            Path(out) / POOL_FILE,
            lambda path: load_pool(path, base_fingerprint),
            lambda: build_pool(tokenizer),
            lambda path, made: save_pool(path, made, base_fingerprint),
        )
        return cls(pool, segment, crop_tokens)

    def make(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The crop with a task's facts inserted (each on a line of its own) at random points that end
        before the last segment, and its questions closing the last segment."""
        fact_ids, tail = self.pool[int(rng.integers(len(self.pool)))]
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
