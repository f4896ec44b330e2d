"""The noise in SGD: Smith & Le's noise scale, schedules that keep it, and B_simple.

Smith & Le (2018): SGD with learning rate lr, batch B out of N samples and momentum m behaves
like a noisy gradient flow with noise scale g = lr / (1 - m) * (N / B - 1). Decaying lr by k
and growing B by k (for B << N) lower g alike, so "decay the learning rate" and "increase the
batch size" (Smith, Kindermans, Ying & Le, 2018) are two ways of following one noise profile -
the second with k times fewer parameter updates.

McCandlish, Kaplan, Amodei et al. (2018), "An empirical model of large-batch training": the
simple noise scale B_simple = tr(Sigma) / |G|^2, estimated without bias from squared gradient
norms measured at two batch sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lessons import data as data_mod
from lessons.ema import ema
from lessons.train import channels_last_on


def noise_scale(lr: float, n: int, batch: int, momentum: float = 0.0) -> float:
    """g = lr / (1 - momentum) * (n / batch - 1)."""
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


def measure_gradient_moments(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    b_small: int,
    b_big: int,
    repeats: int = 8,
    seed: int = 0,
    beta: float | None = None,
) -> tuple[float, float]:
    """(|G|^2, tr Sigma) of ``model`` at its current weights on the data (x, y) (x normalised
    float), from squared norms of batch-mean gradients at two batch sizes.

    Each of ``repeats`` random big batches is split into ``b_big // b_small`` small batches, a
    backward each; the big batch's gradient is the mean of theirs (BatchNorm in eval mode, so
    a batch's gradient is the mean of its samples'). Both sizes then see the same samples, and
    the difference of their squared norms, which carries tr Sigma, is not drowned by the
    |G|^2 the two share. Paired so, tr Sigma never comes out negative (a mean of squared
    norms is never below the squared norm of the mean), where independent batches often
    gave a negative one on a small CNN with 8 repeats."""
    if not 0 < b_small < b_big or b_big % b_small:
        raise ValueError(
            f"need 0 < b_small < b_big with b_big a multiple of b_small, got {b_small}, {b_big}"
        )
    if b_big > len(x):
        raise ValueError(f"b_big ({b_big}) is larger than the {len(x)} samples given")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()  # BatchNorm in eval mode: a batch's gradient does not depend on its size
    small, big = [], []
    parts = b_big // b_small
    try:
        for _ in range(repeats):
            idx = torch.randperm(len(x), generator=gen, device=x.device)[:b_big]
            total, sq = None, 0.0
            for part in idx.split(b_small):
                grads = torch.autograd.grad(F.cross_entropy(model(x[part]), y[part]), params)
                flat = torch.cat([g.float().flatten() for g in grads])
                sq += float(flat.square().sum())
                total = flat if total is None else total + flat
            small.append(sq / parts)  # the mean squared norm of a small batch's gradient
            big.append(float((total / parts).square().sum()))
    finally:
        model.train(was_training)
    return gradient_moments(small, big, b_small, b_big, beta)


def measure_simple_noise_scale(
    model,
    x,
    y,
    b_small: int,
    b_big: int,
    repeats: int = 8,
    seed: int = 0,
    beta: float | None = None,
) -> float:
    """B_simple = tr Sigma / |G|^2 of ``model`` at its current weights (see above)."""
    g2, trace = measure_gradient_moments(model, x, y, b_small, b_big, repeats, seed, beta)
    return float("inf") if g2 <= 0 else trace / g2


def noise_probe(b_small: int, b_big: int, repeats: int = 8, n: int = 2048) -> Callable:
    """A TrainConfig.on_epoch hook: B_simple at the end of every epoch, measured on up to
    ``n`` training images, reported as {"b_simple": value}."""

    def probe(model, ds, epoch):
        x = data_mod.normalize(ds.train_x[:n])
        if channels_last_on(x.device):  # as the engine's batches
            x = x.contiguous(memory_format=torch.channels_last)
        return {
            "b_simple": measure_simple_noise_scale(
                model, x, ds.train_y[:n], b_small, b_big, repeats, seed=epoch
            )
        }

    return probe
