"""lessons.ema against closed forms and numbers computed independently here."""

import math

import numpy as np
import pytest
import torch

from lessons import ema as E


def reference_ema(xs, beta):
    """A second, deliberately naive implementation: the discounted sum written out."""
    out = []
    for t in range(1, len(xs) + 1):
        out.append(sum((1 - beta) * beta**k * xs[t - 1 - k] for k in range(t)))
    return out


def test_ema_matches_the_discounted_sum():
    xs = [3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.0]
    for beta in (0.3, 0.9, 0.999):
        assert np.allclose(E.ema(xs, beta), reference_ema(xs, beta), rtol=1e-12)


def test_impulse_response_is_the_weights():
    x = np.zeros(40)
    x[0] = 1.0
    for beta in (0.5, 0.9, 0.99):
        assert np.allclose(E.ema(x, beta), E.ema_weights(beta, 40))
        assert E.ema_weights(beta, 3) == pytest.approx(
            [1 - beta, (1 - beta) * beta, (1 - beta) * beta**2]
        )


def test_total_weight_is_one_minus_beta_to_the_t():
    for beta, t in ((0.9, 1), (0.9, 25), (0.999, 3000)):
        assert E.ema_weights(beta, t).sum() == pytest.approx(1 - beta**t, rel=1e-9)


def test_debiasing_a_constant_returns_it():
    for beta in (0.5, 0.9, 0.999):
        assert np.allclose(E.ema(np.full(50, -2.5), beta, debias=True), -2.5)
    # without debiasing the first value is (1 - beta) times the constant
    assert E.ema([4.0], 0.75)[0] == pytest.approx(1.0)


def test_half_life_and_window_closed_forms():
    assert E.half_life(0.5) == pytest.approx(1.0)
    assert E.half_life(0.9) == pytest.approx(6.578813478960585)  # ln 0.5 / ln 0.9
    assert E.half_life(0.999) == pytest.approx(692.8005, rel=1e-6)
    assert E.effective_window(0.9) == pytest.approx(10.0)
    assert E.effective_window(0.999) == pytest.approx(1000.0)
    # after one half-life exactly half the weight of the newest value is left
    for beta in (0.7, 0.95):
        assert beta ** E.half_life(beta) == pytest.approx(0.5)


def test_half_life_approximation_and_where_it_breaks():
    def rel_err(beta):
        return math.log(2) / (1 - beta) / E.half_life(beta) - 1

    assert abs(rel_err(0.999)) < 1e-3 and abs(rel_err(0.99)) < 1e-2
    assert rel_err(0.5) > 0.38  # 1.386 against 1.0
    assert rel_err(0.5) > rel_err(0.8) > rel_err(0.9) > rel_err(0.99) > 0


def test_inverse_round_trip_and_arrays():
    hs = np.array([0.5, 1.0, 6.5788, 100.0, 1e5])
    assert np.allclose(E.half_life(E.beta_for_half_life(hs)), hs)
    betas = np.array([0.3, 0.9, 0.9999])
    assert np.allclose(E.beta_for_half_life(E.half_life(betas)), betas)
    assert isinstance(E.half_life(0.9), float)
    assert isinstance(E.effective_window(betas), np.ndarray)


def test_ramp_lag_is_beta_over_one_minus_beta():
    t = np.arange(5000, dtype=float)
    for beta in (0.5, 0.9, 0.98):
        assert (t - E.ema(t, beta))[-1] == pytest.approx(beta / (1 - beta), rel=1e-9)


def test_torch_in_torch_out():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)
    out = E.ema(x, 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([0.5, 1.25, 2.125]))


def test_horizons_in_samples_and_epochs():
    assert E.horizon_samples(1000, 64) == 64_000
    assert E.horizon_epochs(1000, 1024, 9469) == pytest.approx(1_024_000 / 9469)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_beta_outside_the_open_interval_is_named(bad):
    for fn in (
        E.half_life,
        E.effective_window,
        lambda b: E.ema([1.0], b),
        lambda b: E.ema_weights(b, 3),
    ):
        with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)") as err:
            fn(bad)
        assert repr(bad) in str(err.value)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: E.ema_weights(0.9, 0), "positive whole number, got 0"),
        (lambda: E.ema_weights(0.9, 2.5), "got 2.5"),
        (lambda: E.beta_for_half_life(0), "got 0"),
        (lambda: E.beta_for_half_life(-3.0), "got -3.0"),
        (lambda: E.ema(np.zeros((2, 2)), 0.9), "1-D"),
        (lambda: E.horizon_samples(10, 0), "batch"),
    ],
)
def test_other_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ema_over_samples_smooths_every_batch_over_the_same_samples():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50)
    # a constant batch: the per-step EMA with beta = 0.5 ** (b / H), bias-corrected
    got = E.ema_over_samples(x, [32] * 50, 320.0)
    assert np.allclose(got, E.ema(x, 0.5 ** (32 / 320), debias=True), rtol=1e-12)
    # a changing batch: the weighted mean whose weight on step t is (1 - beta_t) times the
    # discounts of every later step, each 0.5 ** (samples since / H)
    batches = rng.choice([16, 64, 256], size=50)
    got = E.ema_over_samples(x, batches, 300.0)
    betas = 0.5 ** (batches / 300.0)
    for t in (0, 10, 49):
        w = np.array([(1 - betas[s]) * np.prod(betas[s + 1 : t + 1]) for s in range(t + 1)])
        assert np.isclose(got[t], (w * x[: t + 1]).sum() / w.sum(), rtol=1e-12)
    # the same samples, the same horizon: a half-life of 320 samples is 10 steps at 32, 1 at 320
    assert E.half_life(0.5 ** (32 / 320)) == pytest.approx(10)
    with pytest.raises(ValueError, match="positive"):
        E.ema_over_samples(x, [0] * 50, 10.0)
