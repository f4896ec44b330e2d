"""Carrying hyperparameters across batch sizes.

One step at batch b consumes b samples, so a per-step beta is a per-sample discount
beta^(1/b). Keeping the half-life *in samples* when the batch goes from b to b' gives
beta -> beta^(b'/b) (``scale_beta``). ``transfer`` applies a whole rule, with
k = to_batch / from_batch:

- "lamb" (the "EMA and batch size" blog): keep every average's horizon in samples and the
  step per sample: betas -> beta^k, lr -> k lr, weight decay unchanged. The decay stays under
  the blog's *assumption* that Adam's direction r = m_hat / sqrt(v_hat) has the same size at
  every batch; where gradient noise dominates, v_hat ~ mu^2 + sigma^2 / B falls with B and
  ||r|| grows, so the same lambda weighs less in s = r + lambda w at a larger batch.
  torch's SGD momentum is not an EMA (buf = m buf + g, no 1 - m factor: its step is
  lr / (1 - m) per unit gradient), so there m -> m^k and lr -> k lr (1 - m^k) / (1 - m).
- "adam-sqrt" (Malladi et al. 2022, the square-root scaling rule for Adam): lr -> sqrt(k) lr,
  1 - beta -> k (1 - beta), eps -> eps / sqrt(k). The rule names no weight decay: AdamW's
  decoupled decay (lr lambda w a step) then falls by sqrt(k) per sample.
- "sgd-linear" (Goyal et al. 2017): lr -> k lr, momentum and betas kept.
- "invariant-adam" (Wang & Aitchison 2024, for ``lessons.optim.InvariantAdamW``): lr -> k lr,
  betas -> beta^k.

A rule meant for Adam's betas ("adam-sqrt", "invariant-adam") refuses SGD's momentum.

``python -m lessons.scaling --from-batch 256 --to-batch 1 --rule lamb --lr 1e-3 --beta1 0.9
--beta2 0.99 --weight-decay 0.01`` prints the transferred settings with their half-lives.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from lessons.ema import half_life

RULES = ("lamb", "adam-sqrt", "sgd-linear", "invariant-adam")
ADAM_RULES = ("adam-sqrt", "invariant-adam")  # rules for Adam's betas only


def _check_batch(name: str, b) -> float:
    if not (isinstance(b, int | float) and math.isfinite(b) and b > 0):
        raise ValueError(f"{name} must be a positive number of samples, got {b!r}")
    return float(b)


def _check_beta(beta) -> float:
    if not (isinstance(beta, int | float) and 0 < beta < 1):
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    return float(beta)


def scale_beta(beta: float, from_batch: float, to_batch: float) -> float:
    """beta ** (to_batch / from_batch): the same per-sample discount at the new batch size,
    so the same half-life measured in samples."""
    beta = _check_beta(beta)
    k = _check_batch("to_batch", to_batch) / _check_batch("from_batch", from_batch)
    return beta**k


def _sqrt_rule_beta(beta: float, k: float) -> float:
    """Malladi et al.: 1 - beta scaled by k."""
    beta = _check_beta(beta)
    one_minus = (1 - beta) * k
    if one_minus >= 1:
        raise ValueError(
            f"the adam-sqrt rule would make 1 - beta = {one_minus:.4g} >= 1 for beta = {beta} "
            f"at k = {k:g}: the batch grows too much for this beta (use the 'lamb' rule or a "
            "smaller factor)"
        )
    return 1 - one_minus


def momentum_lr_factor(momentum: float, k: float) -> float:
    """The factor on lr that keeps torch SGD's step per sample when the batch grows k-fold
    and the momentum keeps its horizon in samples (m -> m^k): the step per unit gradient is
    lr / (1 - m) and must grow k-fold, so k (1 - m^k) / (1 - m) (k where m = 0)."""
    if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return k * (1 - momentum**k) / (1 - momentum)


def _check_hparams(hparams: dict, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")
    known = {"lr", "betas", "eps", "weight_decay", "momentum"}
    unknown = set(hparams) - known
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)}: use {sorted(known)}")
    if "momentum" in hparams and rule in ADAM_RULES:
        raise ValueError(
            f"the {rule!r} rule carries Adam's betas, not SGD's momentum: for SGD with "
            "momentum use 'lamb' (same horizon and step per sample) or 'sgd-linear'"
        )


def transfer(hparams: dict, from_batch: float, to_batch: float, rule: str) -> dict:
    """The hyperparameters for ``to_batch`` under ``rule``; the same keys come back."""
    _check_hparams(hparams, rule)
    k = _check_batch("to_batch", to_batch) / _check_batch("from_batch", from_batch)
    out = dict(hparams)
    if "betas" in out:
        out["betas"] = tuple(_check_beta(b) for b in out["betas"])
    if rule in ("lamb", "invariant-adam"):
        if "betas" in out:
            out["betas"] = tuple(b**k for b in out["betas"])
        momentum = out.get("momentum", 0.0)
        factor = momentum_lr_factor(momentum, k)
        if "lr" in out:
            out["lr"] = out["lr"] * factor
        if "momentum" in out:
            out["momentum"] = momentum**k
    elif rule == "adam-sqrt":
        if "lr" in out:
            out["lr"] = out["lr"] * math.sqrt(k)
        if "betas" in out:
            out["betas"] = tuple(_sqrt_rule_beta(b, k) for b in out["betas"])
        if "eps" in out:
            out["eps"] = out["eps"] / math.sqrt(k)
    elif "lr" in out:  # sgd-linear
        out["lr"] = out["lr"] * k
    return out


def curve_gap(base_x, base_y, x, y, bins: int = 10) -> float:
    """Mean absolute difference between two loss curves over the second half of the baseline's
    x range: the losses are averaged in ``bins`` equal bins of x (so per-step noise and
    different step counts do not matter) and the bin means compared."""
    base_x, base_y = np.asarray(base_x, float), np.asarray(base_y, float)
    x, y = np.asarray(x, float), np.asarray(y, float)
    lo, hi = base_x.max() / 2, base_x.max()
    edges = np.linspace(lo, hi, bins + 1)
    diffs = []
    for a, b in zip(edges[:-1], edges[1:]):
        m1 = (base_x >= a) & (base_x <= b)
        m2 = (x >= a) & (x <= b)
        if m1.any() and m2.any():
            diffs.append(abs(base_y[m1].mean() - y[m2].mean()))
    if not diffs:
        raise ValueError("the two curves do not overlap in the second half of the baseline")
    return float(np.mean(diffs))


def sweep_spread(curves) -> float:
    """How far apart the curves of a batch-size sweep are: per epoch, the largest minus the
    smallest loss across the runs, averaged over the second half of the epochs."""
    arr = np.asarray(curves, float)
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"need per-epoch losses of at least two runs, got shape {arr.shape}")
    gap = arr.max(0) - arr.min(0)
    return float(gap[arr.shape[1] // 2 :].mean())


def quadratic_endpoints(lr: float, b: int, curvature=(1.0, 0.3, 0.05), w0=(1.0, 1.0, 1.0)):
    """b gradient steps at ``lr`` against one step at ``b * lr`` on the noise-free quadratic
    L(w) = 1/2 sum_i c_i w_i^2. Returns (w after b small steps, w after one big step, w0)."""
    c, w = np.asarray(curvature, float), np.asarray(w0, float)
    small = w.copy()
    for _ in range(int(b)):
        small = small - lr * c * small
    big = w - b * lr * c * w
    return small, big, w


def per_sample_weights(beta: float, batch: int, n: int) -> np.ndarray:
    """The weight an EMA with per-step ``beta`` at ``batch`` puts on the sample j samples back,
    j = 0..n-1: every sample of a batch shares its batch's weight, (1 - beta) beta^floor(j/b) / b.
    At batch 1 with beta^(1/b) this is the smooth curve the staircase follows."""
    _check_beta(beta)
    if int(batch) != batch or batch < 1 or int(n) != n or n < 1:
        raise ValueError(f"batch and n must be whole numbers >= 1, got {batch!r}, {n!r}")
    j = np.arange(int(n))
    return (1 - beta) * beta ** (j // int(batch)) / batch


def table(hparams: dict, from_batch: float, to_batch: float, rule: str) -> str:
    """A before/after table: each setting once, an average's half-life in steps and in
    samples, and for SGD's momentum its step per sample, lr / (1 - m) / batch."""
    after = transfer(hparams, from_batch, to_batch, rule)
    k = to_batch / from_batch
    lines = [
        f"rule {rule}: batch {from_batch:g} -> {to_batch:g} (k = {k:g})",
        f"{'':14}{'before':>14}{'after':>14}",
    ]
    for key in ("lr", "eps", "weight_decay"):
        if key in hparams:
            lines.append(f"{key:14}{hparams[key]:>14.6g}{after[key]:>14.6g}")
    averages = [
        (f"beta{i + 1}", b0, b1)
        for i, (b0, b1) in enumerate(zip(hparams.get("betas", ()), after.get("betas", ())))
    ]
    if "momentum" in hparams:
        averages.append(("momentum", hparams["momentum"], after["momentum"]))
    for name, b0, b1 in averages:
        lines.append(f"{name:14}{b0:>14.6g}{b1:>14.6g}")
        if b0 > 0 and b1 > 0:
            h0, h1 = half_life(b0), half_life(b1)
            lines.append(f"{'  half-life':14}{h0:>11.4g} st{h1:>11.4g} st")
            lines.append(f"{'  in samples':14}{h0 * from_batch:>14.6g}{h1 * to_batch:>14.6g}")
    if "momentum" in hparams and "lr" in hparams:
        per_sample = [
            lr / (1 - m) / b
            for lr, m, b in (
                (hparams["lr"], hparams["momentum"], from_batch),
                (after["lr"], after["momentum"], to_batch),
            )
        ]
        lines.append(f"{'  step/sample':14}{per_sample[0]:>14.6g}{per_sample[1]:>14.6g}")
    if rule == "adam-sqrt" and hparams.get("weight_decay"):
        lines.append(
            f"note: with AdamW's decoupled decay (lr x weight_decay a step) the decay per "
            f"sample changes by 1/sqrt(k) = {1 / math.sqrt(k):.4g}; multiply weight_decay by "
            f"sqrt(k) = {math.sqrt(k):.4g} to keep it"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Transfer hyperparameters to a new batch size.")
    parser.add_argument("--from-batch", type=float, required=True)
    parser.add_argument("--to-batch", type=float, required=True)
    parser.add_argument("--rule", choices=RULES, default="lamb")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--beta1", type=float)
    parser.add_argument("--beta2", type=float)
    parser.add_argument("--eps", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--momentum", type=float)
    args = parser.parse_args(argv)
    hp = {
        k: v
        for k, v in (
            ("lr", args.lr),
            ("eps", args.eps),
            ("weight_decay", args.weight_decay),
            ("momentum", args.momentum),
        )
        if v is not None
    }
    betas = tuple(b for b in (args.beta1, args.beta2) if b is not None)
    if betas:
        hp["betas"] = betas
    try:
        print(table(hp, args.from_batch, args.to_batch, args.rule))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
