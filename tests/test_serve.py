"""`uio-gguf serve` and UIOLlama (docs/design.md §7): the server runs on 127.0.0.1 over a tiny bundle and
the real `openai` client drives it; answers are checked against a Conversation run in-process (greedy),
and the drop-in class against a real llama_cpp.Llama on a text that fits the raw window."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.helpers import free_port, run_cli, serving, wait_healthy  # noqa: E402

SEGMENT = 64  # a raw window that holds a short chat, for the llama.cpp comparison
N_CTX = 1536  # books up to 1856 tokens: a small decoder context per conversation
WIDE_CTX = 8192  # the tiny model's trained context: books up to 28,480 tokens
KEY = "sk-test"


@pytest.fixture(scope="module")
def bundle(make_tiny_bundle):
    return make_tiny_bundle("llama", segment=SEGMENT, ratio=4, outtype="f32")[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Memory files of this module go to a cache of their own."""
    before = os.environ.get("UIO_GGUF_CACHE")
    os.environ["UIO_GGUF_CACHE"] = str(tmp_path_factory.mktemp("serve-cache"))
    yield
    if before is None:
        del os.environ["UIO_GGUF_CACHE"]
    else:
        os.environ["UIO_GGUF_CACHE"] = before


@pytest.fixture(scope="module")
def server(bundle, cache):
    """(base url, UIOLlama): the app in a uvicorn server on a thread of this process."""
    from uio_gguf.serve.app import create_app
    from uio_gguf.serve.engine import UIOLlama

    llm = UIOLlama(bundle, n_ctx=N_CTX, keep=4)
    with serving(create_app(llm, "tiny", parallel=2, queue=2, api_key=KEY)) as base:
        yield base, llm
    llm.close()


@pytest.fixture(scope="module")
def wide(server):
    """(base url, UIOLlama): a second server over the same runtime, its 8192-token window holding a book of
    ~28K tokens: long enough to compress that a client can leave in the middle."""
    from uio_gguf.serve.app import create_app
    from uio_gguf.serve.engine import UIOLlama

    llm = UIOLlama(runtime=server[1].runtime, n_ctx=WIDE_CTX)
    with serving(create_app(llm, "tiny")) as base:
        yield base, llm
    llm.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def books(prose):
    """Two books of several segments each (different text), and one too long for N_CTX."""
    return prose[:1500], prose[3000:4500], prose[:30000]


def counters(server) -> dict:
    return httpx.get(f"{server[0]}/health").json()["counters"]


def reference(llm, book: str, questions: list[str], max_tokens: int) -> list[str]:
    """The answers of a Conversation in this process, greedy: what the server must send."""
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.llamacpp.sampling import SamplingParams

    with Conversation(llm.runtime, book, n_ctx=N_CTX, use_memory_files=False) as conv:
        return ["".join(conv.ask(q, SamplingParams(max_tokens=max_tokens))) for q in questions]


def ask(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)


def user(book: str, question: str) -> dict:
    return {"role": "user", "content": f"{book}\n\n{question}"}


def _wait_until_idle(base_url: str) -> dict:
    """/health once no slot is busy (a worker notices a gone client at its next token); asserts it gets there."""
    for _ in range(600):
        state = httpx.get(f"{base_url}/health").json()
        if state["slots"]["busy"] == 0:
            break
        time.sleep(0.05)
    assert state["slots"]["busy"] == 0
    return state


@pytest.mark.slow
def test_the_demo_book_through_the_server_gives_the_access_code():
    """The embedded SmolLM2 bundle, the bundled 13K-token demo book and its question, through the
    server and the openai client (recall brings the code's passage back; docs/design.md §6). First in the
    file, so it runs before the other tests point the memory-file cache at a folder of their own (a
    memory file of the demo book from `make demo` is then reused)."""
    from uio_gguf.serve.app import create_app
    from uio_gguf.serve.engine import UIOLlama
    from uio_gguf.text.packaged import DEMO_BOOK, DEMO_QUESTION, read

    book = read(DEMO_BOOK)
    with UIOLlama() as llm, serving(create_app(llm, "smollm2")) as base:
        local = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=3600)
        out = local.chat.completions.create(
            model="smollm2", messages=[user(book, DEMO_QUESTION)], temperature=0, max_tokens=16
        )
    assert "7419" in out.choices[0].message.content


# ----- completions ---------------------------------------------------------------------------------
def test_a_completion_answers_over_the_book_as_the_conversation_does(server, client, books):
    before = counters(server)
    out = ask(client, [user(books[0], "What is it about?")], max_tokens=12)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "tiny"
    choice = out.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == reference(server[1], books[0], ["What is it about?"], 12)[0]
    assert 0 < out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 3 * SEGMENT
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    after = counters(server)
    assert after["compressed"] == before["compressed"] + 1 and after["from_file"] == before["from_file"]


def test_a_streamed_completion_sends_the_same_answer_in_chunks(server, client, books):
    question = "Who is speaking?"
    plain = ask(client, [user(books[0], question)], max_tokens=10)
    chunks = list(ask(client, [user(books[0], question)], max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].finish_reason is None
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices[0].delta.content is None
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content and len(chunks) > 3


def test_an_empty_stop_string_is_ignored(client, books):
    messages = [user(books[0], "What is it about?")]
    plain = ask(client, messages, max_tokens=6).choices[0].message.content
    assert plain
    for stop in ("", [""], ["", "\u2063never"]):
        assert ask(client, messages, max_tokens=6, stop=stop).choices[0].message.content == plain, stop


def test_the_same_book_again_is_read_from_its_memory_file(server, client, books):
    ask(client, [user(books[1], "First question?")], max_tokens=4)
    before = counters(server)
    ask(client, [user(books[1], "A different question?")], max_tokens=4)
    after = counters(server)
    assert after["from_file"] == before["from_file"] + 1
    assert after["compressed"] == before["compressed"]


def test_a_longer_conversation_continues_its_session(server, client, books):
    q1, q2 = "Name one thing in it.", "And another?"
    first = ask(client, [user(books[1], q1)], max_tokens=8).choices[0].message.content
    before = counters(server)
    history = [user(books[1], q1), {"role": "assistant", "content": first}, {"role": "user", "content": q2}]
    second = ask(client, history, max_tokens=8).choices[0].message.content
    after = counters(server)
    assert after["continued"] == before["continued"] + 1
    assert (after["compressed"], after["from_file"]) == (before["compressed"], before["from_file"])
    assert [first, second] == reference(server[1], books[1], [q1, q2], 8)


def test_a_history_the_server_did_not_write_is_read_in_as_sent(server, books):
    """An assistant turn the app did not get from us (another model's, say) is read as text, not
    generated (recall off, so the raw text is all that differs between the turns)."""
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.llamacpp.sampling import SamplingParams
    from uio_gguf.llamacpp.template import first_turn
    from uio_gguf.serve.engine import UIOLlama

    q1, q2 = "Name one thing in it.", "And another?"
    history = [user(books[0], q1), {"role": "assistant", "content": "A river."}, {"role": "user", "content": q2}]
    llm = UIOLlama(runtime=server[1].runtime, n_ctx=N_CTX, recall_tokens=0, use_memory_files=False)
    with llm:
        answer = llm.create_chat_completion(history, temperature=0, max_tokens=8)["choices"][0]["message"]["content"]
        assert llm.stats()["continued"] == 0

    # By hand: the book is read, then the rest of the first turn and the given answer as raw text.
    with Conversation(server[1].runtime, books[0], n_ctx=N_CTX, use_memory_files=False, recall_tokens=0) as conv:
        before, after = first_turn(conv.template, q1)
        conv.session.feed(conv.model.tokenize(after + "A river."))
        conv.seen_text = before + books[0] + after + "A river."
        conv.messages = [("user", f"{books[0]}\n\n{q1}"), ("assistant", "A river.")]
        expected = "".join(conv.ask(q2, SamplingParams(max_tokens=8)))
    assert answer == expected


def test_the_cache_layout_options_reach_each_conversation(server, books):
    """UIOLlama(raw_window=, keep_tokens=, reread=, memory_window=) (serve --raw-window, --keep-tokens,
    --reread, --memory-window): the conversation it opens has that layout, and answers as a Conversation
    built with it by hand."""
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.llamacpp.sampling import SamplingParams
    from uio_gguf.serve.engine import UIOLlama

    runtime, q = server[1].runtime, "Name one thing in it."
    window, memory = 4 * runtime.segment, runtime.slots  # the latest segment's memory only
    llm = UIOLlama(
        runtime=runtime,
        n_ctx=N_CTX,
        recall_tokens=0,
        use_memory_files=False,
        raw_window=window,
        keep_tokens=4,
        reread=True,
        memory_window=memory,
    )
    with llm:
        answer = llm.create_chat_completion([user(books[0], q)], temperature=0, max_tokens=8)
        (kept,) = llm._kept.values()
        assert kept.session.raw_window == window and kept.session.keep == 4 and len(kept.session.sink) == 4
        assert kept.session.reread and kept.session.n_mem == memory < kept.session.compressed_segments * runtime.slots
    with Conversation(
        runtime,
        books[0],
        n_ctx=N_CTX,
        use_memory_files=False,
        recall_tokens=0,
        raw_window=window,
        keep=4,
        reread=True,
        memory_window=memory,
    ) as conv:
        expected = "".join(conv.ask(q, SamplingParams(max_tokens=8)))
    assert answer["choices"][0]["message"]["content"] == expected


# ----- errors ----------------------------------------------------------------------------------------
def test_a_book_too_long_is_400_with_the_longest_that_fits(server, client, books):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, [user(books[2], "What is it about?")], max_tokens=4)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["code"] == "context_length_exceeded"
    assert f"holds at most {server[1].max_book_tokens()}" in error["message"]
    assert ask(client, [{"role": "user", "content": "Hi"}], max_tokens=2).choices[0].message.role == "assistant"


def test_a_later_turn_too_long_is_refused_before_it_is_read(server, client, prose):
    """A long later turn (or assistant turn sent back) was fed segment by segment into a full window: the
    slot busy for minutes, then a 400 without a code. Every turn gets the first turn's check up front."""
    long = prose[:40000]
    chats = [
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": long},
        ],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long}, {"role": "user", "content": "So?"}],
    ]
    for messages, stream in [(chats[0], False), (chats[0], True), (chats[1], False)]:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, messages, max_tokens=4, stream=stream)
        assert caught.value.body["code"] == "context_length_exceeded"
        assert f"holds at most {server[1].max_book_tokens()}" in caught.value.body["message"]
    assert httpx.get(f"{server[0]}/health").json()["slots"]["busy"] == 0
    assert ask(client, chats[0][:2] + [{"role": "user", "content": "Hi"}], max_tokens=2).choices[0].finish_reason


def test_a_client_that_leaves_while_its_book_is_compressed_stops_the_compression(wide, prose):
    """The client leaves a second in: the compression stops at its next segment (nothing is counted as
    compressed), not only the answer at its first token once the whole book was compressed."""
    base, llm = wide
    before = llm.stats()
    body = {"messages": [user(prose[:120000], "What is it about?")], "max_tokens": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=1.0)
    state = _wait_until_idle(base)
    assert state["counters"]["cancelled"] == before["cancelled"] + 1
    assert (state["counters"]["compressed"], state["counters"]["requests"]) == (
        before["compressed"],
        before["requests"] + 1,
    )


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        (json.dumps({"model": "tiny"}).encode(), 422),
        (json.dumps({"messages": []}).encode(), 422),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 422),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 422),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(), 400),
        (json.dumps([{"role": "user", "content": "x"}]).encode(), 422),
    ],
)
def test_a_malformed_request_gets_an_openai_error_and_the_server_goes_on(server, body, status):
    base = server[0]
    reply = httpx.post(
        f"{base}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert not error["message"].startswith("None")  # a body with no field to name (a JSON array) said "None: ..."
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be 1 or more"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "must be 1 or more"),
        ({"n": 2}, "n", "n must be 1"),
        ({"messages": [{"role": "user", "content": None}]}, "messages", "content is null"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
            "image_url are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "input_audio"}]}]},
            "messages",
            "input_audio are not supported",
        ),
    ],
)
def test_what_the_server_cannot_honour_is_a_400_that_says_so(server, fields, param, message):
    """max_tokens 0 was read as no limit (the CLI's -n 0 is an empty answer), n 2 got one choice,
    images and null content were answered as if the text were empty."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | fields
    reply = httpx.post(f"{server[0]}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"], error
    ok = httpx.post(
        f"{server[0]}/v1/chat/completions",
        json=body
        | {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "max_completion_tokens": None, "n": 1},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert ok.status_code == 200, ok.text


def test_an_unknown_model_is_404_and_a_bad_key_401(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(wrong, [{"role": "user", "content": "Hi"}], max_tokens=2)
    assert [m.id for m in client.models.list().data] == ["tiny"]


# ----- concurrency -----------------------------------------------------------------------------------
def test_two_clients_at_once_each_get_their_own_stream(server, client, books):
    requests = [[user(books[0], "What happens first?")], [user(books[1], "What happens last?")]]
    expected = [ask(client, r, max_tokens=24).choices[0].message.content for r in requests]
    assert expected[0] != expected[1]
    got: list = [None, None]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        stream = ask(client, requests[i], max_tokens=24, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_a_book_asked_about_twice_at_once_is_compressed_once(server, client, prose):
    book = prose[6000:7500]
    before = counters(server)
    start = threading.Barrier(2)

    def run(question: str) -> None:
        start.wait()
        ask(client, [user(book, question)], max_tokens=2)

    threads = [threading.Thread(target=run, args=(q,)) for q in ("Who?", "Where?")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = counters(server)
    assert (after["compressed"], after["from_file"]) == (before["compressed"] + 1, before["from_file"] + 1)


def test_a_client_that_leaves_mid_stream_stops_its_answer_and_frees_its_slot(server, client):
    before = counters(server)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        temperature=1.0,
        seed=3,
        max_tokens=1000,
        stream=True,
    )
    next(iter(stream))
    stream.close()
    state = _wait_until_idle(server[0])
    assert state["counters"]["cancelled"] == before["cancelled"] + 1
    assert ask(client, [{"role": "user", "content": "Hi"}], max_tokens=2).choices[0].finish_reason


def test_past_the_queue_a_request_gets_503():
    import asyncio

    from uio_gguf.serve.app import APIError, RequestLimit

    async def scenario():
        limit = RequestLimit(parallel=1, queue=1)
        await limit.acquire()  # the one answer at once
        waiter = asyncio.create_task(limit.acquire())
        await asyncio.sleep(0)
        assert limit.state()["waiting"] == 1
        try:
            await limit.acquire()
        except APIError as err:
            refused = err.status
        limit.release()
        await waiter  # the queued request gets the slot
        return refused, limit.state()

    refused, state = asyncio.run(scenario())
    assert refused == 503 and (state["busy"], state["waiting"]) == (1, 0)


def test_a_client_that_leaves_a_plain_request_stops_its_answer(server):
    before = counters(server)
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 1000}
    headers = {"authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 1000 tokens
        httpx.post(
            f"{server[0]}/v1/chat/completions",
            json=body | {"temperature": 1.0, "seed": 5},
            headers=headers,
            timeout=0.5,
        )
    state = _wait_until_idle(server[0])
    assert state["counters"]["cancelled"] == before["cancelled"] + 1


# ----- the drop-in class -------------------------------------------------------------------------------
def test_uiollama_returns_what_llama_cpp_returns(bundle, server):
    """A chat that fits the raw window: the same greedy text and the same keys, chunk by chunk."""
    import llama_cpp

    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    ref = llama_cpp.Llama(model_path=str(bundle / "model.gguf"), n_ctx=256, verbose=False, seed=0)
    ours = server[1]
    try:
        want = ref.create_chat_completion(messages, temperature=0, max_tokens=8)
        got = ours.create_chat_completion(messages, temperature=0, max_tokens=8)
        assert want["usage"]["total_tokens"] < SEGMENT  # the whole chat stays in the raw window
        assert set(got) == set(want) and got["object"] == want["object"]
        assert set(got["choices"][0]) == set(want["choices"][0])
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
        assert got["usage"] == want["usage"]

        want_chunks = list(ref.create_chat_completion(messages, temperature=0, max_tokens=8, stream=True))
        got_chunks = list(ours.create_chat_completion(messages, temperature=0, max_tokens=8, stream=True))
        for w, g in ((want_chunks[0], got_chunks[0]), (want_chunks[-1], got_chunks[-1])):
            assert set(g) == set(w) and set(g["choices"][0]) == set(w["choices"][0])
            assert g["choices"][0]["delta"] == w["choices"][0]["delta"]
            assert g["choices"][0]["finish_reason"] == w["choices"][0]["finish_reason"]
        join = lambda chunks: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)  # noqa: E731
        assert join(got_chunks) == join(want_chunks) == want["choices"][0]["message"]["content"]
    finally:
        ref.close()


# ----- the command -----------------------------------------------------------------------------------
def serve_command(bundle, port: int, env: dict, n_ctx: int = N_CTX):
    """`uio-gguf serve` in a process of its own."""
    import subprocess
    import sys

    from tests.helpers import REPO

    return subprocess.Popen(
        [sys.executable, "-c", "from uio_gguf.cli import main; main()", "serve", "-m", str(bundle)]
        + ["--port", str(port), "--n-ctx", str(n_ctx)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_serve_command_serves_until_stopped(bundle, cache_env):
    port = free_port()
    proc = serve_command(bundle, port, cache_env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        local = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        model = local.models.list().data[0].id
        assert model == bundle.name
        out = local.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert out.choices[0].message.role == "assistant"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}/v1" in err


def test_sigterm_while_a_book_is_compressed_stops_the_server_at_once(bundle, cache_env, prose):
    """SIGTERM waited for a compression in progress to finish (minutes); the compression now stops at its
    next segment, its client gets a 503, and the server exits without writing the memory file."""
    import signal
    from pathlib import Path

    port = free_port()
    proc = serve_command(bundle, port, cache_env, n_ctx=WIDE_CTX)
    base = f"http://127.0.0.1:{port}"
    replies = []

    def post() -> None:
        body = {"messages": [user(prose[:120000], "What is it about?")], "max_tokens": 4}
        try:
            replies.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600).status_code)
        except httpx.TransportError as err:
            replies.append(type(err).__name__)

    try:
        wait_healthy(base)
        sender = threading.Thread(target=post)
        sender.start()
        while not replies and httpx.get(f"{base}/health").json()["slots"]["busy"] == 0:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        sender.join()
    finally:
        proc.kill()
    # a normal exit: the model and the conversations were closed (uvicorn no longer re-raises the signal)
    assert proc.returncode == 0 and replies == [503] and "uio-gguf serve: stopped" in err
    assert not list(Path(cache_env["UIO_GGUF_CACHE"]).rglob("*.npz"))  # the compression never finished


def test_serve_without_the_extra_says_so_in_one_line():
    code = "import sys; sys.modules['fastapi'] = None; from uio_gguf.cli import main; sys.argv[1:] = ['serve']; main()"
    import subprocess
    import sys

    from tests.helpers import REPO

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip() == "uio-gguf: error: the serve extra is not installed: pip install 'uio-gguf[serve]'"
    assert "serve" in run_cli("--help").stdout
