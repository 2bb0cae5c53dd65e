"""`uio-gguf train` end to end on a tiny model: checkpoint format, exact resume, bad input."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import checkpoint_weights, run_cli, train_run


def _train(model_dir, book, out, *extra, check=True):
    """A tiny training run (segment 16, ratio 4, 4 segments); book=None leaves out --data."""
    return train_run(model_dir, out, *extra, data=book, check=check, shape=(16, 4, 4), lr="1e-2", eval_every=2)


def test_checkpoint_is_peft_format_and_resume_is_exact(make_tiny_model_dir, book, tmp_path):
    model_dir = make_tiny_model_dir("llama")
    straight = tmp_path / "straight"
    _train(model_dir, book, straight, "--steps", "4")
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all("heldout_ppl" in r for r in log if r["step"] % 2 == 0)

    ckpt = straight / "checkpoint"
    config = json.loads((ckpt / "uio_config.json").read_text())
    assert (config["segment"], config["ratio"], config["estimator"], config["step"]) == (16, 4, "unbiased", 4)
    assert config["base"]["fingerprint"].startswith("sha256:")
    for adapter, targets in (("encoder", {"q_proj", "v_proj"}), ("transfer", {"k_proj", "v_proj"})):
        adapter_config = json.loads((ckpt / adapter / "adapter_config.json").read_text())
        assert set(adapter_config["target_modules"]) == targets and adapter_config["r"] == 4
        keys = load_file(str(ckpt / adapter / "adapter_model.safetensors"))
        assert all(k.startswith("base_model.model.model.layers.") for k in keys)

    killed = tmp_path / "killed"
    result = _train(model_dir, book, killed, "--steps", "4", "--kill-after", "2", check=False)
    assert result.returncode != 0  # SIGKILL: no clean shutdown
    assert json.loads((killed / "checkpoint" / "uio_config.json").read_text())["step"] == 2
    _train(model_dir, book, killed, "--steps", "4", "--resume")

    for name in (
        "encoder/adapter_model.safetensors",
        "transfer/adapter_model.safetensors",
        "memory_embedding.safetensors",
    ):
        a, b = load_file(str(ckpt / name)), load_file(str(killed / "checkpoint" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    resumed_log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in log]


def test_max_minutes_stops_with_a_checkpoint_and_resume_needs_only_the_saved_tokens(
    make_tiny_model_dir, book, tmp_path
):
    """Training in chunks (--max-minutes) and resuming from OUT/tokens.npz alone (no --data, as on a
    machine the text was not copied to) lands on the same weights as one straight run."""
    model_dir = make_tiny_model_dir("llama")
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    _train(model_dir, book, straight, "--steps", "3")
    result = _train(model_dir, book, chunked, "--steps", "3", "--max-minutes", "0")
    assert "stopped at step 1 of 3" in result.stderr
    assert json.loads((chunked / "checkpoint" / "uio_config.json").read_text())["step"] == 1
    resumed = _train(model_dir, None, chunked, "--steps", "3", "--resume")
    assert "checkpoint:" in resumed.stdout
    a, b = checkpoint_weights(straight / "checkpoint"), checkpoint_weights(chunked / "checkpoint")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_prepare_only_and_heldout_files(make_tiny_model_dir, book, prose, tmp_path):
    import numpy as np

    from uio_gguf.train.base import load_base

    model_dir = make_tiny_model_dir("llama")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(prose[60_000:70_000])
    out = tmp_path / "run"
    result = _train(model_dir, book, out, "--heldout", str(heldout), "--prepare-only")
    assert "tokens:" in result.stdout and not (out / "checkpoint").exists()
    saved = np.load(out / "tokens.npz")
    _, tokenizer = load_base(model_dir)
    eos = tokenizer.eos_token_id
    assert saved["train"].tolist() == tokenizer(book.read_text(), add_special_tokens=False)["input_ids"] + [eos]
    assert saved["heldout"].tolist() == tokenizer(heldout.read_text(), add_special_tokens=False)["input_ids"] + [eos]

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "tokens.npz").write_bytes((out / "tokens.npz").read_bytes()[:500])  # an interrupted copy
    result = run_cli(
        "train", "--base", str(model_dir), "--out", str(damaged), "--segment", "16", "--ratio", "4", "--steps", "1"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "tokens.npz is damaged" in result.stderr.strip().splitlines()[-1]

    other = make_tiny_model_dir("qwen2")  # another base: its tokens would be wrong for it
    result = run_cli(
        "train", "--base", str(other), "--out", str(out), "--segment", "16", "--ratio", "4", "--steps", "1"
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"uio-gguf: error: {out / 'tokens.npz'} was tokenized for another base model: delete it to tokenize the data again"
    )


def test_encoder_adapter_loads_in_peft_with_same_logits(make_tiny_model_dir, book, tmp_path):
    """Our PEFT-format encoder adapter, loaded by PEFT itself, computes what our encoder-enabled model does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from uio_gguf.train.checkpoint import load_uio_model

    model_dir = make_tiny_model_dir("llama")
    _train(model_dir, book, tmp_path / "run", "--steps", "2")
    ckpt = tmp_path / "run" / "checkpoint"
    ours, _, _ = load_uio_model(ckpt)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), ckpt / "encoder")
    tokens = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours._set_encoder_adapter(True)
        expected = ours.base(input_ids=tokens).logits
        ours._set_encoder_adapter(False)
        plain = ours.base(input_ids=tokens).logits
        got = peft_model(input_ids=tokens).logits
    assert (expected - plain).abs().max() > 1e-4  # the trained adapter does something
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(data=["/nonexistent/book.txt"]), "data file not found"),
        (lambda a: a.update(data=["EMPTY"]), "training data is empty"),
        (lambda a: a.update(ratio="5"), "not a multiple of the ratio"),
        (lambda a: a.update(out="/proc/uio-out"), "cannot write to the output directory"),
        (lambda a: a.update(base="NOT_LLAMA"), "not a LLaMA-family decoder"),
        (lambda a: a.update(base="/nonexistent/model"), "base model not found"),
    ],
)
def test_bad_input_gives_one_clear_line(change, message, make_tiny_model_dir, book, tmp_path):
    args = {"base": str(make_tiny_model_dir("llama")), "data": [str(book)], "out": str(tmp_path / "out"), "ratio": "4"}
    change(args)
    if args["data"] == ["EMPTY"]:
        (tmp_path / "empty.txt").write_text("  \n")
        args["data"] = [str(tmp_path / "empty.txt")]
    if args["base"] == "NOT_LLAMA":
        from transformers import GPT2Config

        GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
        args["base"] = str(tmp_path / "gpt2")
    result = run_cli(
        "train",
        "--base",
        args["base"],
        *sum((["--data", d] for d in args["data"]), []),
        "--out",
        args["out"],
        "--segment",
        "16",
        "--ratio",
        args["ratio"],
        "--steps",
        "1",
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_train_without_training_extra_says_how_to_install(tmp_path):
    blocker = tmp_path / "sitecustomize.py"  # makes `import torch` fail, as in a runtime-only install
    blocker.write_text("import sys\nsys.modules['torch'] = None\n")
    result = run_cli(
        "train",
        "--base",
        "x",
        "--data",
        "y",
        "--out",
        str(tmp_path / "o"),
        env={"PYTHONPATH": f"{tmp_path}:{sys.path[0]}"},
    )
    assert result.returncode != 0
    assert "pip install 'uio-gguf[train]'" in result.stderr and "Traceback" not in result.stderr


def test_train_check_json(tmp_path):
    result = run_cli("train-check", "--samples", "30", "--segments", "8", "--windows", "1,4", "--json", check=True)
    rows = json.loads(result.stdout)
    assert [(r["S"], r["factor"]) for r in rows] == [(1, False), (1, True), (4, False), (4, True)]
    by = {(r["S"], r["factor"]): r for r in rows}
    assert set(rows[0]) == {"S", "factor", "ratio", "cosine"}
    # without the factor the estimate is short, most at S = 1; with it, close to the full norm
    assert by[(1, False)]["ratio"] < by[(4, False)]["ratio"] < 1.0
    assert abs(by[(1, True)]["ratio"] - 1.0) < abs(by[(1, False)]["ratio"] - 1.0)
    assert by[(4, True)]["cosine"] > by[(4, False)]["cosine"]


def test_windows_per_pass_trains_to_the_same_weights(make_tiny_model_dir, book, tmp_path):
    """--windows-per-pass batches a crop's windows into few calls; the run lands where the default does."""
    model_dir = make_tiny_model_dir("llama")
    _train(model_dir, book, tmp_path / "one", "--steps", "2")
    _train(model_dir, book, tmp_path / "all", "--steps", "2", "--windows-per-pass", "3")
    a, b = checkpoint_weights(tmp_path / "one" / "checkpoint"), checkpoint_weights(tmp_path / "all" / "checkpoint")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    first = [json.loads(line)["loss"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    second = [json.loads(line)["loss"] for line in (tmp_path / "all" / "log.jsonl").read_text().splitlines()]
    assert first == pytest.approx(second, rel=1e-5)
    config = json.loads((tmp_path / "all" / "checkpoint" / "uio_config.json").read_text())
    assert config["train_args"]["windows_per_pass"] == 3


def test_loss_windows_scores_random_windows_and_resumes_exactly(make_tiny_model_dir, book, tmp_path):
    """--loss-windows 1 scores one random window per crop (so the loss differs from the whole crop's);
    the draws are part of the saved rng state, so a killed run resumes onto the same weights."""
    model_dir = make_tiny_model_dir("llama")
    _train(model_dir, book, tmp_path / "all", "--steps", "2")
    _train(model_dir, book, tmp_path / "one", "--steps", "2", "--loss-windows", "1")
    killed = tmp_path / "killed"
    assert (
        _train(
            model_dir, book, killed, "--steps", "2", "--loss-windows", "1", "--kill-after", "1", check=False
        ).returncode
        != 0
    )
    _train(model_dir, book, killed, "--steps", "2", "--loss-windows", "1", "--resume")
    a, b = checkpoint_weights(tmp_path / "one" / "checkpoint"), checkpoint_weights(killed / "checkpoint")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    losses = {
        run: [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("all", "one", "killed")
    }
    assert losses["one"] == losses["killed"] and losses["one"][0] != losses["all"][0]
    bad = _train(model_dir, book, tmp_path / "bad", "--steps", "1", "--loss-windows", "0", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith("--loss-windows must be at least 1")


def test_long_segments_trains_every_second_step_on_longer_crops(make_tiny_model_dir, book, tmp_path):
    """--segments 4 --long-segments 8 at --batch 2: steps 1 and 3 train on two crops of 4 segments, step 2
    on one crop of 8 (as many tokens), the next draw of the data stream. Step 2's logged loss is that
    crop's mean window loss under the weights after step 1, recomputed here from the checkpoint a run
    killed after step 1 left; the resumed run takes the long turn at step 2."""
    import numpy as np

    from uio_gguf.train import checkpoint as ckpt
    from uio_gguf.train.base import load_base
    from uio_gguf.train.data import TOKENS_FILE, TokenStream
    from uio_gguf.train.loop import heldout_loss
    from uio_gguf.train.model import UIOConfig, UIOModel

    model_dir = make_tiny_model_dir("llama")
    run = tmp_path / "run"
    long = ("--steps", "3", "--long-segments", "8")
    assert _train(model_dir, book, run, *long, "--kill-after", "1", check=False).returncode != 0
    after_step1 = ckpt.find_checkpoint(run / "checkpoint")
    state = torch.load(after_step1 / ckpt.STATE_FILE, weights_only=False)
    assert state["step"] == 1
    base, _ = load_base(str(model_dir))
    model = UIOModel(base, UIOConfig(segment=16, ratio=4, rank=4, alpha=8))
    ckpt.load_weights(model, after_step1)
    config = ckpt.read_config(after_step1)
    stream = TokenStream.load(run / TOKENS_FILE, config["base"]["fingerprint"])
    data_rng = np.random.default_rng()
    data_rng.bit_generator.state = state["data_rng"]
    expected = heldout_loss(model, stream.random_crops(data_rng, 1, 8 * 16 + 1), 16, "cpu")

    _train(model_dir, None, run, *long, "--resume")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["segments"]) for r in log] == [(1, 4), (2, 8), (3, 4)]
    assert [r["tokens"] for r in log] == [128, 256, 384]  # 2 × 4 × 16 = 1 × 8 × 16 a step
    assert log[1]["loss"] == pytest.approx(expected, rel=1e-5)
    assert config["train_args"]["long_segments"] == 8

    changed = _train(model_dir, None, run, "--steps", "4", "--resume", check=False)
    assert changed.returncode != 0
    assert changed.stderr.strip().splitlines()[-1].endswith("trained with --long-segments 8; pass the same")

    for extra, message in [
        (("--long-segments", "4"), "--long-segments must exceed --segments (4)"),
        (
            ("--long-segments", "6"),
            "to be a multiple of it: a long step holds as many tokens as a short one, in fewer crops",
        ),
        (
            ("--batch", "3", "--long-segments", "6", "--loss-windows", "1"),
            "a long crop scores the same share of its windows",
        ),
        (("--long-segments", "8", "--chat-recall-share", "0.5"), "(their tasks are built for crops of --segments)"),
    ]:
        bad = _train(model_dir, book, tmp_path / "bad", "--steps", "1", *extra, check=False)
        assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith(message)


def test_crop_shapes_keep_tokens_and_scored_windows_per_step():
    """A long step: half the crops at twice the length, twice the scored windows each."""
    from uio_gguf.train.loop import CropShape, TrainArgs, crop_shapes

    args = TrainArgs(base="", data=[], out="", segments=4, long_segments=8, batch=2, loss_windows=2)
    assert crop_shapes(args) == [CropShape(4, 2, 2), CropShape(8, 1, 4)]
    assert crop_shapes(TrainArgs(base="", data=[], out="", segments=4, batch=2)) == [CropShape(4, 2, None)]


def test_keep_tokens_and_raw_segments_train_another_view_are_recorded_and_resume_exactly(
    make_tiny_model_dir, book, tmp_path
):
    """--keep-tokens 3 --raw-segments 1-3 trains the runtime's layout (another loss than the default's;
    the default values give the default run to the bit); the checkpoint records both, a killed run
    resumes onto the same weights (the raw windows are drawn from the saved rng), a resume that changes
    them is refused, and bad values are one clear line."""
    model_dir = make_tiny_model_dir("llama")
    view = ("--keep-tokens", "3", "--raw-segments", "1-3")
    _train(model_dir, book, tmp_path / "plain", "--steps", "2")
    _train(model_dir, book, tmp_path / "defaults", "--steps", "2", "--keep-tokens", "0", "--raw-segments", "1")
    _train(model_dir, book, tmp_path / "view", "--steps", "2", *view)
    killed = tmp_path / "killed"
    assert _train(model_dir, book, killed, "--steps", "2", *view, "--kill-after", "1", check=False).returncode != 0
    _train(model_dir, None, killed, "--steps", "2", *view, "--resume")

    weights = {
        run: checkpoint_weights(tmp_path / run / "checkpoint") for run in ("plain", "defaults", "view", "killed")
    }
    for name in weights["plain"]:
        assert torch.equal(weights["plain"][name], weights["defaults"][name]), name
        assert torch.equal(weights["view"][name], weights["killed"][name]), f"{name} differs after resume"
    losses = {
        run: [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("plain", "view", "killed")
    }
    assert losses["view"] == losses["killed"] and losses["view"][0] != losses["plain"][0]
    train_args = json.loads((killed / "checkpoint" / "uio_config.json").read_text())["train_args"]
    assert (train_args["keep_tokens"], train_args["raw_segments"]) == (3, [1, 2, 3])

    changed = _train(model_dir, None, killed, "--steps", "3", "--keep-tokens", "3", "--resume", check=False)
    assert changed.returncode != 0
    assert changed.stderr.strip().splitlines()[-1].endswith("trained with --raw-segments 1-3; pass the same")

    for extra, message in [
        (("--raw-segments", "two"), "--raw-segments: 'two' is not a list of segment counts such as 1,2,4 or 1-16"),
        (("--raw-segments", "1-4"), "--raw-segments 4 needs crops of more segments (--segments 4)"),
        (("--keep-tokens", "16"), "--keep-tokens must lie between 0 and the segment length less one (15)"),
    ]:
        bad = _train(model_dir, book, tmp_path / "bad", "--steps", "1", *extra, check=False)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode != 0 and len(lines) == 1 and message in lines[0], bad.stderr


def test_raw_segments_parse_and_format():
    from uio_gguf.errors import UIOError
    from uio_gguf.train.args import TrainArgs, format_raw_segments, parse_raw_segments

    assert parse_raw_segments("1-4,8, 16") == (1, 2, 3, 4, 8, 16)
    assert parse_raw_segments("3,1,3") == (1, 3)
    assert format_raw_segments((1, 2, 3, 4, 8, 16)) == "1-4,8,16"
    for bad in ("", "4-1", "1,,2", "-2"):
        with pytest.raises(UIOError):
            parse_raw_segments(bad)
    args = TrainArgs(base="", data=[], out="", segment=16, ratio=4, segments=4, raw_segments=(0, 1))
    with pytest.raises(UIOError, match="--raw-segments must be 1 or more segments each"):
        args.validate()
