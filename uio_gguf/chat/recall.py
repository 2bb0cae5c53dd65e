"""Recall: the passages of the book a question needs, brought back as raw tokens (docs/design.md §6).

The memory carries the whole book's gist, but a 135M model cannot carry exact facts (a 5-digit pass
key, an access code) through its compressed slots, while it reads them fine from raw text. So when a
book is loaded its compressed part is indexed with BM25 (bm25s) in overlapping passages of one
segment, and for each question the best-ranked passages, up to a token budget, are decoded as raw tokens between the memory and the raw
window (Session.set_recall), where they replace the previous question's passages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RECALL_TOKENS = 1024  # see docs/design.md §6 for the measurements behind it
SEPARATOR = "\n[...]\n"  # between passages that are not neighbours in the book
# Passages scoring under this share of the best one are left out: on the demo book, the weaker matches
# that a larger budget let in (code examples sharing "code") turned the right answer (7419) into "None".
# So are passages holding fewer of the question's words than the best one: a pass key at depth 0.1 of a
# 16K book was answered from the libpng passage on interlace "passes" (2.08 against the needle's 4.06)
# that sat after it, nearer the question (0 of 10 found; 10 of 10 with the cut).
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
    """A BM25 index over passages of the compressed part of `tokens` (the book as the decoder reads it).

    A passage is one segment long and a new one starts every half segment, so a sentence shorter than
    half a segment lies whole in some passage even where it straddles a segment boundary (the pass key
    that recall missed at depth 0.9 of a 56K book did). skip: tokens at the start that are not the
    book's text (the chat template's opening); the first passage starts after them."""

    def __init__(self, model, tokens, segment: int, skip: int = 0):
        import bm25s

        self.model = model
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.segment, self.skip = segment, skip
        self.n_segments = len(self.tokens) // segment
        end = self.n_segments * segment  # the compressed part
        stride = max(1, segment // 2)
        self.spans = [
            Span(max(at, min(skip, at + segment)), at + segment) for at in range(0, end - segment + 1, stride)
        ]
        self.separator = model.tokenize(SEPARATOR, add_special=False)
        # each distinct token's bytes, asked of llama.cpp once (passages overlap, and a book repeats its words)
        self._pieces = {int(t): model.piece(int(t)) for t in np.unique(self.tokens)}
        self.index = None
        words = _words([self.text(s) for s in self.spans]) if self.spans else []
        self.vocabularies = [set(w) for w in words]  # each passage's words, for the coverage cut
        if self.spans:
            self.index = bm25s.BM25()
            self.index.index(words, show_progress=False)

    def text(self, span: Span) -> str:
        pieces = self._pieces
        return b"".join(pieces[t] for t in self.tokens[span.start : span.end].tolist()).decode("utf-8", "replace")

    def question_words(self, question: str) -> list[str]:
        """The question's words that BM25 looks for: lower case, stop words left out, in the book."""
        return [w for w in _words([question])[0] if self.index is not None and w in self.index.vocab_dict]

    def scores(self, question: str) -> np.ndarray:
        """BM25 score of every passage for the question (0 where no word is shared)."""
        if self.index is None:
            return np.zeros(0)
        words = self.question_words(question)
        if not words:
            return np.zeros(len(self.spans))
        return np.asarray(self.index.get_scores(words), dtype=np.float64)

    def coverage(self, question: str) -> np.ndarray:
        """How many of the question's distinct words each passage holds."""
        words = set(self.question_words(question))
        return np.asarray([len(words & v) for v in self.vocabularies], dtype=np.int64)

    def select(self, question: str, budget: int) -> list[Span]:
        """The best-ranked passages while they fit in `budget` tokens (separators included), merged
        where they overlap or meet, in book order. Passages that share no word with the question or
        score under MIN_SCORE_SHARE of the best, or hold fewer of the question's words than the best
        one does, are left out."""
        scores = self.scores(question)
        if not len(scores) or scores.max() <= 0:
            return []
        chosen: list[Span] = []
        floor = MIN_SCORE_SHARE * scores.max()  # > 0: passages sharing no word fall under it
        coverage = self.coverage(question)
        order = np.argsort(-scores, kind="stable")
        for best in order:
            if scores[best] < floor:
                break
            if coverage[best] < coverage[order[0]]:
                continue
            if self._cost([*chosen, self.spans[best]]) <= budget:
                chosen.append(self.spans[best])
        return _merge(chosen)

    def segment_spans(self, scores: np.ndarray, budget: int) -> list[Span]:
        """Whole segments, best `scores` (one per segment of the compressed part, e.g. the question's
        attention over their memory: uio_gguf.memory.attention_rank) first, while they fit in `budget` tokens;
        those under MIN_SCORE_SHARE of the best are left out. Merged where they meet, in book order."""
        scores = np.asarray(scores, dtype=np.float64)[: self.n_segments]
        if not len(scores) or scores.max() <= 0:
            return []
        chosen: list[Span] = []
        for i in np.argsort(-scores, kind="stable"):
            if scores[i] < MIN_SCORE_SHARE * scores.max():
                break
            span = Span(
                max(int(i) * self.segment, min(self.skip, (int(i) + 1) * self.segment)), (int(i) + 1) * self.segment
            )
            if self._cost([*chosen, span]) <= budget:
                chosen.append(span)
        return _merge(chosen)

    def _cost(self, spans: list[Span]) -> int:
        merged = _merge(spans)
        return sum(s.end - s.start for s in merged) + max(0, len(merged) - 1) * len(self.separator)

    def recall_tokens(self, question: str, budget: int) -> np.ndarray:
        """The tokens to decode for the question: the selected spans joined by the separator."""
        return self.tokens_for(self.select(question, budget))

    def tokens_for(self, spans: list[Span]) -> np.ndarray:
        """The spans' tokens joined by the separator."""
        parts = []
        for span in spans:
            if parts:
                parts.append(self.separator)
            parts.append(self.tokens[span.start : span.end])
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)


def _merge(spans: list[Span]) -> list[Span]:
    """Spans in book order, those that overlap or meet joined into one."""
    merged: list[Span] = []
    for span in sorted(spans, key=lambda s: s.start):
        if merged and merged[-1].end >= span.start:
            merged[-1] = Span(merged[-1].start, max(merged[-1].end, span.end))
        else:
            merged.append(span)
    return merged
