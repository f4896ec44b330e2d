"""Measurements on a real model at frozen weights: gradient moments and B_simple, the size of
Adam's direction against the batch, and b small steps against one big one.

Gradients are taken on a copy of the model in eval mode whose BatchNorm statistics are those
of the data measured on (``measurement_copy``): eval mode makes a batch's gradient the mean of
its samples' gradients, and fresh statistics keep the copy the network that trains (at
initialisation the running statistics are 0 and 1, another network altogether).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lessons.augment import normalize
from lessons.callbacks import EpochEnd
from lessons.models import make_model
from lessons.noise import gradient_moments
from lessons.optim import InvariantAdamW


def measurement_copy(model: torch.nn.Module, x: torch.Tensor, chunk: int = 1024):
    """A copy of ``model`` in eval mode, its BatchNorm running statistics set to the batch
    statistics of ``x`` (normalised float images), averaged over chunks of ``chunk``."""
    net = copy.deepcopy(model)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the chunks
        net.train()
        with torch.no_grad():
            for part in x.split(chunk):
                net(part)
    return net.eval()


def _flat_grad(net, params, x, y) -> torch.Tensor:
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    return torch.cat([g.float().flatten() for g in grads])


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
    backward each; the big batch's gradient is the mean of theirs. Both sizes then see the same
    samples, so the difference of their squared norms, which carries tr Sigma, is not drowned
    by the |G|^2 the two share, and tr Sigma cannot come out negative (a mean of squared norms
    is never below the squared norm of the mean)."""
    if not 0 < b_small < b_big or b_big % b_small:
        raise ValueError(
            f"need 0 < b_small < b_big with b_big a multiple of b_small, got {b_small}, {b_big}"
        )
    if b_big > len(x):
        raise ValueError(f"b_big ({b_big}) is larger than the {len(x)} samples given")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    net = measurement_copy(model, x)
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    parts = b_big // b_small
    small, big = [], []
    for _ in range(repeats):
        idx = torch.randperm(len(x), generator=gen, device=x.device)[:b_big]
        flats = [_flat_grad(net, params, x[part], y[part]) for part in idx.split(b_small)]
        small.append(sum(float(f.square().sum()) for f in flats) / parts)
        big.append(float((sum(flats) / parts).square().sum()))
    return gradient_moments(small, big, b_small, b_big, beta)


def measure_simple_noise_scale(
    model, x, y, b_small: int, b_big: int, repeats: int = 8, seed: int = 0
) -> float:
    """B_simple = tr Sigma / |G|^2 of ``model`` at its current weights (see above)."""
    g2, trace = measure_gradient_moments(model, x, y, b_small, b_big, repeats, seed)
    return float("inf") if g2 <= 0 else trace / g2


def noise_probe(b_small: int, b_big: int, repeats: int = 8, n: int = 2048) -> EpochEnd:
    """A callback (TrainConfig.callbacks): B_simple at the end of every epoch, measured on up
    to ``n`` training images, reported as {"b_simple": value} in the eval record. The images
    are drawn at random with a fixed seed, the same ones at every epoch: the training set is
    stored class by class, and its first ``n`` would hold a few classes only."""

    def probe(model, ds, epoch):
        order = torch.randperm(len(ds.train_x), generator=torch.Generator().manual_seed(0))
        picked = order[:n].to(ds.train_x.device)
        x = normalize(ds.train_x[picked])
        if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # as the engine's batches
        return {
            "b_simple": measure_simple_noise_scale(
                model, x, ds.train_y[picked], b_small, b_big, repeats, seed=epoch
            )
        }

    return EpochEnd(probe)


def adam_direction_by_batch(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Sequence[int],
    betas: tuple[float, float] = (0.9, 0.99),
    base_batch: int | None = None,
    samples: int = 8192,
    seed: int = 0,
) -> dict[int, dict]:
    """How large Adam's direction r = m_hat / sqrt(v_hat) is at each batch size, with the
    weights frozen so that only the batch changes: for every batch b, Adam's two moments run
    over ``samples`` samples of random batches of b from (x, y), with the betas carried from
    ``base_batch`` (the smallest batch if None) as beta^(b / base_batch).

    Returns, per batch, the measured rms of r (over all weights, averaged over the second
    half of the steps) and the prediction from the per-weight mean mu and variance sigma^2 of
    the gradients, E r^2 ~ (mu^2 + c sigma^2 / b) / (mu^2 + sigma^2 / b) with
    c = (1 - beta1) / (1 + beta1), the noise an EMA keeps."""
    batches = sorted(int(b) for b in batches)
    if not batches or batches[0] < 1 or batches[-1] > len(x):
        raise ValueError(f"batch sizes must be in 1..{len(x)}, got {batches}")
    base = base_batch or batches[0]
    net = measurement_copy(model, x)
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    draws: dict[int, torch.Tensor] = {}
    for b in batches:
        steps = max(8, samples // b)
        idx = torch.randint(len(x), (steps, b), generator=gen, device=x.device)
        draws[b] = torch.stack([_flat_grad(net, params, x[i], y[i]) for i in idx]).double()
    mu2 = torch.cat(list(draws.values())).mean(0).square()
    small = batches[0]
    sigma2 = draws[small].var(0) * small  # per-sample variance, from the smallest batch
    out = {}
    for b, g in draws.items():
        b1, b2 = (beta ** (b / base) for beta in betas)
        out[b] = dict(
            betas=(b1, b2),
            rms_r=_adam_direction_rms(g, b1, b2),
            predicted=_predicted_rms(mu2, sigma2, b, b1),
        )
    return out


def _adam_direction_rms(grads: torch.Tensor, b1: float, b2: float) -> float:
    """rms of m_hat / sqrt(v_hat) over a sequence of gradients [steps, weights], averaged
    over the second half of the steps."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    squares = []
    for t, g in enumerate(grads, start=1):
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        r = (m / (1 - b1**t)) / (v / (1 - b2**t)).sqrt().clamp_min(1e-30)
        squares.append(float(r.square().mean()))
    return float(np.sqrt(np.mean(squares[len(squares) // 2 :])))


def _predicted_rms(mu2: torch.Tensor, sigma2: torch.Tensor, b: int, b1: float) -> float:
    kept = (1 - b1) / (1 + b1)
    noise = sigma2 / b
    r2 = (mu2 + kept * noise) / (mu2 + noise).clamp_min(1e-30)
    return float(r2.mean().sqrt())


def net_endpoints(x, y, lr: float, width: int = 8, seed: int = 0) -> float:
    """On a small net (LayerNorm, so a sample's output does not depend on its batch): b = len(x)
    SGD steps of batch 1 at ``lr`` against one step of batch b at ``b * lr`` from the same
    start. Returns ||w_steps - w_big|| / ||w_big - w_0||: zero to first order in lr."""
    torch.manual_seed(seed)
    start = make_model(10, width=width, depth=0, norm="layer").double()
    x = x.double()
    b = len(x)

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    w0 = flat(start)
    small = copy.deepcopy(start)
    for i in range(b):
        small.zero_grad()
        F.cross_entropy(small(x[i : i + 1]), y[i : i + 1]).backward()
        with torch.no_grad():
            for p in small.parameters():
                p -= lr * p.grad
    big = copy.deepcopy(start)
    F.cross_entropy(big(x), y).backward()  # the batch-mean gradient
    with torch.no_grad():
        for p in big.parameters():
            p -= b * lr * p.grad
    return float((flat(small) - flat(big)).norm() / (flat(big) - w0).norm())


def optimizer_v_by_batch(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Sequence[int],
    micro: int,
    repeats: int = 4,
    seed: int = 0,
) -> dict[str, list[float]]:
    """v as the optimizers themselves compute it: after one step of torch.optim.Adam and of
    InvariantAdamW (micro-batches of ``micro`` samples) on a batch of each size in ``batches``,
    drawn with replacement from (x, y), the total over all weights of exp_avg_sq / (1 - beta2)
    (its bias correction), averaged over ``repeats`` draws; on a measurement copy of
    ``model`` (its BatchNorm statistics fixed), with lr 0 so that no step moves it.

    Standard Adam's v is the squared batch-mean gradient, E = |G|^2 + tr Sigma / B; invariant
    Adam's the mean of the squared micro-batch gradients, E = |G|^2 + tr Sigma / micro."""
    net = measurement_copy(model, x)
    params = [q for q in net.parameters() if q.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {"adam": [], "invariant": []}
    for b in batches:
        if b % micro:
            raise ValueError(f"the micro-batch {micro} must divide every batch, not {b}")
        totals = {"adam": 0.0, "invariant": 0.0}
        for _ in range(repeats):
            idx = torch.randint(len(x), (b,), generator=gen)
            totals["adam"] += _v_after_one_step(net, params, x[idx], y[idx], b)
            totals["invariant"] += _v_after_one_step(net, params, x[idx], y[idx], micro)
        for name, total in totals.items():
            out[name].append(total / repeats)
    return out


def _v_after_one_step(net, params, xb, yb, micro: int) -> float:
    """One step over (xb, yb) in micro-batches of ``micro`` (the whole batch: torch's Adam);
    the optimizer's bias-corrected v, summed over the weights."""
    beta2 = 0.999
    if micro == len(xb):
        opt = torch.optim.Adam(params, lr=0.0, betas=(0.9, beta2))
        F.cross_entropy(net(xb), yb).backward()
    else:
        opt = InvariantAdamW(params, lr=0.0, betas=(0.9, beta2), weight_decay=0.0)
        for xm, ym in zip(xb.split(micro), yb.split(micro)):
            F.cross_entropy(net(xm), ym).backward()
            opt.accumulate()
    opt.step()
    v = sum(float(opt.state[q]["exp_avg_sq"].sum()) for q in params)
    for q in params:
        q.grad = None
    return v / (1 - beta2)
