"""The web page in a real browser: Debian's chromium, headless, driven by Playwright, over the real
embedded SmolLM2 bundle and the demo book. One server and one browser serve the whole module; the tests
run in order (upload, ask, stop, reload, bad files, a hostile book), each going on from the last.

Never `playwright install`: .ci/run installs Debian's chromium (apt-get install -y chromium)."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from tests.helpers import cache_at, serving  # noqa: E402
from uio_gguf.text import packaged  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-page"
LIMIT_MB = 0.5
DEMO = packaged.path(packaged.DEMO_BOOK)
QUESTION = packaged.DEMO_QUESTION
ANSWER_S = 180_000  # ms an answer may take on a busy 2-core CI machine
COMPRESS_S = 1_800_000  # ms for the demo book's compression there


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(base url, UIOLlama, Library): the embedded bundle served with a key and a small upload limit,
    over a memory cache of its own (the demo book is compressed here, in front of the page)."""
    from uio_gguf.serve.app import create_app
    from uio_gguf.serve.engine import UIOLlama

    with cache_at(tmp_path_factory.mktemp("page-cache")), UIOLlama() as llm:
        app = create_app(llm, "smollm2", api_key=KEY, max_upload_mb=LIMIT_MB)
        with serving(app) as base:
            yield base, llm, app.state.library


@pytest.fixture(scope="module")
def page(site, tmp_path_factory):
    """One tab of a fresh chromium profile on the page, the key given; page errors collected in page.errors."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
            # Playwright's waits evaluate script, which the page's Content-Security-Policy forbids: the test
            # lifts the policy, so the hostile book's test checks the escaping alone.
            bypass_csp=True,
        )
        tab = context.new_page()
        tab.errors = []
        tab.on("pageerror", lambda err: tab.errors.append(str(err)))
        tab.goto(site[0])
        yield tab
        context.close()


def answer_of(page, index: int):
    return page.locator(".turn.assistant").nth(index)


def ask(page, question: str) -> None:
    page.fill("#question", question)
    page.click("#ask")


def wait_answered(page) -> None:
    page.wait_for_selector("#stop", state="hidden", timeout=ANSWER_S)


def test_the_page_asks_for_the_key_and_then_shows_the_model(page):
    sync_api.expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key", KEY)
    page.click("#key-form button")
    sync_api.expect(page.locator("#model")).to_have_text("smollm2")
    sync_api.expect(page.locator("#key-form")).to_be_hidden()


def test_the_demo_book_uploads_and_its_progress_reaches_100_percent(page, site):
    page.set_input_files("#file", str(DEMO))
    page.wait_for_function(
        "document.getElementById('job-bar').value > 0 && document.getElementById('job-bar').value < 1",
        timeout=COMPRESS_S,
    )
    sync_api.expect(page.locator("#job-figures")).to_contain_text("tokens/s")
    page.wait_for_function("document.getElementById('job-bar').value === 1", timeout=COMPRESS_S)
    sync_api.expect(page.locator("#job-figures")).to_contain_text("100%")
    sync_api.expect(page.locator("#chat-title")).to_contain_text("A field guide to the Python standard library")
    assert [job.state for job in site[2].jobs.values()] == ["ready"]


def test_the_answer_streams_the_access_code_with_a_source_that_holds_it(page, site):
    ask(page, QUESTION)
    sync_api.expect(answer_of(page, 0)).to_contain_text("7419", timeout=ANSWER_S)
    wait_answered(page)
    passages = page.locator(".turn.assistant").nth(0).locator(".passage")
    assert any("7419" in text for text in passages.all_inner_texts())
    marked = {m.lower() for m in page.locator(".turn.assistant").nth(0).locator("mark").all_inner_texts()}
    assert {"access", "code", "archive"} <= marked
    assert "% into the book" in page.locator(".source .place").first.inner_text()
    memory = page.locator(".sources .memory").first.inner_text()
    used, full = (
        int(n.replace(",", "")) for n in re.search(r"([\d,]+) cells used.*would need ([\d,]+)", memory).groups()
    )
    assert 0 < used < full
    if os.environ.get("UIO_GGUF_SCREENSHOT"):  # docs/web-page.png is made this way (docs/serving.md)
        page.screenshot(path=os.environ["UIO_GGUF_SCREENSHOT"], full_page=True)


def test_the_stop_button_stops_an_answer_midway(page, site):
    llm = site[1]
    before = llm.stats()["cancelled"]
    ask(page, "Write a long essay about every module this guide describes, one paragraph per module.")
    answer = answer_of(page, 1)
    page.wait_for_function(
        "document.querySelectorAll('.turn.assistant .answer')[1].textContent.length > 20", timeout=ANSWER_S
    )
    page.click("#stop")
    sync_api.expect(answer).to_contain_text("[stopped]")
    sync_api.expect(page.locator("#stop")).to_be_hidden()
    for _ in range(100):  # the server notices the closed stream at its next token
        if llm.stats()["cancelled"] > before:
            break
        page.wait_for_timeout(100)
    assert llm.stats()["cancelled"] == before + 1


def test_after_a_reload_the_book_is_picked_from_the_list_and_answers_without_compressing(page, site):
    _, llm, library = site
    jobs = dict(library.jobs)
    page.reload()
    book = page.locator("#books button", has_text="A field guide to the Python standard library")
    sync_api.expect(book).to_contain_text("ratio 8")
    book.click()
    ask(page, QUESTION)
    sync_api.expect(answer_of(page, 0)).to_contain_text("7419", timeout=ANSWER_S)
    wait_answered(page)
    assert library.jobs == jobs  # no new compression job
    assert llm.stats()["compressed"] == 0  # every conversation read the memory file


def test_a_binary_file_and_an_oversized_one_each_get_their_message(page, tmp_path):
    binary = tmp_path / "noise.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    page.set_input_files("#file", str(binary))
    sync_api.expect(page.locator("#book-message")).to_have_text(re.compile(r"^noise\.bin looks like a binary file"))
    big = tmp_path / "big.txt"
    big.write_text("word " * int(LIMIT_MB * 2**20 / 4))
    page.set_input_files("#file", str(big))
    sync_api.expect(page.locator("#book-message")).to_contain_text(f"over this server's limit of {LIMIT_MB:g} MB")


def test_a_book_holding_html_shows_it_as_text_and_runs_nothing(page, tmp_path):
    hostile = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> Notes on the parrot'
    # ~2,200 tokens: the parrot's line lies outside chat's 1,024-token raw window, in the memory, where
    # recall looks for it
    lines = DEMO.read_text(encoding="utf-8").splitlines()[4:200]
    parrot = "The parrot says <b>hello</b> <script>window.pwned = 3</script>"
    book = tmp_path / "hostile.txt"
    book.write_text("\n".join([hostile, "", *lines[:18], parrot, *lines[18:]]))  # mid-book: recall finds it
    page.set_input_files("#file", str(book))
    sync_api.expect(page.locator("#chat-title")).to_contain_text(hostile, timeout=COMPRESS_S)
    sync_api.expect(page.locator("#books button", has_text=hostile)).to_be_visible()
    ask(page, "What does the parrot say?")
    wait_answered(page)
    passages = page.locator(".turn.assistant").nth(0).locator(".passage").all_inner_texts()
    assert any("<script>window.pwned = 3</script>" in text for text in passages)
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # the page's own
    assert page.evaluate("document.querySelectorAll('img, b').length") == 0
    assert page.errors == []
