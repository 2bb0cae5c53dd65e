"""The model's chat template, rendered by llama.cpp, and the book's place in the first user turn.

Every reader of a book (chat, the server, eval qa, training's chat-recall crops) puts it at the start of
the first user turn: the turn is rendered with a marker where the book goes, and split there. What comes
before the marker, plus the book, is the document the memory is made of; what comes after it (the
separator, the question, the assistant's start) is decoded as raw tokens.
"""

from __future__ import annotations

import ctypes

import llama_cpp

from uio_gguf.errors import UIOError

BOOK_MARKER = "\u2063UIO-BOOK\u2063"  # invisible separator: never in a real chat template
FALLBACK_TEMPLATE = "chatml"  # llama.cpp's built-in name, for models that ship no template


def render(template: str | None, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The chat template applied by llama.cpp's own renderer (llama_chat_apply_template)."""
    array = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, (role, content) in enumerate(messages):
        keep.append((role.encode(), content.encode()))
        array[i].role, array[i].content = keep[-1]
    tmpl = (template or FALLBACK_TEMPLATE).encode()
    size = sum(len(c) for _, c in keep) * 2 + 4096
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(tmpl, array, len(messages), add_generation_prompt, buf, size)
        if n < 0:
            raise UIOError("llama.cpp does not know this model's chat template")
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n + 1
    raise UIOError("chat template rendering failed")


def first_turn(
    template: str | None, question: str, preamble: list[tuple[str, str]] = (), sep: str = "\n\n"
) -> tuple[str, str]:
    """The first user turn, book + sep + question after the preamble's messages (system ones), split
    where the book goes: (what comes before the book, what comes after it)."""
    text = render(template, [*preamble, ("user", f"{BOOK_MARKER}{sep}{question}")], True)
    before, after = text.split(BOOK_MARKER, 1)
    return before, after


def opening(template: str | None, preamble: list[tuple[str, str]] = ()) -> str:
    """What the chat template puts before the book in the first user turn."""
    return first_turn(template, "?", preamble)[0]


def document_tokens(model, book: str, preamble: list[tuple[str, str]] = ()):
    """The tokens the conversation reads before the first question: the template's opening and the book."""
    return model.tokenize(opening(model.chat_template(), preamble) + book, add_special=True)
