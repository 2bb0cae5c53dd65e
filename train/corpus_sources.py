"""Where long English training text comes from without a network: what Debian and PyPI packages install.

Each source yields Documents; a document is the unit of the train / held-out split (a book chapter, a
documentation page, a module's docstrings). A source that is not installed raises SourceMissing with
the command that installs it: the data command reports it and goes on without it.

Most sources are manuals and documentation. The prose sources (literature, scripture: public-domain texts
that Debian packages ship) broaden that; an out-of-domain source is kept whole out of training, so that
its text measures the memory on a kind of text training never saw.
"""

from __future__ import annotations

import ast
import gzip
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from uio_gguf.train.text_clean import html_to_text, rst_to_text, tidy

SHARE = Path("/usr/share")


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    license: str
    origin: str  # where it was read from (file, chapter): lets a reader check the split by document


class SourceMissing(Exception):
    """The source's files are not on this machine; the message says how to install them."""


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    read: Callable[[], Iterator[Document]]
    prose: bool = False  # literature or scripture, not documentation: its share of train is reported
    out_of_domain: bool = False  # every document goes to the out-of-domain held-out file, none to training


def _read_text(path: Path) -> str | None:
    """A file's text, gunzipped when it ends in .gz; None when it is not UTF-8."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ----- Debian packages: books and manuals ------------------------------------------------------------
_NEXT_PAGE = re.compile(r'<link rel="next" href="([^"#]+)"')
_PAGE_TITLE = re.compile(r"<title[^>]*>([^<]*)</title>")


def debian_handbook() -> Iterator[Document]:
    """The Debian Administrator's Handbook, one document per chapter, pages read in the book's order
    (each page names the next one)."""
    book = SHARE / "doc/debian-handbook/html/en-US"
    if not (book / "index.html").is_file():
        raise SourceMissing("apt-get install debian-handbook")
    chapters: list[tuple[str, list[str]]] = [("front matter", [])]
    page, seen = book / "index.html", {"index.html"}
    while (found := _NEXT_PAGE.search(page.read_text(encoding="utf-8"))) and found.group(1) not in seen:
        page = book / found.group(1)
        seen.add(page.name)
        html = page.read_text(encoding="utf-8")
        title = " ".join((_PAGE_TITLE.search(html) or [None, ""])[1].split())  # no-break spaces too
        if re.match(r"(Chapter|Appendix)\s", title):
            chapters.append((title, []))
        chapters[-1][1].append(html_to_text(html, skip={"banner", "title", "docnav"}))
    for title, pages in chapters:
        if pages:
            yield Document("\n\n".join(pages), "debian-handbook", "GPL-2.0+ or CC-BY-SA-3.0", f"{book}#{title}")


def debian_reference() -> Iterator[Document]:
    """Debian Reference (Osamu Aoki), its plain-text edition cut into chapters; the table of contents
    before chapter 1 is left out."""
    paths = sorted((SHARE / "debian-reference").glob("debian-reference.en.txt*"))
    if not paths:
        raise SourceMissing("apt-get install debian-reference-en")
    text = _read_text(paths[0]) or ""
    starts = [m.start() for m in re.finditer(r"^(?:Chapter\s\d+\.|Appendix\s[A-Z]\.)\s", text, re.M)]
    for begin, end in zip(starts, starts[1:] + [len(text)]):
        chapter = text[begin:end]
        yield Document(tidy(chapter), "debian-reference", "GPL-2+", f"{paths[0]}#{chapter.splitlines()[0]}")


def python_docs() -> Iterator[Document]:
    """The Python documentation (tutorial, library reference, HOWTOs), one page a document, from the
    reStructuredText sources that Debian's pythonX.Y-doc ships next to the HTML."""
    roots = sorted(
        SHARE.glob("doc/python3*/html/_sources"), key=lambda p: [int(n) for n in re.findall(r"\d+", p.parts[-3])]
    )
    if not roots:
        raise SourceMissing("apt-get install python3-doc")
    for path in sorted(roots[-1].rglob("*.txt")):
        if path.name.startswith("changelog"):  # bug numbers, not prose
            continue
        yield Document(rst_to_text(path.read_text(encoding="utf-8")), "python-docs", "PSF-2.0", str(path))


# ----- what any Debian system and Python installation carries ----------------------------------------
def _debian_license(package_dir: Path) -> str:
    """The licence of a package's `Files: *` paragraph in its machine-readable copyright file."""
    copyright_file = package_dir / "copyright"
    text = _read_text(copyright_file) if copyright_file.is_file() else None
    found = re.search(r"^Files: \*\s*$(?:\n(?!\n).*)*?\nLicense: *(.+)$", text or "", re.M)
    return found.group(1).strip() if found else f"see {copyright_file}"


_DOC_NAMES = re.compile(r"^(README|FAQ|NEWS|USAGE|INSTALL|HACKING|TODO)|\.(txt|md|rst)$", re.I)
_OWN_SOURCES = ("debian-handbook", "debian-reference", "python3")  # read by their own sources


def debian_docs() -> Iterator[Document]:
    """READMEs, FAQs and manuals in /usr/share/doc (changelogs and copyright files left out)."""
    if not (SHARE / "doc").is_dir():
        raise SourceMissing(f"{SHARE / 'doc'} is missing: this is not a Debian-like system")
    for package_dir in sorted(p for p in (SHARE / "doc").iterdir() if p.is_dir()):
        if package_dir.name.startswith(_OWN_SOURCES):
            continue
        license_ = None
        for path in sorted(package_dir.glob("*")) + sorted(package_dir.glob("*/*")):
            name = path.name.removesuffix(".gz")
            if not path.is_file() or "changelog" in name.lower() or not _DOC_NAMES.search(name):
                continue
            text = _read_text(path)
            if text:
                license_ = license_ or _debian_license(package_dir)
                yield Document(
                    tidy(rst_to_text(text) if name.endswith(".rst") else text), "debian-docs", license_, str(path)
                )


def common_licenses() -> Iterator[Document]:
    """The licence texts Debian keeps in /usr/share/common-licenses (each allows verbatim copies)."""
    if not (SHARE / "common-licenses").is_dir():
        raise SourceMissing("apt-get install base-files")
    seen = set()
    for path in sorted((SHARE / "common-licenses").glob("*")):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            yield Document(tidy(_read_text(real) or ""), "licenses", "verbatim copying permitted", str(path))


_SKIPPED_STDLIB = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def python_stdlib() -> Iterator[Document]:
    """Docstrings of the standard library, one module file a document, read with `ast` (importing
    every module would run code: `antigravity` opens a browser)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_STDLIB & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and (isinstance(node, ast.Module) or len(doc) > 200):
                    docs.append(doc)
        if docs:
            yield Document(tidy("\n\n".join(docs)), "python-stdlib", "PSF-2.0", str(path))


def _pypi_license(meta) -> str:
    expression = meta.get("License-Expression")
    if expression:
        return expression
    declared = (meta.get("License") or "").strip()
    if declared and "\n" not in declared and len(declared) <= 60:
        return declared
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(classifiers) or "see the package's metadata"


def pypi_descriptions() -> Iterator[Document]:
    """The long descriptions (READMEs) of the Python distributions installed where this runs."""
    seen = set()
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = (dist.metadata["Name"] or "").lower()
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name and name not in seen and text.strip():
            seen.add(name)
            yield Document(tidy(text), "pypi-descriptions", _pypi_license(dist.metadata), f"pypi:{name}")


# ----- public-domain prose that Debian packages ship ---------------------------------------------------
_BOOK_START = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]+) 1$", re.M)  # "Genesis 1", "1 Kings 1": a book's chapter 1
KJV_LICENSE = "public domain (King James Version, 1611; copyright expired)"


def bible_books(dump: str) -> Iterator[tuple[str, str]]:
    """(book, text) of each book in what `bible` prints: each book opens with its chapter-1 heading."""
    starts = list(_BOOK_START.finditer(dump))
    for found, following in zip(starts, starts[1:] + [None]):
        yield found.group(1), dump[found.start() : following.start() if following else len(dump)].strip()


def bible_kjv() -> Iterator[Document]:
    """The King James Bible, one document per book, as Debian's `bible` tool prints it (verse numbers
    indented at each verse, chapter headings). Out of domain: kept whole out of training."""
    if shutil.which("bible") is None:
        raise SourceMissing("apt-get install bible-kjv")
    dump = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    for book, text in bible_books(dump):
        yield Document(text, "bible-kjv", KJV_LICENSE, f"bible-kjv#{book}")


AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
AUSTEN_PACKAGE = Path("/usr/lib/R/site-library/janeaustenr")


def jane_austen() -> Iterator[Document]:
    """Jane Austen's six novels (public domain), one document each, from the R package janeaustenr that
    Debian ships as r-cran-janeaustenr (each novel a character vector of its lines; R prints them)."""
    if not AUSTEN_PACKAGE.is_dir() or shutil.which("Rscript") is None:
        raise SourceMissing("apt-get install --no-install-recommends r-cran-janeaustenr")
    for novel in AUSTEN_NOVELS:
        lines = subprocess.run(
            ["Rscript", "-e", f"writeLines(janeaustenr::{novel})"], capture_output=True, text=True, check=True
        ).stdout
        yield Document(
            tidy(lines), "jane-austen", "public domain (novels, 1811-1818); janeaustenr: MIT", f"janeaustenr::{novel}"
        )


def devils_dictionary() -> Iterator[Document]:
    """Ambrose Bierce's The Devil's Dictionary (1911, public domain), one document, from the dictd
    database of Debian's dict-devil (gzip-compatible); dictd's own header entries left out."""
    path = SHARE / "dictd/devil.dict.dz"
    if not path.is_file():
        raise SourceMissing("apt-get install dict-devil")
    text = gzip.open(path).read().decode("utf-8", errors="replace")
    start = text.find("The Internet Wiretap")
    text = text[max(start, 0) :].removesuffix("\n").removesuffix(" abcdefghijklmnopqrstuvwxyz")  # dictd's alphabet
    yield Document(tidy(text), "devils-dictionary", "public domain (1911)", str(path))


def extra_dir(directory: Path, license_: str) -> Iterator[Document]:
    """Text files the user brings (.txt, .md, .rst under a folder), one document each."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.suffix in (".txt", ".md", ".rst"):
            text = _read_text(path)
            if text:
                yield Document(tidy(text), "extra", license_, str(path))


SOURCES = {
    source.name: source
    for source in (
        Source(
            "debian-handbook", "The Debian Administrator's Handbook (Debian package debian-handbook)", debian_handbook
        ),
        Source("debian-reference", "Debian Reference (Debian package debian-reference-en)", debian_reference),
        Source("python-docs", "The Python documentation (Debian package python3-doc)", python_docs),
        Source("debian-docs", "READMEs and manuals of the installed Debian packages", debian_docs),
        Source("licenses", "Licence texts in /usr/share/common-licenses", common_licenses),
        Source("python-stdlib", "Docstrings of the Python standard library", python_stdlib),
        Source("pypi-descriptions", "Long descriptions of the installed Python packages", pypi_descriptions),
        Source("jane-austen", "Jane Austen's novels (Debian package r-cran-janeaustenr)", jane_austen, prose=True),
        Source(
            "devils-dictionary",
            "Ambrose Bierce, The Devil's Dictionary (Debian package dict-devil)",
            devils_dictionary,
            prose=True,
        ),
        Source(
            "bible-kjv",
            "The King James Bible, out of domain (Debian package bible-kjv)",
            bible_kjv,
            prose=True,
            out_of_domain=True,
        ),
    )
}
