"""Stops an answer that starts to repeat itself (docs/design.md §6).

SmolLM2-135M rarely ends a turn after a long user turn: with full attention over 300-1,000 tokens of a
manual and a pass-key sentence it answers "The pass key is 12345." and then writes the same sentence
again until the token limit (docs/evaluation.md), where the sentence alone gets an end of turn. The
repetition penalty and DRY only turn the repeats into other text (the penalty also corrupts the digits
of the number). So chat stops the answer where it begins to loop: a sentence that repeats an earlier
sentence of the answer word for word, or a short unit written three times in a row ("args.args.args").

Text streams as it comes, except a sentence that could still turn into one already said: it is held
until it ends (a repeat, never shown) or departs from every earlier sentence (shown). A stutter shows
at most two units. Answers that never repeat come out unchanged (one that ends on a repeat loses it).
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? followed by white space, or at a line break; the white space after it is its own.
SENTENCE_END = re.compile(r"(?:[.!?](?=\s)|\n)\s*")
MIN_REPEAT_WORDS = 3  # shorter lines ("}", "Yes.", "1.") legitimately recur
# A unit of 1-80 characters written at least 3 times in a row, spanning at least MIN_STUTTER_CHARS and
# holding a letter or digit (so "-----" rules and "...." stay).
STUTTER = re.compile(r"(.{1,80}?)\1{2,}$", re.DOTALL)
MIN_STUTTER_CHARS = 15
MAX_HELD_CHARS = 400  # a sentence that never ends is released in parts this long


def _same(sentence: str) -> str:
    """A sentence as compared: case, spacing and its closing . ! ? aside (a line that ends without one
    repeats as the sentence that has one)."""
    return " ".join(sentence.lower().split()).rstrip(".!?")


class LoopGuard:
    """push(piece) -> (text to show now, whether the answer looped and must stop); flush() at the end.
    Disabled, it shows every piece as it comes."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.current = ""  # the sentence being written
        self.shown = 0  # how much of it has been shown
        self.space = ""  # white space after the last sentence: shown with the next text, not at a stop
        self.said: set[str] = set()  # the answer's sentences so far, normalised
        self.looped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.enabled:
            return piece, False
        self.current += piece
        out = ""
        while match := SENTENCE_END.search(self.current):
            sentence, self.current = self.current[: match.end()], self.current[match.end() :]
            key, body = _same(sentence), sentence.rstrip()
            if not sentence.strip():  # a blank line: part of the space between sentences
                self.space += sentence
                continue
            if self._said_before(key):
                return self._stop(out)
            self.said.add(key)
            out += self._show(body[self.shown :])
            self.space, self.shown = sentence[len(body) :], 0
        stutter = STUTTER.search(self.current)
        if stutter and stutter.end() - stutter.start() >= MIN_STUTTER_CHARS and re.search(r"\w", stutter.group(1)):
            end = stutter.start() + len(stutter.group(1))  # the unit once
            return self._stop(out + self._show(self.current[self.shown : max(end, self.shown)]))
        if self.current.strip() and not self._may_repeat(self.current) or len(self.current) > MAX_HELD_CHARS:
            out += self._show(self.current[self.shown :])
            self.shown = len(self.current)
        return out, False

    def _said_before(self, key: str) -> bool:
        """Whether the normalised sentence `key` repeats one the answer already said (3+ words)."""
        return len(key.split()) >= MIN_REPEAT_WORDS and key in self.said

    def _may_repeat(self, text: str) -> bool:
        """Whether the sentence being written could still turn into one already said (then it is held)."""
        start = _same(text)
        return any(said.startswith(start) for said in self.said if len(said.split()) >= MIN_REPEAT_WORDS)

    def _show(self, text: str) -> str:
        if not text:
            return ""
        text, self.space = self.space + text, ""
        return text

    def _stop(self, out: str) -> tuple[str, bool]:
        self.current, self.space, self.looped = "", "", True
        return out, True

    def flush(self) -> str:
        """What is still held when the answer ends (the held start of its last sentence). A last
        sentence that repeats an earlier one word for word is a repeat too, though no white space
        followed it (the answer ended on it): it is dropped, and the answer counts as looped."""
        if self.enabled and not self.shown and self._said_before(_same(self.current)):
            self._stop("")
            return ""
        rest = self._show(self.current[self.shown :])
        self.current, self.shown, self.space = "", 0, ""
        return rest
