"""The noise in SGD: Smith & Le's noise scale, schedules that keep it, and B_simple.

Smith & Le (2018) write SGD on the mean loss with learning rate lr as a noisy gradient flow on
the *summed* cost C = N L, whose time step is lr / N: matching the noise of a batch of B out of
N samples gives the noise scale g = lr (N / B - 1), with momentum m g = lr / (1 - m) (N / B - 1)
(``noise_scale``). On the mean loss itself, with time step lr, the same matching gives
g / N: either way g is proportional to lr / B for B << N. Decaying lr by k and growing B by k
lower g alike, so "decay the learning rate" and "increase the batch size" (Smith, Kindermans,
Ying & Le, 2018) are two ways of following one noise profile, the second with k times fewer
parameter updates.

McCandlish, Kaplan, Amodei et al. (2018), "An empirical model of large-batch training": the
simple noise scale B_simple = tr(Sigma) / |G|^2, estimated without bias from squared gradient
norms measured at two batch sizes. Measuring them on a model is ``lessons.measure``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lessons.ema import ema


def noise_scale(lr: float, n: int, batch: int, momentum: float = 0.0) -> float:
    """Smith & Le's g = lr / (1 - momentum) * (n / batch - 1), in their convention of a summed
    cost (a mean loss with time step lr gives g / n)."""
    for name, value in (("lr", lr), ("n", n), ("batch", batch)):
        if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if batch > n:
        raise ValueError(
            f"batch {batch} is larger than the data set ({n}): the noise scale "
            "needs B <= N (and the rule only holds for B much smaller than N)"
        )
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return lr / (1 - momentum) * (n / batch - 1)


def milestones_fn(base: float, factor: float, milestones: Sequence[int]) -> Callable[[int], float]:
    """base * factor ** (number of milestones reached by epoch e)."""
    ms = sorted(int(m) for m in milestones)
    return lambda epoch: base * factor ** sum(epoch >= m for m in ms)


def matching_batch(batch: int, n: int, k: float) -> int:
    """The batch whose noise scale is 1/k of ``batch``'s at the same lr: N/B' - 1 = (N/B - 1)/k,
    rounded to a whole batch (for B << N this is about k * B)."""
    return max(1, round(n / (1 + (n / batch - 1) / k)))


def schedules(
    lr: float, batch: int, n: int, k: float, milestones: Sequence[int]
) -> dict[str, dict]:
    """The three schedules of Smith et al. with one noise-scale profile, as TrainConfig
    overrides: "decay lr" (lr / k at each milestone), "grow batch" (the batch that divides the
    noise scale by k at each milestone) and "hybrid" (grow the batch at the first milestone,
    decay lr at the others)."""
    if k <= 1:
        raise ValueError(f"the factor k must be > 1, got {k!r}")
    ms = sorted(int(m) for m in milestones)
    if not ms or ms[0] < 1:
        raise ValueError(f"milestones must be epochs >= 1, got {list(milestones)!r}")

    def grown(epoch: int) -> int:
        return matching_batch(batch, n, k ** sum(epoch >= m for m in ms))

    def hybrid_batch(epoch: int) -> int:
        return matching_batch(batch, n, k) if epoch >= ms[0] else batch

    hybrid_lr = milestones_fn(lr, 1 / k, ms[1:])
    return {
        "decay lr": dict(lr=lr, batch=batch, lr_at=milestones_fn(lr, 1 / k, ms)),
        "grow batch": dict(lr=lr, batch=batch, batch_at=grown),
        "hybrid": dict(lr=lr, batch=batch, lr_at=hybrid_lr, batch_at=hybrid_batch),
    }


def gradient_moments(
    g_small_sq, g_big_sq, b_small: int, b_big: int, beta: float | None = 0.9
) -> tuple[float, float]:
    """(|G|^2, tr Sigma) from squared norms of batch-mean gradients measured at two batch
    sizes (arrays over repeated measurements), with McCandlish et al.'s unbiased estimators,
    each smoothed by a debiased EMA (``beta``; None: a plain mean):
        |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr Sigma ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    small, big = np.asarray(g_small_sq, float), np.asarray(g_big_sq, float)
    if small.shape != big.shape or small.ndim != 1 or not len(small):
        raise ValueError("g_small_sq and g_big_sq must be 1-D arrays of the same length")
    g2 = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    if beta is None:
        return float(g2.mean()), float(trace.mean())
    return float(ema(g2, beta, debias=True)[-1]), float(ema(trace, beta, debias=True)[-1])


def simple_noise_scale(
    g_small_sq, g_big_sq, b_small: int, b_big: int, beta: float | None = 0.9
) -> float:
    """B_simple = tr(Sigma) / |G|^2, the ratio of the two smoothed estimates above."""
    g2, trace = gradient_moments(g_small_sq, g_big_sq, b_small, b_big, beta)
    if g2 <= 0:
        return float("inf")  # no signal left above the noise: any batch is "small"
    return trace / g2


def momentum_batch(batch: int, n: int, momentum: float, new_momentum: float) -> int:
    """The batch that keeps the noise scale when the momentum changes at the same lr: g grows
    as 1 / (1 - m), so N/B' - 1 = (N/B - 1) (1 - m') / (1 - m): B proportional to 1 / (1 - m)
    while B << N (Smith et al. 2018)."""
    for name, m in (("momentum", momentum), ("new_momentum", new_momentum)):
        if not 0 <= m < 1:
            raise ValueError(f"{name} must be in [0, 1), got {m!r}")
    return matching_batch(batch, n, (1 - momentum) / (1 - new_momentum))


def sgd_stationary_variance(
    lr: float, batch: int, n: int, curvature: float = 1.0, steps: int = 20_000, seed: int = 0
) -> tuple[float, float]:
    """SGD on N one-dimensional quadratics l_i = curvature / 2 (w - a_i)^2 (the a_i of mean 0
    and variance 1), each step on the mean loss of a fresh batch drawn without replacement.
    Returns (the variance of w about the minimum once stationary, the per-sample gradient
    variance F at the minimum): the numbers a noise-scale formula must predict."""
    if not 1 <= batch <= n:
        raise ValueError(f"need 1 <= batch <= n, got batch {batch}, n {n}")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n)
    a = (a - a.mean()) / a.std()
    picks = rng.random((steps, n)).argsort(axis=1)[:, :batch]
    targets = a[picks].mean(axis=1)  # each step's batch-mean minimum
    step = lr * curvature
    w, path = 0.0, np.empty(steps)
    for t, target in enumerate(targets):
        w -= step * (w - target)
        path[t] = w
    burn = min(steps // 2, int(10 / step))
    return float(path[burn:].var()), float(curvature**2 * a.var(ddof=1))
