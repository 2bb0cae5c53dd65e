"""Training text: .txt files (one document each) and .jsonl files (one {"text": ...} document a line),
tokenized into one stream with EOS between documents, split into train / held-out by document
(or held-out from files of its own), saved as tokens.npz in the run directory, and cut into random
crops of T segments."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from uio_gguf.atomic import atomic_file
from uio_gguf.errors import UIOError

TOKENS_FILE = "tokens.npz"


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


def save_npz(path: Path, **arrays) -> None:
    """Compressed, written atomically: an interrupted save never leaves a half file under the name."""
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_npz(path: Path, base_fingerprint: str, keys: list[str], redo: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of a file that save_npz wrote with a base_fingerprint; a damaged file or one of
    another base is one error line that says to delete it (`redo`: what then happens again)."""
    try:
        saved = np.load(path)
        recorded = str(saved["base_fingerprint"])
        arrays = {key: saved[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise UIOError(f"{path} is damaged ({err}): delete it to {redo}") from None
    if recorded != base_fingerprint:
        raise UIOError(f"{path} was tokenized for another base model: delete it to {redo}")
    return arrays


def load_or_build(path: Path, load, build, save):
    """A file a run derives once (a task pool): load(path) when it exists, else build() saved with
    save(path, made), so that a resumed run reads what its first start made."""
    if path.exists():
        return load(path)
    made = build()
    save(path, made)
    return made


class TokenStream:
    """The train and held-out token streams (documents joined, EOS after each)."""

    def __init__(self, train: np.ndarray, heldout: np.ndarray):
        self.train, self.heldout = train, heldout

    @classmethod
    def split(cls, documents: list[np.ndarray], holdout_every: int = 10) -> TokenStream:
        """Held-out is every `holdout_every`-th document (at least one document each side when there are
        two or more, else the last tenth of the only one)."""
        if len(documents) >= 2:
            held = set(range(len(documents) - 1, -1, -holdout_every))
            return cls(
                np.concatenate([d for i, d in enumerate(documents) if i not in held]),
                np.concatenate([d for i, d in enumerate(documents) if i in held]),
            )
        cut = len(documents[0]) * 9 // 10
        return cls(documents[0][:cut], documents[0][cut:])

    def save(self, path: Path, base_fingerprint: str, sources: list[str]) -> None:
        """Written atomically next to the checkpoint: resume (here or on another machine) reads the same
        tokens back without the tokenizer or the text files."""
        # The smallest unsigned type that holds the vocabulary, compressed: small enough to carry along.
        top = max(int(self.train.max(initial=0)), int(self.heldout.max(initial=0)))
        dtype = np.uint16 if top < 2**16 else np.uint32
        save_npz(
            path,
            train=self.train.astype(dtype),
            heldout=self.heldout.astype(dtype),
            base_fingerprint=base_fingerprint,
            sources=np.asarray(sources, dtype=str),
        )

    @classmethod
    def load(cls, path: Path, base_fingerprint: str) -> TokenStream:
        saved = load_npz(path, base_fingerprint, ["train", "heldout"], "tokenize the data again")
        return cls(saved["train"].astype(np.int64), saved["heldout"].astype(np.int64))

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


def read_run_text(out: Path, data: list[str], heldout: list[str]) -> tuple[list[str], list[str]] | None:
    """The --data and --heldout documents, or None when OUT/tokens.npz already holds the run's tokens.
    Read before the base model loads, so a wrong path fails at once."""
    path = out / TOKENS_FILE
    if path.exists():
        if data or heldout:
            print(f"using the tokens already in {path} (delete it to tokenize --data again)", file=sys.stderr)
        return None
    if not data:
        raise UIOError(f"no training data: pass --data FILE (no {TOKENS_FILE} in {out} either)")
    return read_documents(data), (read_documents(heldout) if heldout else [])


def prepare_tokens(
    out: Path, text: tuple[list[str], list[str]] | None, tokenizer, base_fingerprint: str, sources: list[str]
) -> TokenStream:
    """The run's token streams: read back from OUT/tokens.npz when `text` is None, else tokenized
    (held-out: the --heldout documents, or every tenth --data document) and saved there."""
    path = out / TOKENS_FILE
    if text is None:
        return TokenStream.load(path, base_fingerprint)
    data, heldout = text
    documents = tokenize(data, tokenizer)
    if heldout:
        stream = TokenStream(np.concatenate(documents), np.concatenate(tokenize(heldout, tokenizer)))
    else:
        stream = TokenStream.split(documents)
    stream.save(path, base_fingerprint, sources)
    return stream
