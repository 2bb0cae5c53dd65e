"""Chat recall crops (train.chat_recall): the runtime's pass-key chat turn as a training crop, scored on
its answer alone, and `uio-gguf train --chat-recall-share`."""

import json
import re

import numpy as np
import pytest
import torch

# the crop shape and the fixtures (tokenizer, filler crops, book) of the retrieval crops' tests
from tests.helpers import CROP_SEGMENT, CROP_SEGMENTS, checkpoint_weights, train_run
from uio_gguf.errors import UIOError
from uio_gguf.llamacpp.template import first_turn
from uio_gguf.train import synthetic
from uio_gguf.train.chat_recall import POOL_FILE, ChatRecallCrops, ChatRecallPool
from uio_gguf.train.model import IGNORE

SEGMENT, T = CROP_SEGMENT, CROP_SEGMENTS


@pytest.fixture(scope="module")
def pool(tokenizer):
    return ChatRecallPool.build(tokenizer, count=32)


def test_a_crop_is_what_the_runtime_feeds_and_scores_the_answer_alone(tokenizer, pool, filler_crops, embedded_gguf):
    from uio_gguf.llamacpp.api import Model

    vocab = Model(embedded_gguf, vocab_only=True)
    before, after = first_turn(tokenizer.chat_template, synthetic.PASSKEY_QUESTION)
    maker = ChatRecallCrops(pool, SEGMENT, T * SEGMENT + 1)
    rng = np.random.default_rng(0)
    for i in range(16):
        row, labels = maker.make(filler_crops[i % len(filler_crops)], rng)
        assert row.shape == labels.shape == (T * SEGMENT + 1,)
        scored = np.flatnonzero(labels != IGNORE)
        assert (labels[scored] == row[scored]).all()
        # the answer closes the crop, inside the last window, and ends the assistant's turn
        assert scored[0] > (T - 1) * SEGMENT and scored[-1] == len(row) - 1 and (np.diff(scored) == 1).all()
        assert any(vocab.is_eog(t) for t in row[scored])
        key = int(re.fullmatch(r"The pass key is (\d{5})\.\s*", tokenizer.decode(row[scored])).group(1))
        # the fact lies whole, on a line of its own, in the memory segments
        fact = tokenizer(f"\n{synthetic.passkey_fact(key)}\n", add_special_tokens=False)["input_ids"]
        at = next(j for j in range(len(row)) if row[j : j + len(fact)].tolist() == fact)
        assert at + len(fact) <= (T - 1) * SEGMENT
        # the chat turn is the runtime's (uio_gguf.chat.conversation.Conversation): the template's opening with the
        # book, then the question turn; the book is the crop's text with the fact
        book_end = scored[0] - len(pool.question)
        opening = vocab.tokenize(before, add_special=True).tolist()
        assert row[: len(opening)].tolist() == opening
        assert row[book_end : scored[0]].tolist() == vocab.tokenize(after).tolist()
        assert f"\n{synthetic.passkey_fact(key)}\n" in tokenizer.decode(row[len(opening) : book_end])


def test_the_pool_round_trips_and_belongs_to_its_base(pool, tmp_path):
    path = tmp_path / POOL_FILE
    pool.save(path, "sha256:base")
    loaded = ChatRecallPool.load(path, "sha256:base")
    assert (loaded.head, loaded.question, loaded.tasks) == (pool.head, pool.question, pool.tasks)
    with pytest.raises(UIOError, match="tokenized for another base model"):
        ChatRecallPool.load(path, "sha256:other")


def test_segments_too_short_for_the_turn_are_refused(pool):
    with pytest.raises(UIOError, match="chat recall crops need segments of at least"):
        ChatRecallCrops(pool, 16, 4 * 16 + 1)


def test_chat_recall_run_scores_answers_and_resumes_exactly(make_tiny_model_dir, book, tmp_path):
    model_dir = make_tiny_model_dir("llama")
    straight, chunked, plain = tmp_path / "straight", tmp_path / "chunked", tmp_path / "plain"
    args = ("--steps", "4", "--lr", "1e-2", "--chat-recall-share", "0.5")
    train_run(model_dir, straight, *args, data=book)
    train_run(model_dir, chunked, *args, "--max-minutes", "0", data=book)
    assert (chunked / POOL_FILE).exists()
    changed = train_run(model_dir, chunked, "--steps", "4", "--resume", check=False)  # without the share
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "this run was trained with --chat-recall-share 0.5" in changed.stderr.strip().splitlines()[-1]
    train_run(model_dir, chunked, *args, "--resume")
    a, b = checkpoint_weights(straight / "checkpoint"), checkpoint_weights(chunked / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the recall steps come from the saved data rng
    train_run(model_dir, plain, "--steps", "4", "--lr", "1e-2", data=book)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    plain_log = [json.loads(line) for line in (plain / "log.jsonl").read_text().splitlines()]
    recall_steps = [r["step"] for r in log if r.get("chat_recall")]
    assert 0 < len(recall_steps) < 4, recall_steps  # seed 0 draws both kinds of step
    assert all(r["loss"] != p["loss"] for r, p in zip(log, plain_log) if r.get("chat_recall"))
    bad = train_run(model_dir, tmp_path / "bad", "--steps", "1", "--chat-recall-share", "2", data=book, check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith(
        "--chat-recall-share must lie between 0 and 1"
    )
