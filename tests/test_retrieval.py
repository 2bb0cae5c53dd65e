"""Retrieval crops (train.retrieval) and the fine-tuning options of `uio-gguf train`: --retrieval-share
and --init."""

import json
import re

import numpy as np
import pytest
import torch

from tests.helpers import CROP_SEGMENT, CROP_SEGMENTS, checkpoint_weights, run_cli, train_run
from uio_gguf.errors import UIOError
from uio_gguf.train import synthetic
from uio_gguf.train.retrieval import POOL_FILE, RetrievalCrops, build_pool, load_pool, save_pool

SEGMENT, T = CROP_SEGMENT, CROP_SEGMENTS


@pytest.fixture(scope="module")
def pool(tokenizer):
    return build_pool(tokenizer, count=64)


def test_facts_lie_in_memory_and_questions_close_the_crop(tokenizer, pool, filler_crops):
    crops = RetrievalCrops(pool, SEGMENT, T * SEGMENT + 1)
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(40):
        original = filler_crops[i % len(filler_crops)]
        made = crops.make(original.copy(), rng)
        assert made.shape == original.shape and made.dtype == original.dtype
        memory_text = tokenizer.decode(made[: (T - 1) * SEGMENT].tolist())
        last_text = tokenizer.decode(made[(T - 1) * SEGMENT :].tolist())
        asked = re.findall(r"What is the (pass key|value of key ([\w-]+))\? The \1 is (\d{5})\.", last_text)
        assert asked and last_text.endswith(f"{asked[-1][2]}."), last_text
        facts, answers = [], []
        for subject, name, value in asked:  # every answer is stated as a fact, whole, in the memory segments
            kinds.add(subject.split()[0])
            if name:
                facts.append(synthetic.key_value_fact(name, int(value)))
                answers.append(synthetic.key_value_answer(name, int(value)))
            else:
                facts.append(synthetic.passkey_fact(int(value)))
                answers.append(synthetic.passkey_answer(int(value)))
            assert facts[-1] in memory_text, (facts[-1], memory_text)
        # Without the questions and the facts' lines, the crop is the original's first tokens, in order.
        rest = made.tolist()
        tail = tokenizer("\n\n" + "\n".join(answers), add_special_tokens=False)["input_ids"]
        assert rest[-len(tail) :] == tail
        rest = rest[: -len(tail)]
        for fact in facts:
            ids = tokenizer(f"\n{fact}\n", add_special_tokens=False)["input_ids"]
            at = next(i for i in range(len(rest)) if rest[i : i + len(ids)] == ids)
            assert at + len(ids) <= (T - 1) * SEGMENT
            rest = rest[:at] + rest[at + len(ids) :]
        assert rest == original[: len(rest)].tolist()
    assert kinds == {"pass", "value"}  # both tasks occur


def test_the_saved_pool_needs_no_tokenizer_and_gives_the_same_crops(tokenizer, pool, filler_crops, tmp_path):
    save_pool(tmp_path / POOL_FILE, pool, "sha256:base")
    assert load_pool(tmp_path / POOL_FILE, "sha256:base") == pool
    loaded = RetrievalCrops.for_run(tmp_path, None, "sha256:base", SEGMENT, T * SEGMENT + 1)  # no tokenizer
    a = loaded.make(filler_crops[0].copy(), np.random.default_rng(7))
    b = RetrievalCrops(pool, SEGMENT, T * SEGMENT + 1).make(filler_crops[0].copy(), np.random.default_rng(7))
    assert np.array_equal(a, b) and not np.array_equal(a, filler_crops[0])
    with pytest.raises(UIOError, match="was tokenized for another base model"):
        load_pool(tmp_path / POOL_FILE, "sha256:other")
    (tmp_path / POOL_FILE).write_bytes((tmp_path / POOL_FILE).read_bytes()[:100])  # an interrupted copy
    with pytest.raises(UIOError, match="is damaged"):
        load_pool(tmp_path / POOL_FILE, "sha256:base")


def test_segments_too_short_for_the_task_are_refused(pool):
    with pytest.raises(UIOError, match="--retrieval-share needs segments of more than"):
        RetrievalCrops(pool, 16, 4 * 16 + 1)


# ----- the command line ---------------------------------------------------------------------------------
def test_retrieval_run_resumes_exactly_and_init_loads_its_weights(make_tiny_model_dir, book, tmp_path):
    model_dir = make_tiny_model_dir("llama")
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    train_run(model_dir, straight, "--steps", "3", "--lr", "1e-2", "--retrieval-share", "0.5", data=book)
    train_run(
        model_dir, chunked, "--steps", "3", "--lr", "1e-2", "--retrieval-share", "0.5", "--max-minutes", "0", data=book
    )
    assert (chunked / POOL_FILE).exists()
    changed = train_run(model_dir, chunked, "--steps", "3", "--resume", check=False)  # without the share
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "this run was trained with --retrieval-share 0.5" in changed.stderr.strip().splitlines()[-1]
    resumed = train_run(
        model_dir, chunked, "--steps", "3", "--lr", "1e-2", "--retrieval-share", "0.5", "--resume", "--ratio", "16"
    )  # the run's own shape wins over a mistyped one
    assert "--resume: taking segment 128, ratio 32, rank 4, alpha 8.0" in resumed.stderr
    a, b = checkpoint_weights(straight / "checkpoint"), checkpoint_weights(chunked / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the retrieval crops come from the saved data rng
    plain = tmp_path / "plain"
    train_run(model_dir, plain, "--steps", "3", "--lr", "1e-2", data=book)
    first = lambda run: json.loads((run / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert first(plain) != first(straight)  # retrieval crops are other crops

    # --init: at learning rate 0 the fine-tuned checkpoint is the one it started from; the checkpoint's
    # segment, ratio, rank and alpha replace the arguments' (here ratio 16 asked, 32 taken).
    tuned = tmp_path / "tuned"
    result = train_run(
        model_dir, tuned, "--steps", "1", "--lr", "0", "--ratio", "16", "--init", str(straight), data=book
    )
    assert "--init: taking segment 128, ratio 32, rank 4, alpha 8.0" in result.stderr
    c = checkpoint_weights(tuned / "checkpoint")
    assert all(torch.equal(a[k], c[k]) for k in a)
    config = json.loads((tuned / "checkpoint" / "uio_config.json").read_text())
    assert (config["ratio"], config["step"], config["train_args"]["init"]) == (32, 1, str(straight))


def test_init_refuses_another_base_and_a_missing_checkpoint(make_tiny_model_dir, book, tmp_path):
    train_run(make_tiny_model_dir("llama"), tmp_path / "a", "--steps", "1", data=book)
    other = make_tiny_model_dir("llama", seed=1)
    for init, message in (
        (tmp_path / "a", "was trained on another base model"),
        (tmp_path / "none", "no UIO checkpoint in"),
    ):
        result = train_run(other, tmp_path / "b", "--steps", "1", "--init", str(init), data=book, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert message in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--retrieval-share", "1.5", "--retrieval-share must lie between 0 and 1"),
        ("--windows-per-pass", "0", "--windows-per-pass must be at least 1"),
    ],
)
def test_bad_training_options_give_one_line(option, value, message, tmp_path):
    result = run_cli("train", "--base", "unused", "--out", str(tmp_path / "o"), option, value)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"uio-gguf: error: {message}"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: LoRA B of q and k comes back from llama.cpp's row order
def test_a_bundle_gives_back_its_checkpoint_bit_for_bit(arch, make_tiny_checkpoint, make_tiny_bundle, tmp_path):
    from uio_gguf.train.base import load_config
    from uio_gguf.train.from_bundle import checkpoint_from_bundle

    checkpoint, _, _ = make_tiny_checkpoint(arch)
    bundle, _, _ = make_tiny_bundle(arch)
    original = json.loads((checkpoint / "uio_config.json").read_text())
    base = original["base"]["path"]
    rebuilt = checkpoint_from_bundle(bundle, tmp_path / "rebuilt", load_config(base), base)
    a, b = checkpoint_weights(checkpoint), checkpoint_weights(rebuilt)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((rebuilt / "uio_config.json").read_text())
    keys = ("segment", "ratio", "rank", "alpha", "distinct_slots", "step")
    assert {k: config[k] for k in keys} == {k: original[k] for k in keys}
    assert config["base"]["fingerprint"] == original["base"]["fingerprint"]


def test_init_from_a_bundle_starts_from_its_weights(
    make_tiny_checkpoint, make_tiny_bundle, make_tiny_model_dir, book, tmp_path
):
    checkpoint, _, _ = make_tiny_checkpoint("llama")
    bundle, _, _ = make_tiny_bundle("llama")
    base = json.loads((checkpoint / "uio_config.json").read_text())["base"]["path"]
    tuned = tmp_path / "tuned"
    result = train_run(base, tuned, "--steps", "1", "--lr", "0", "--init", str(bundle), data=book)
    assert "--init: taking segment 16, ratio 4, rank 4, alpha 8.0" in result.stderr
    a, c = checkpoint_weights(checkpoint), checkpoint_weights(tuned / "checkpoint")
    assert all(torch.equal(a[k], c[k]) for k in a)
    other = train_run(
        make_tiny_model_dir("llama", seed=1),
        tmp_path / "other",
        "--steps",
        "1",
        "--init",
        str(bundle),
        data=book,
        check=False,
    )
    assert other.returncode != 0 and "was trained on another base model" in other.stderr.strip().splitlines()[-1]
