"""What an answer drew on, for the user to check it: the passages recall brought back (with their
place in the book and the question's words) and the memory figures (cells used against full attention).

The web page shows them under each answer; the chat completion of a book named by id returns them
under the key `uio` (docs/serving.md).
"""

from __future__ import annotations


def report(conversation, question: str) -> dict:
    """The sources and memory figures of the conversation's last answer (to `question`)."""
    recall = conversation.recall
    sources = []
    if recall is not None:
        book = len(conversation.book_tokens) - recall.skip  # the book's tokens, the template's opening left out
        for span in conversation.recalled:
            sources.append(
                {
                    "text": recall.text(span),
                    "start": span.start - recall.skip,
                    "end": span.end - recall.skip,
                    "place": (span.start - recall.skip) / book if book > 0 else 0.0,  # where it starts: 0 to 1
                    "until": (span.end - recall.skip) / book if book > 0 else 0.0,  # and where it ends
                }
            )
    session = conversation.session
    used, full = conversation.kv_bytes()
    return {
        "sources": sources,
        "words": recall.question_words(question) if recall is not None else [],
        "memory": {
            "cells": session.n_past,  # what the KV cache holds now: memory slots, recalled and raw tokens
            "memory_cells": session.n_mem,
            "full_attention_cells": session.tokens_seen,  # every token read, as plain attention would keep
            "bytes": used,
            "full_attention_bytes": full,
        },
    }
