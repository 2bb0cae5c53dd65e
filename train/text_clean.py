"""Plain prose out of the markups that documentation ships in (HTML, reStructuredText, Markdown), and a
cheap test for English. The model should learn to remember text, not to predict markup."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCKS = {"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table", "ul", "ol"}
_SKIPPED_TAGS = {"head", "script", "style"}
_VOID = {"br", "img", "meta", "link", "hr", "input", "col", "wbr", "area", "base", "source"}  # never closed


class _TextExtractor(HTMLParser):
    """Collects the text of a page, leaving out <head>, scripts and elements whose class or id is
    in `skip` (navigation bars, banners)."""

    def __init__(self, skip: set[str]):
        super().__init__(convert_charrefs=True)
        self.skip = skip
        self.parts: list[str] = []
        self.stack: list[bool] = []  # per open element: is it (or an ancestor) skipped

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        names = set((attrs.get("class") or "").split()) | {attrs.get("id") or ""}
        hidden = (self.stack[-1] if self.stack else False) or tag in _SKIPPED_TAGS or bool(names & self.skip)
        if tag in _BLOCKS:
            self.parts.append("\n")
        if tag not in _VOID:
            self.stack.append(hidden)

    def handle_endtag(self, tag):
        if tag in _VOID:  # <br/> arrives as a start and an end: one line break
            return
        if self.stack:
            self.stack.pop()
        if tag in _BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not (self.stack and self.stack[-1]):
            self.parts.append(data)


def html_to_text(html: str, skip: set[str] = frozenset()) -> str:
    parser = _TextExtractor(set(skip))
    parser.feed(html)
    parser.close()
    # Leading whitespace is the page source's indentation, not the text's.
    return tidy("\n".join(line.lstrip() for line in "".join(parser.parts).split("\n")))


_RST_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`os.path.join` -> os.path.join
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\. [a-z:-]+::[ \t]*", re.M)  # `.. function:: open(file)` -> `open(file)`
_RST_DROPPED = re.compile(r"^\s*(?:\.\.(?:\s(?!.*::).*)?|:[a-z-]+:\s*\S*\s*)$\n?", re.M)  # comments, labels, options
_UNDERLINE = re.compile(r"^[=\-~^\"'`#*+]{3,}\s*$", re.M)
_LITERAL = re.compile(r"``([^`]+)``")


def rst_to_text(rst: str) -> str:
    text = _RST_ROLE.sub(r"\1", rst)
    text = _LITERAL.sub(r"\1", text)
    text = _RST_DROPPED.sub("", text)
    text = _RST_DIRECTIVE.sub(r"\1", text)
    return tidy(_UNDERLINE.sub("", text))


def tidy(text: str) -> str:
    """Trailing spaces removed, runs of blank lines folded to one, no leading or trailing blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\xa0", " ").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_COMMON_WORDS = frozenset(
    "the of and to a in is that for it as with be on this are by an or not from at which can you if".split()
)


def looks_english(text: str, min_share: float = 0.06) -> bool:
    """Mostly ASCII letters, and enough of the commonest English words (technical prose has about
    0.1–0.2, other languages about 0)."""
    sample = text[:20_000]
    letters = [c for c in sample if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return False
    words = re.findall(r"[a-z]+", sample.lower())
    return bool(words) and sum(w in _COMMON_WORDS for w in words) >= min_share * len(words)
