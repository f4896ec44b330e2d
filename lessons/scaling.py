"""Carrying hyperparameters across batch sizes.

One step at batch b consumes b samples, so a per-step beta is a per-sample discount
beta^(1/b). Keeping the half-life *in samples* when the batch goes from b to b' gives
beta -> beta^(b'/b) (``scale_beta``). ``transfer`` applies a whole rule:

- "lamb": betas -> beta^k, lr -> lr k, weight decay unchanged (LAMB's trust ratio fixes the
  step length, so lambda w only has to stay of the order of m_hat / sqrt(v_hat));
- "adam-sqrt" (Malladi et al. 2022, the square-root scaling rule for Adam): lr -> lr sqrt(k),
  1 - beta -> k (1 - beta), eps -> eps / sqrt(k);
- "sgd-linear": lr -> lr k, momentum kept;
- "invariant-adam" (Wang & Aitchison): lr -> lr k, betas -> beta^k;

with k = to_batch / from_batch. A momentum given with "lamb" or "invariant-adam" is an EMA
coefficient too and is scaled like the betas.

``python -m lessons.scaling --from-batch 256 --to-batch 1 --rule lamb --lr 1e-3 --beta1 0.9
--beta2 0.99 --weight-decay 0.01`` prints the transferred settings with their half-lives.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from lessons.ema import half_life

RULES = ("lamb", "adam-sqrt", "sgd-linear", "invariant-adam")


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


def transfer(hparams: dict, from_batch: float, to_batch: float, rule: str) -> dict:
    """The hyperparameters for ``to_batch`` under ``rule``; the same keys come back."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")
    k = _check_batch("to_batch", to_batch) / _check_batch("from_batch", from_batch)
    known = {"lr", "betas", "eps", "weight_decay", "momentum"}
    unknown = set(hparams) - known
    if unknown:
        raise ValueError(f"unknown hyperparameters {sorted(unknown)}: use {sorted(known)}")
    out = dict(hparams)
    if "betas" in out:
        out["betas"] = tuple(_check_beta(b) for b in out["betas"])
    if "momentum" in out and rule != "sgd-linear":
        _check_beta(out["momentum"])
    if rule in ("lamb", "invariant-adam"):
        if "lr" in out:
            out["lr"] = out["lr"] * k
        if "betas" in out:
            out["betas"] = tuple(b**k for b in out["betas"])
        if "momentum" in out:
            out["momentum"] = out["momentum"] ** k
    elif rule == "adam-sqrt":
        if "lr" in out:
            out["lr"] = out["lr"] * math.sqrt(k)
        if "betas" in out:
            out["betas"] = tuple(_sqrt_rule_beta(b, k) for b in out["betas"])
        if "momentum" in out:
            out["momentum"] = _sqrt_rule_beta(out["momentum"], k)
        if "eps" in out:
            out["eps"] = out["eps"] / math.sqrt(k)
    else:  # sgd-linear
        if "lr" in out:
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


def net_endpoints(x, y, lr: float, width: int = 8, seed: int = 0) -> float:
    """On a small net (LayerNorm, so a sample's output does not depend on its batch): b = len(x)
    SGD steps of batch 1 at ``lr`` against one step of batch b at ``b * lr`` from the same
    start. Returns ||w_steps - w_big|| / ||w_big - w_0||: zero to first order in lr."""
    import torch
    import torch.nn.functional as F

    from lessons.models import make_model

    torch.manual_seed(seed)
    start = make_model(10, width=width, depth=0, norm="layer").double()
    x = x.double()
    b = len(x)

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    w0 = flat(start)
    small = make_model(10, width=width, depth=0, norm="layer").double()
    small.load_state_dict(start.state_dict())
    for i in range(b):
        small.zero_grad()
        F.cross_entropy(small(x[i : i + 1]), y[i : i + 1]).backward()
        with torch.no_grad():
            for p in small.parameters():
                p -= lr * p.grad
    big = make_model(10, width=width, depth=0, norm="layer").double()
    big.load_state_dict(start.state_dict())
    F.cross_entropy(big(x), y).backward()  # the batch-mean gradient
    with torch.no_grad():
        for p in big.parameters():
            p -= b * lr * p.grad
    return float((flat(small) - flat(big)).norm() / (flat(big) - w0).norm())


def table(hparams: dict, from_batch: float, to_batch: float, rule: str) -> str:
    """A before/after table with half-lives in steps and in samples."""
    after = transfer(hparams, from_batch, to_batch, rule)
    lines = [
        f"rule {rule}: batch {from_batch:g} -> {to_batch:g} (k = {to_batch / from_batch:g})",
        f"{'':14}{'before':>14}{'after':>14}",
    ]
    for key in ("lr", "eps", "weight_decay", "momentum"):
        if key in hparams:
            lines.append(f"{key:14}{hparams[key]:>14.6g}{after[key]:>14.6g}")
    betas = list(zip(hparams.get("betas", ()), after.get("betas", ())))
    if "momentum" in hparams and rule != "sgd-linear":
        betas.append((hparams["momentum"], after["momentum"]))
    for i, (b0, b1) in enumerate(betas):
        name = f"beta{i + 1}" if i < len(hparams.get("betas", ())) else "momentum"
        lines.append(f"{name:14}{b0:>14.6g}{b1:>14.6g}")
        h0, h1 = half_life(b0), half_life(b1)
        lines.append(f"{'  half-life':14}{h0:>11.4g} st{h1:>11.4g} st")
        lines.append(f"{'  in samples':14}{h0 * from_batch:>14.6g}{h1 * to_batch:>14.6g}")
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
