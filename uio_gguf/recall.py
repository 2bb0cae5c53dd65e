"""Recall: the passages of the book a question needs, brought back as raw tokens (docs/design.md §6).

The memory carries the whole book's gist, but a 135M model cannot carry exact facts (a 5-digit pass
key, an access code) through its compressed slots, while it reads them fine from raw text. So when a
book is loaded its compressed segments are indexed with BM25 (bm25s), and for each question the
best-ranked segments, up to a token budget, are decoded as raw tokens between the memory and the raw
window (Session.set_recall), where they replace the previous question's passages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RECALL_TOKENS = 1024  # see README / docs/design.md §6 for the measurements behind it
SEPARATOR = "\n[...]\n"  # between passages that are not neighbours in the book
# Segments scoring under this share of the best one are left out: on the demo book, the weaker matches
# that a larger budget let in (code examples sharing "code") turned the right answer (7419) into "None".
MIN_SCORE_SHARE = 0.5


@dataclass(frozen=True)
class Span:
    """Book tokens [start, end) brought back whole."""

    start: int
    end: int


def _words(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class Recall:
    """A BM25 index over the full segments of `tokens` (the book as the decoder reads it).

    skip: tokens at the start that are not the book's text (the chat template's opening); a recalled
    first segment starts after them."""

    def __init__(self, model, tokens, segment: int, skip: int = 0):
        import bm25s

        self.model = model
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.segment = segment
        n_segments = len(self.tokens) // segment
        self.spans = [
            Span(max(i * segment, min(skip, (i + 1) * segment)), (i + 1) * segment) for i in range(n_segments)
        ]
        self.separator = model.tokenize(SEPARATOR, add_special=False)
        self.index = None
        if n_segments:
            self.index = bm25s.BM25()
            self.index.index(_words([self.text(s) for s in self.spans]), show_progress=False)

    def text(self, span: Span) -> str:
        return b"".join(self.model.piece(t) for t in self.tokens[span.start : span.end]).decode("utf-8", "replace")

    def scores(self, question: str) -> np.ndarray:
        """BM25 score of every segment for the question (0 where no word is shared)."""
        if self.index is None:
            return np.zeros(0)
        words = [w for w in _words([question])[0] if w in self.index.vocab_dict]
        if not words:
            return np.zeros(len(self.spans))
        return np.asarray(self.index.get_scores(words), dtype=np.float64)

    def select(self, question: str, budget: int) -> list[Span]:
        """The best-ranked segments, each followed by its next and previous neighbour (a sentence may
        straddle a segment boundary), while they fit in `budget` tokens (separators included); spans
        merged where they meet, in book order. Segments that share no word with the question or score
        under MIN_SCORE_SHARE of the best, and their neighbours, are left out."""
        scores = self.scores(question)
        chosen: set[int] = set()
        floor = MIN_SCORE_SHARE * scores.max() if len(scores) else 0.0
        for best in np.argsort(-scores, kind="stable"):
            if scores[best] <= 0 or scores[best] < floor:
                break
            for i in (int(best), int(best) + 1, int(best) - 1):
                if 0 <= i < len(self.spans) and i not in chosen and self._cost(chosen | {i}) <= budget:
                    chosen.add(i)
        return self._merge(chosen)

    def _merge(self, chosen: set[int]) -> list[Span]:
        spans: list[Span] = []
        for i in sorted(chosen):
            span = self.spans[i]
            if spans and spans[-1].end == span.start:
                spans[-1] = Span(spans[-1].start, span.end)
            else:
                spans.append(span)
        return spans

    def _cost(self, chosen: set[int]) -> int:
        spans = self._merge(chosen)
        return sum(s.end - s.start for s in spans) + max(0, len(spans) - 1) * len(self.separator)

    def recall_tokens(self, question: str, budget: int) -> np.ndarray:
        """The tokens to decode for the question: the selected spans joined by the separator."""
        parts = []
        for span in self.select(question, budget):
            if parts:
                parts.append(self.separator)
            parts.append(self.tokens[span.start : span.end])
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)
