"""Training text: .txt files (one document each) and .jsonl files (one {"text": ...} document a line),
tokenized into one stream with EOS between documents, split into train / held-out by document,
and cut into random crops of T segments."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from uio_gguf.errors import UIOError


def read_documents(paths: list[str | Path]) -> list[str]:
    if not paths:
        raise UIOError("no training data given (pass --data FILE, .txt or .jsonl)")
    documents = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UIOError(f"data file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UIOError(f"data file is not UTF-8 text: {path}") from None
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    documents.append(record["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UIOError(f'{path}:{number}: expected a JSON object with a "text" field') from None
        else:
            documents.append(text)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise UIOError(f"the training data is empty: {', '.join(map(str, paths))}")
    return documents


def tokenize(documents: list[str], tokenizer) -> list[np.ndarray]:
    eos = tokenizer.eos_token_id
    return [np.asarray(tokenizer(d, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int64) for d in documents]


class TokenStream:
    """A train and a held-out stream; held-out is every `holdout_every`-th document (at least one
    document each side when there are two or more, else the last tenth of the only one)."""

    def __init__(self, documents: list[np.ndarray], holdout_every: int = 10):
        if len(documents) >= 2:
            held = set(range(len(documents) - 1, -1, -holdout_every))
            self.train = np.concatenate([d for i, d in enumerate(documents) if i not in held])
            self.heldout = np.concatenate([d for i, d in enumerate(documents) if i in held])
        else:
            cut = len(documents[0]) * 9 // 10
            self.train, self.heldout = documents[0][:cut], documents[0][cut:]

    def check_length(self, crop_tokens: int) -> None:
        if len(self.train) < crop_tokens:
            raise UIOError(
                f"the training text has {len(self.train)} tokens, fewer than one crop of {crop_tokens} "
                "(segments × segment length + 1): give more text or fewer/shorter segments"
            )

    def random_crops(self, rng: np.random.Generator, batch: int, crop_tokens: int) -> np.ndarray:
        starts = rng.integers(0, len(self.train) - crop_tokens + 1, size=batch)
        return np.stack([self.train[s : s + crop_tokens] for s in starts])

    def heldout_crops(self, count: int, crop_tokens: int) -> np.ndarray:
        """The first `count` disjoint crops of the held-out stream (fewer if it is short)."""
        n = min(count, len(self.heldout) // crop_tokens)
        return np.stack([self.heldout[i * crop_tokens : (i + 1) * crop_tokens] for i in range(n)]) if n else None
