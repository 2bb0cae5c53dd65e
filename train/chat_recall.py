"""Chat recall crops: `uio-gguf eval passkey`'s own format as training crops, scored on the answer alone.

A crop of T segments opens the chat template's first user turn, goes on with filler (the crop's own train
text) that holds the pass-key sentence somewhere in segments 1..T-1, closes the user turn with the
question and ends with the assistant's answer in segment T. Its labels score the answer's tokens only:
the one place in the crop where only the memory can lower the loss. Why, next to train.retrieval's
crops: those score every token, so the answer is ~0.3% of a crop's loss and its gradient drowns in the
text's; and their plain "question answer" lines are not the chat turn the runtime asks in.

The pieces are rendered with the runtime's own chat renderer (uio_gguf.chat.conversation) and tokenized like the
runtime tokenizes them (the book part, the question turn and the answer each on their own), then kept in
OUT/chat_recall.npz so that a run that reuses them needs no llama.cpp, as with tokens.npz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.train import synthetic
from uio_gguf.train.data import load_npz, load_or_build, save_npz
from uio_gguf.train.model import IGNORE

POOL_FILE = "chat_recall.npz"
POOL_TASKS = 4096  # distinct pass keys; each crop draws one


class ChatRecallPool:
    """The chat template's opening (up to the book), the question turn, and (fact, answer) token ids of
    each pass key. The answer is the assistant's turn as the template closes it."""

    def __init__(self, head: list[int], question: list[int], tasks: list[tuple[list[int], list[int]]]):
        self.head, self.question, self.tasks = head, question, tasks

    @classmethod
    def build(cls, tokenizer, count: int = POOL_TASKS, seed: int = 0) -> ChatRecallPool:
        from uio_gguf.llamacpp.template import BOOK_MARKER, render

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        template = tokenizer.chat_template
        user = f"{BOOK_MARKER}\n\n{synthetic.PASSKEY_QUESTION}"
        asked = render(template, [("user", user)], True)
        opening, question = asked.split(BOOK_MARKER, 1)
        rng = np.random.default_rng(seed)
        tasks = []
        for key in rng.integers(10_000, 100_000, size=count).tolist():
            answer = render(template, [("user", user), ("assistant", synthetic.passkey_answer_only(key))], False)
            if not answer.startswith(asked):
                raise UIOError("the chat template rewrites the question turn when an answer follows it")
            tasks.append((ids(f"\n{synthetic.passkey_fact(key)}\n"), ids(answer[len(asked) :])))  # a line of its own
        head = tokenizer(opening, add_special_tokens=True)["input_ids"]  # the book part starts the stream
        return cls(head, ids(question), tasks)

    def save(self, path: Path, base_fingerprint: str) -> None:
        """Flat ids with offsets: piece i is ids[starts[i]:starts[i+1]]; head, question, then fact and
        answer of each task."""
        pieces = [self.head, self.question] + [piece for task in self.tasks for piece in task]
        starts = np.cumsum([0] + [len(p) for p in pieces])
        save_npz(path, ids=np.concatenate(pieces).astype(np.int64), starts=starts, base_fingerprint=base_fingerprint)

    @classmethod
    def load(cls, path: Path, base_fingerprint: str) -> ChatRecallPool:
        saved = load_npz(path, base_fingerprint, ["ids", "starts"], "render and tokenize the tasks again")
        ids, starts = saved["ids"].tolist(), saved["starts"]
        pieces = [ids[a:b] for a, b in zip(starts[:-1], starts[1:])]
        return cls(pieces[0], pieces[1], list(zip(pieces[2::2], pieces[3::2])))

    @classmethod
    def for_run(cls, out: Path, tokenizer, base_fingerprint: str) -> ChatRecallPool:
        """The run's pool: read from OUT/chat_recall.npz, or built and saved there."""
        return load_or_build(
            Path(out) / POOL_FILE,
            lambda path: cls.load(path, base_fingerprint),
            lambda: cls.build(tokenizer),
            lambda path, pool: pool.save(path, base_fingerprint),
        )


class ChatRecallCrops:
    """Turns train crops (T·l + 1 tokens) into chat recall crops and their labels, drawing every choice
    from one numpy rng (the training loop's data rng, so a resumed run makes the same crops)."""

    def __init__(self, pool: ChatRecallPool, segment: int, crop_tokens: int):
        self.pool, self.segment = pool, segment
        tail = len(pool.question) + max(len(a) for _, a in pool.tasks)
        opening = len(pool.head) + max(len(f) for f, _ in pool.tasks)
        if tail > segment or opening > crop_tokens - 1 - segment:
            raise UIOError(
                f"chat recall crops need segments of at least {tail} tokens and at least {opening} "
                "tokens before the last segment (the chat turn's opening and the pass-key sentence)"
            )

    def make(self, crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, labels) of one crop: labels are IGNORE except at the answer's tokens."""
        fact, answer = self.pool.tasks[int(rng.integers(len(self.pool.tasks)))]
        head, tail = self.pool.head, self.pool.question + answer
        body = crop[: len(crop) - len(head) - len(fact) - len(tail)].tolist()
        memory_end = len(crop) - 1 - self.segment  # tokens of segments 1..T-1: the fact ends by then
        at = int(rng.integers(0, memory_end - len(head) - len(fact) + 1))
        row = np.asarray(head + body[:at] + fact + body[at:] + tail, dtype=np.int64)
        labels = np.full_like(row, IGNORE)
        labels[-len(answer) :] = row[-len(answer) :]
        return row, labels

    def batch(self, crops: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        made = [self.make(crop, rng) for crop in crops]
        return np.stack([t for t, _ in made]), np.stack([l for _, l in made])
