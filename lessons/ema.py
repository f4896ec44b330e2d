"""Exponential moving averages as discounted averages.

m_t = beta m_{t-1} + (1 - beta) x_t, m_0 = 0, puts weight (1 - beta) beta^k on the value k steps
back. The weights of the first t steps add up to 1 - beta^t (so dividing by it, Adam's bias
correction, makes a true weighted average). The half-life, after which a value has lost half
its weight, is ln(1/2) / ln(beta) steps; the effective window, the total weight over the
weight of the newest value, is 1 / (1 - beta) steps. For beta near 1 the half-life is about
ln 2 / (1 - beta) = 0.693 / (1 - beta).

Horizons in samples: one step of batch b consumes b samples, so a horizon of h steps is
h * b samples and h * b / n epochs of a data set of n samples.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "beta_for_half_life",
    "ema",
    "ema_over_samples",
    "ema_weights",
    "effective_window",
    "half_life",
    "horizon_epochs",
    "horizon_samples",
]


def _check_beta(beta):
    b = np.asarray(beta, dtype=float)
    if b.size == 0 or not np.all((b > 0) & (b < 1)):
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    return b


def _out(value, like):
    """A float for scalar input, an array for array input."""
    return float(value) if np.ndim(like) == 0 else np.asarray(value, dtype=float)


def ema(x, beta: float, debias: bool = False):
    """The EMA of a 1-D sequence (numpy array, list or torch tensor; the same type back).

    m_t = beta m_{t-1} + (1 - beta) x_t from m_0 = 0; ``debias`` divides m_t by 1 - beta^t.
    """
    _check_beta(beta)
    if np.ndim(beta) != 0:
        raise ValueError(f"beta must be one number here, got {beta!r}")
    beta = float(beta)
    torch_like = type(x).__module__.startswith("torch")
    values = x.detach().cpu().double().numpy() if torch_like else np.asarray(x, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"ema takes a 1-D sequence, got shape {values.shape}")
    out = np.empty_like(values)
    m = 0.0
    for t, v in enumerate(values):
        m = beta * m + (1.0 - beta) * v
        out[t] = m
    if debias:
        out /= 1.0 - beta ** np.arange(1, len(values) + 1)
    if torch_like:
        import torch

        return torch.as_tensor(
            out, dtype=x.dtype if x.is_floating_point() else torch.float64, device=x.device
        )
    return out


def ema_over_samples(x, batches, half_life_samples: float) -> np.ndarray:
    """A bias-corrected EMA of per-step values whose steps consumed ``batches`` samples each,
    with a half-life of ``half_life_samples`` samples: a step of batch b discounts by
    beta_b = 0.5 ** (b / half_life_samples), the per-sample discount to the power b. Runs at
    different (or changing) batch sizes are so smoothed over the same number of samples; for a
    constant batch b it is ``ema(x, beta_b, debias=True)``."""
    values = np.asarray(x, dtype=float)
    b = np.asarray(batches, dtype=float)
    if values.ndim != 1 or b.shape != values.shape:
        raise ValueError(f"x and batches must be 1-D and alike, got {values.shape}, {b.shape}")
    if not (half_life_samples > 0 and np.all(b > 0)):
        raise ValueError("the half-life and every batch must be positive")
    betas = 0.5 ** (b / half_life_samples)
    out = np.empty_like(values)
    m = w = 0.0
    for t, (v, beta) in enumerate(zip(values, betas)):
        m = beta * m + (1.0 - beta) * v
        w = beta * w + (1.0 - beta)  # the weight so far: bias correction
        out[t] = m / w
    return out


def ema_weights(beta: float, n: int) -> np.ndarray:
    """The weight (1 - beta) beta^k of the value k steps back, for k = 0 .. n-1."""
    _check_beta(beta)
    if int(n) != n or n <= 0:
        raise ValueError(f"n must be a positive whole number, got {n!r}")
    return (1.0 - beta) * float(beta) ** np.arange(int(n))


def half_life(beta):
    """Steps after which a value's weight has halved: ln(1/2) / ln(beta) (exact)."""
    b = _check_beta(beta)
    return _out(math.log(0.5) / np.log(b), beta)


def effective_window(beta):
    """1 / (1 - beta): the total weight over the newest value's weight, in steps."""
    b = _check_beta(beta)
    return _out(1.0 / (1.0 - b), beta)


def beta_for_half_life(h):
    """The beta whose half-life is ``h`` steps: 0.5 ** (1 / h)."""
    harr = np.asarray(h, dtype=float)
    if harr.size == 0 or not np.all(harr > 0) or not np.all(np.isfinite(harr)):
        raise ValueError(f"half-life must be a positive number of steps, got {h!r}")
    return _out(0.5 ** (1.0 / harr), h)


def horizon_samples(steps, batch: int):
    """A horizon of ``steps`` optimizer steps at batch ``batch``, in samples."""
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, got {batch!r}")
    return _out(np.asarray(steps, dtype=float) * batch, steps)


def horizon_epochs(steps, batch: int, n: int):
    """A horizon of ``steps`` steps at batch ``batch``, in epochs of ``n`` samples."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
    return _out(horizon_samples(steps, batch) / n, steps)
