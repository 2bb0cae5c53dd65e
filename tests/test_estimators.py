"""The four gradient estimators of docs/design.md §2 against each other, on real computations."""

import random

import pytest
import torch

from tests.helpers import rel_diff, tiny_model_and_crop
from uio_gguf.train.check import encoder_side, flat_gradient
from uio_gguf.train.estimators import Crop
from uio_gguf.train.tiny import tiny_uio

SEG, RATIO, T = 16, 4, 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return tiny_model_and_crop(T, SEG, RATIO)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_incremental_equals_tbptt(setup, window):
    model, crop = setup
    tbptt = flat_gradient(model, crop, "tbptt", window)
    incremental = flat_gradient(model, crop, "incremental", window)
    assert tbptt.norm() > 0
    assert rel_diff(incremental, tbptt) < 1e-5


def test_tbptt_with_full_window_equals_full_and_short_window_differs(setup):
    model, crop = setup
    full = flat_gradient(model, crop, "full")
    assert rel_diff(flat_gradient(model, crop, "tbptt", T - 1), full) < 1e-6
    assert rel_diff(flat_gradient(model, crop, "incremental", T - 1), full) < 1e-5
    assert rel_diff(flat_gradient(model, crop, "tbptt", 1), full) > 1e-3  # truncation is visible


def test_unbiased_with_reservoir_covering_everything_is_exact(setup):
    model, crop = setup
    full = flat_gradient(model, crop, "full")
    assert rel_diff(flat_gradient(model, crop, "unbiased", T - 1, random.Random(0)), full) < 1e-5


def test_unbiased_mean_converges_to_full_and_no_factor_stays_short():
    model = tiny_uio(segment=SEG, ratio=RATIO)
    T_long = 8
    crop = Crop(torch.randint(0, 256, (1, T_long * SEG + 1), generator=torch.Generator().manual_seed(1)), SEG)
    params = encoder_side(model)
    full = flat_gradient(model, crop, "full", params=params)

    def mean_of(n, factor):
        total = torch.zeros_like(full)
        for i in range(n):
            total += flat_gradient(model, crop, "unbiased", 1, random.Random(1000 + i), factor, params)
        return total / n

    few, many = mean_of(25, True), mean_of(200, True)
    err_few, err_many = rel_diff(few, full), rel_diff(many, full)
    assert err_many < 0.1, err_many
    assert err_many < 0.6 * err_few, (err_few, err_many)  # error falls as samples grow
    no_factor = mean_of(200, False)
    assert no_factor.norm() / full.norm() < 0.8  # measurably short of the full gradient
    assert rel_diff(no_factor, full) > 3 * err_many


@pytest.mark.parametrize(
    "estimator, window", [("full", 2), ("tbptt", 2), ("incremental", 1), ("unbiased", 1), ("unbiased", 2)]
)
@pytest.mark.parametrize("per_pass", [2, T - 1])
def test_batched_windows_give_the_same_gradient_and_loss(setup, estimator, window, per_pass):
    """windows_per_pass > 1 (a few large calls, memories padded) computes what the per-segment path
    computes, reservoir draws included."""
    from uio_gguf.train.estimators import estimate_gradient

    model, crop = setup
    grads = [flat_gradient(model, crop, estimator, window, random.Random(3), windows_per_pass=n) for n in (1, per_pass)]
    assert grads[0].norm() > 0
    assert rel_diff(grads[1], grads[0]) < 1e-5
    losses = [estimate_gradient(model, crop, estimator, window, random.Random(3), True, n) for n in (1, per_pass)]
    assert abs(losses[1] - losses[0]) < 1e-5 * abs(losses[0])


def test_padded_memory_rows_see_only_their_own_memory(setup):
    """One decode call over windows with memories of different lengths (padding filled with noise)
    gives each row the logits of its own unpadded call."""
    model, crop = setup
    with torch.no_grad():
        memory = torch.cat([model.encode(crop.window(s)) for s in (1, 2, 3)], dim=2)  # (2, L, 3k, d)
        k = model.config.slots
        rows, lengths, expected = [], [], []
        for n in (1, 3, 2):
            padded = torch.cat([memory[:, :, : n * k], torch.randn_like(memory[:, :, n * k :])], dim=2)
            rows.append(padded)
            lengths += [n * k] * 2
            expected.append(model.decode(crop.window(4), memory[:, :, : n * k]))
        got = model.decode(torch.cat([crop.window(4)] * 3), torch.cat(rows), lengths)
    assert torch.allclose(got, torch.cat(expected), atol=1e-5)


def _seed_drawing_each_window(n_segments: int) -> dict[int, int]:
    """{t: a seed whose first draw (loss_windows=1) scores window t}, for every t = 2..T."""
    from uio_gguf.train.estimators import draw_windows

    seeds = {}
    for seed in range(1000):
        seeds.setdefault(draw_windows(n_segments, 1, random.Random(seed))[0], seed)
    assert sorted(seeds) == list(range(2, n_segments + 1))
    return seeds


@pytest.mark.parametrize("estimator, per_pass", [("full", 1), ("incremental", 1), ("unbiased", 1), ("unbiased", 2)])
def test_one_random_window_is_an_unbiased_estimate_of_the_crop(setup, estimator, per_pass):
    """loss_windows=1 scores one window t: averaged over the T-1 possible draws, the gradient and the
    loss are the whole crop's (exact: with S = T-1 no memory's graph is cut or sampled)."""
    from uio_gguf.train.estimators import estimate_gradient

    model, crop = setup
    full = flat_gradient(model, crop, "full")
    full_loss = estimate_gradient(model, crop, "full")
    seeds = _seed_drawing_each_window(T)
    grads, losses = [], []
    for seed in seeds.values():
        grads.append(
            flat_gradient(model, crop, estimator, T - 1, random.Random(seed), windows_per_pass=per_pass, loss_windows=1)
        )
        losses.append(estimate_gradient(model, crop, estimator, T - 1, random.Random(seed), True, per_pass, 1))
    assert rel_diff(grads[0], full) > 0.1  # one window alone is far from the crop's gradient
    assert rel_diff(torch.stack(grads).mean(0), full) < 1e-5
    assert abs(sum(losses) / len(losses) - full_loss) < 1e-5 * full_loss


def test_loss_windows_covering_the_crop_change_nothing(setup):
    """loss_windows >= T-1 scores every window and draws nothing, so the reservoir's draws (S = 1) and
    the gradient are those of a run without it."""
    model, crop = setup
    plain = flat_gradient(model, crop, "unbiased", 1, random.Random(5))
    assert rel_diff(flat_gradient(model, crop, "unbiased", 1, random.Random(5), loss_windows=T - 1), plain) == 0
    assert rel_diff(flat_gradient(model, crop, "unbiased", 1, random.Random(5), loss_windows=2), plain) > 1e-3


def _labelled(crop: Crop, scored: dict[int, list[tuple[int, int]]]) -> Crop:
    """The crop with labels (IGNORE elsewhere) at {window t: [(row, position in the window)]}."""
    from uio_gguf.train.model import IGNORE

    labels = torch.full_like(crop.tokens, IGNORE)
    for t, places in scored.items():
        for row, p in places:
            i = (t - 1) * SEG + 1 + p  # the target of window t's position p
            labels[row, i] = crop.tokens[row, i]
    return Crop(crop.tokens, SEG, labels)


def test_labels_score_only_their_tokens_in_every_estimator(setup):
    """J of a labelled crop is the mean, over its labelled windows, of their labelled tokens' mean NLL
    (computed here by hand), and every estimator that keeps every memory's graph computes its gradient."""
    from uio_gguf.train.estimators import estimate_gradient

    model, crop = setup
    scored = {3: [(0, 5), (1, 0)], T: [(0, SEG - 1), (0, 2), (1, 7)]}
    labelled = _labelled(crop, scored)
    for p in model.trainable_parameters():
        p.grad = None
    memories = [model.encode(crop.window(s)) for s in range(1, T)]
    per_window = []
    for t, places in scored.items():
        logp = torch.log_softmax(model.decode(crop.window(t), torch.cat(memories[: t - 1], dim=2)).float(), -1)
        targets = crop.targets(t)
        per_window.append(torch.stack([-logp[r, p, targets[r, p]] for r, p in places]).mean())
    by_hand = torch.stack(per_window).mean()
    by_hand.backward()
    expected = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.trainable_parameters()]
    ).double()
    assert abs(estimate_gradient(model, labelled, "full") - by_hand.item()) < 1e-5
    for estimator, per_pass in [("full", 1), ("incremental", 1), ("unbiased", 1), ("unbiased", 2), ("full", T - 1)]:
        got = flat_gradient(model, labelled, estimator, T - 1, random.Random(0), windows_per_pass=per_pass)
        assert rel_diff(got, expected) < 1e-5, (estimator, per_pass)


def test_labels_on_every_token_are_the_plain_crop(setup):
    model, crop = setup
    every = Crop(crop.tokens, SEG, crop.tokens.clone())
    for per_pass in (1, 2):
        plain = flat_gradient(model, crop, "unbiased", 2, random.Random(4), windows_per_pass=per_pass)
        assert (
            rel_diff(flat_gradient(model, every, "unbiased", 2, random.Random(4), windows_per_pass=per_pass), plain)
            < 1e-6
        )


def test_labels_that_score_nothing_after_the_first_window_are_refused(setup):
    from uio_gguf.train.estimators import estimate_gradient

    model, crop = setup
    with pytest.raises(ValueError, match="score nothing"):
        estimate_gradient(model, _labelled(crop, {1: [(0, 3)]}), "full")
