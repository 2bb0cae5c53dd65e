"""Training with the runtime's layout (train.estimators.View): the crop's first tokens kept raw in front
of the memory (sinks) and raw windows of several segments. The default view is today's training bit for
bit; the decoder computes what the memory diagnosis (and so the runtime) computes; every estimator
computes the gradient of the loss written out by hand over the same drawn raw windows."""

import random

import pytest
import torch

from tests.helpers import rel_diff, tiny_model_and_crop
from uio_gguf.train.check import flat_gradient
from uio_gguf.train.estimators import Crop, View, estimate_gradient
from uio_gguf.train.tiny import tiny_uio

SEG, RATIO, T, KEEP = 16, 4, 6, 3
VIEW = View(keep=KEEP, raw_segments=(1, 2, 3))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return tiny_model_and_crop(T, SEG, RATIO)


def _grads(model) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.trainable_parameters()]
    ).double()


def _by_hand(
    model, crop: Crop, raw: dict[int, int], keep: int, window: int | None = None
) -> tuple[float, torch.Tensor]:
    """(J, its gradient) written out: window t decodes [first `keep` tokens ; m_1..m_{t-j-1} ; segments
    t-j..t] and scores its last l logits against segment t's targets; with `window` S, memories older
    than t - S enter detached (TBPTT)."""
    for p in model.trainable_parameters():
        p.grad = None
    memories = [model.encode(crop.window(s)) for s in range(1, T)]
    sinks = crop.tokens[:, :keep] if keep else None
    losses = []
    for t, j in raw.items():
        used = [m if window is None or s >= t - window else m.detach() for s, m in enumerate(memories, start=1)]
        tokens = crop.tokens[:, (t - j - 1) * SEG : t * SEG]
        logits = model.decode(tokens, torch.cat(used[: t - j - 1], dim=2), sinks=sinks)[:, -SEG:]
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), crop.targets(t).flatten()))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.item(), _grads(model)


def _varied_seed(windows: list[int]) -> int:
    """A seed whose draw gives raw windows of every length 1..3 among the windows where 3 fits."""
    for seed in range(100):
        raw = VIEW.draw(windows, random.Random(seed))
        if {raw[t] for t in windows if t >= 4} == {0, 1, 2}:
            return seed
    raise AssertionError("no seed draws every raw-window length")


# ----- (a) the default view is today's training ------------------------------------------------------


def test_default_view_is_todays_training_bit_for_bit(setup):
    """View() draws nothing from the rng and the reference estimator's loss and gradient are, to the
    bit, those of today's layout [m_1..m_{t-1} ; segment t] written out."""
    model, crop = setup
    rng = random.Random(4)
    state = rng.getstate()
    assert View().draw(list(range(2, T + 1)), rng) == dict.fromkeys(range(2, T + 1), 0)
    assert View(raw_segments=(3,)).draw([2, 3, 5], rng) == {2: 0, 3: 1, 5: 2}  # one choice: clipped, no draw
    assert rng.getstate() == state
    VIEW.draw([5], rng)
    assert rng.getstate() != state  # several choices draw

    for p in model.trainable_parameters():
        p.grad = None
    memories = [model.encode(crop.window(s)) for s in range(1, T)]
    total = 0.0
    for t in range(2, T + 1):
        total = total + model.window_loss(crop.window(t), crop.targets(t), torch.cat(memories[: t - 1], dim=2))
    (total / (T - 1)).backward()
    today = _grads(model)
    for p in model.trainable_parameters():
        p.grad = None
    loss = estimate_gradient(model, crop, "full", view=View())
    assert loss == (total / (T - 1)).item()
    assert torch.equal(_grads(model), today)


# ----- (b) the decoder computes the runtime's layout ---------------------------------------------------


def test_window_with_sinks_and_raw_segments_is_the_diagnosis_layout(make_tiny_checkpoint):
    """decode / window_loss on [4 kept tokens ; memory of segments 1..4 ; segments 5..7 raw] give the
    logits and loss of memory_diagnosis.score_segment(..., Layout(sinks=4)) (the layout Session(keep=4,
    raw_window=3·l) puts in llama.cpp, a parity test away), and the sinks change them."""
    from uio_gguf.train.memory_diagnosis import Layout, compress, score_segment

    _, model, _ = make_tiny_checkpoint("llama", segment=SEG, ratio=RATIO)
    model.eval()
    ids = torch.randint(3, 256, (8 * SEG + 1,), generator=torch.Generator().manual_seed(1)).tolist()
    memory = compress(model, ids, batch=3)  # (8, n_layers, k, d)
    nll, out, (n_sink, n_mem, first_raw), _ = score_segment(model, ids, memory, 6, 3 * SEG, Layout(sinks=4))
    assert (n_sink, n_mem, first_raw) == (4, 4 * model.config.slots, 4)

    crop, t, j = Crop(torch.tensor([ids]), SEG), 7, 2  # window 7 (segment 6 counted from 0), segments 5..7 raw
    h = memory[:4].permute(1, 0, 2, 3).reshape(1, model.n_layers, n_mem, -1)  # m_1..m_4
    with torch.no_grad():
        logits = model.decode(crop.raw(t, j), h, sinks=crop.sinks(4))
        loss = model.window_loss(crop.raw(t, j), crop.raw_targets(t, j), h, crop.sinks(4))
        without_sinks = model.decode(crop.raw(t, j), h)
    assert logits.shape[1] == 3 * SEG
    assert torch.allclose(logits[:, -SEG:], out.logits, atol=1e-5)
    assert loss.item() * SEG == pytest.approx(nll, rel=1e-5)  # the mean over segment t's targets alone
    assert (without_sinks[:, -SEG:] - out.logits).abs().max() > 1e-3


def test_sinks_are_the_text_start_decoded_by_the_plain_model(setup):
    """Without memory, [sinks ; raw] is the base model over the concatenated tokens: the sinks at 0..N-1
    and the raw window right after them, in one call or in the padded (batched) call."""
    model, crop = setup
    sinks, raw = crop.sinks(KEEP), crop.raw(4, 1)
    with torch.no_grad():
        plain = model.base(input_ids=torch.cat([sinks, raw], dim=1)).logits[:, KEEP:]
        assert torch.allclose(model.decode(raw, None, sinks=sinks), plain, atol=1e-5)
        empty = model.encode(crop.window(1))[:, :, :0]
        assert torch.allclose(model.decode(raw, empty, [0, 0], sinks), plain, atol=1e-5)


# ----- (c) every estimator, over the same drawn raw windows ---------------------------------------------


@pytest.mark.parametrize(
    "estimator, per_pass",
    [("full", 1), ("full", 3), ("tbptt", 1), ("incremental", 1), ("unbiased", 1), ("unbiased", 2)],
)
def test_each_estimator_is_the_gradient_written_out_over_the_drawn_raw_windows(setup, estimator, per_pass):
    """With S = T-1 no graph is cut or sampled, so every estimator (per-segment and batched: raw windows
    of different lengths padded into one call) gives the loss and gradient of _by_hand over the raw
    windows the same seed draws."""
    model, crop = setup
    windows = list(range(2, T + 1))
    seed = _varied_seed(windows)
    expected_loss, expected = _by_hand(model, crop, VIEW.draw(windows, random.Random(seed)), KEEP)
    got = flat_gradient(model, crop, estimator, T - 1, random.Random(seed), windows_per_pass=per_pass, view=VIEW)
    assert rel_diff(got, expected) < 1e-5
    loss = estimate_gradient(model, crop, estimator, T - 1, random.Random(seed), True, per_pass, view=VIEW)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert rel_diff(expected, flat_gradient(model, crop, "full")) > 1e-3  # the view changes the gradient


@pytest.mark.parametrize("per_pass", [1, 2])
def test_truncated_estimators_reach_only_the_memories_before_the_raw_window(setup, per_pass):
    """TBPTT S = 2 counts back from t: with segments t-j..t raw, J_t reaches m_s for t-2 <= s <= t-j-1
    only. tbptt, incremental and their batched form all give the truncated gradient written out."""
    model, crop = setup
    windows = list(range(2, T + 1))
    seed = _varied_seed(windows)
    _, expected = _by_hand(model, crop, VIEW.draw(windows, random.Random(seed)), KEEP, window=2)
    for estimator in ("tbptt", "incremental"):
        got = flat_gradient(model, crop, estimator, 2, random.Random(seed), windows_per_pass=per_pass, view=VIEW)
        assert rel_diff(got, expected) < 1e-5, estimator
    _, untruncated = _by_hand(model, crop, VIEW.draw(windows, random.Random(seed)), KEEP)
    assert rel_diff(expected, untruncated) > 1e-3


def test_loss_windows_draw_then_raw_windows(setup):
    """With loss_windows the scored windows are drawn first, then their raw windows: one window and its
    raw window is what _by_hand computes for it."""
    from uio_gguf.train.estimators import draw_windows

    model, crop = setup
    rng = random.Random(2)
    windows = draw_windows(T, 1, rng)
    raw = VIEW.draw(windows, rng)
    _, expected = _by_hand(model, crop, raw, KEEP)
    got = flat_gradient(model, crop, "unbiased", T - 1, random.Random(2), loss_windows=1, view=VIEW)
    assert rel_diff(got, expected) < 1e-5


def test_reservoir_table_reads_only_memories_before_the_raw_window_and_is_unbiased():
    """The unbiased estimator's table (which m_s reach the encoder from J_t, with what factor), over many
    draws: zero for the raw segments s > t-j-1, and in expectation 1 for every s the window reads, so the
    expected gradient is the full one whatever the raw windows."""
    from uio_gguf.train.estimators import _Reservoir, _table

    T_long, S, draws = 10, 2, 4000
    raw = {t: min(3, t - 2) for t in range(2, T_long + 1)}  # raw windows of 4 segments where they fit
    mean = {(t, s): 0.0 for t in raw for s in range(1, t)}
    for i in range(draws):
        table = _table(_Reservoir(S, random.Random(i), True), T_long, raw)
        for t, row in table.items():
            for s, factor in row.items():
                mean[(t, s)] += factor / draws
    for (t, s), value in mean.items():
        if s > t - raw[t] - 1:
            assert value == 0, (t, s)
        else:
            assert value == pytest.approx(1.0, abs=0.1), (t, s, value)  # 0.047 at most measured


def test_unbiased_mean_over_reservoirs_is_the_full_gradient_with_raw_windows():
    """Sampled: the mean of the unbiased estimate (S = 1) over reservoir draws approaches the full
    gradient of the same view (raw windows of 3 segments: one choice, so nothing else is drawn)."""
    from uio_gguf.train.check import encoder_side

    model = tiny_uio(segment=SEG, ratio=RATIO)
    T_long, view = 8, View(keep=KEEP, raw_segments=(3,))
    crop = Crop(torch.randint(0, 256, (1, T_long * SEG + 1), generator=torch.Generator().manual_seed(1)), SEG)
    params = encoder_side(model)
    full = flat_gradient(model, crop, "full", params=params, view=view)
    total = torch.zeros_like(full)
    n = 120
    for i in range(n):
        total += flat_gradient(model, crop, "unbiased", 1, random.Random(1000 + i), True, params, view=view)
    assert rel_diff(total / n, full) < 0.1  # 0.037 measured
    assert rel_diff(flat_gradient(model, crop, "unbiased", 1, random.Random(999), True, params, view=view), full) > 0.3
