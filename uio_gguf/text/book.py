"""Reading the user's document: a clear error for what is not text, a warning for what is nearly text."""

from __future__ import annotations

import warnings
from pathlib import Path

from uio_gguf.errors import UIOError

SAMPLE_CHARS = 65536  # text vs binary is decided on the first characters
# Share of control characters (other than whitespace) and undecodable bytes above which a file is
# binary: a random file has about 60%, text in another encoding (Latin-1 read as UTF-8) a few percent.
MAX_BINARY_SHARE = 0.10
_WHITESPACE_CONTROLS = set("\t\n\r\f\v")
DEFAULT_MAX_UPLOAD_MB = (
    16.0  # the server's upload limit: a 56K-token book (the most the shipped bundles hold) is ~250 KB
)


def binary_share(text: str) -> float:
    """The share of characters in `text` that text does not have: C0/C1 controls other than whitespace,
    and U+FFFD (what undecodable bytes became)."""
    if not text:
        return 0.0
    odd = sum(
        1 for c in text if c == "\ufffd" or (c not in _WHITESPACE_CONTROLS and (c < " " or "\x7f" <= c <= "\x9f"))
    )
    return odd / len(text)


def read_book(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UIOError(f"book not found: {path}")
    if not path.is_file():
        raise UIOError(f"not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UIOError(f"cannot read the book {path}: {err.strerror or err}") from None
    return book_text(data, str(path))


def book_text(data: bytes, name: str) -> str:
    """The text of a book's bytes (a file's, or an upload's: `name` is what the messages call it)."""
    if b"\0" in data[:SAMPLE_CHARS]:
        raise UIOError(f"{name} looks like a binary file, not text")
    share = binary_share(data[: SAMPLE_CHARS * 4].decode("utf-8", errors="replace")[:SAMPLE_CHARS])
    if share > MAX_BINARY_SHARE:
        raise UIOError(f"{name} looks like a binary file, not text ({share:.0%} control or undecodable characters)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        warnings.warn(
            f"{name} is not valid UTF-8 (first bad byte at offset {err.start}); undecodable bytes were replaced",
            stacklevel=2,
        )
        text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise UIOError(f"{name} is empty")
    return text
