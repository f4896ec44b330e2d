"""Lesson 3's measurements on a run's records: how far each step moved every tensor relative
to its norm, where LAMB's trust cap bound."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from lessons.callbacks import Callback
from lessons.config import epoch_train_loss
from widgets.runs import RunRecord


class StepSizes(Callback):
    """Each tensor's step relative to its norm, ||w_t - w_(t-1)|| / ||w_(t-1)||, from the
    second step on (key "rel_step", in the optimizer's parameter order), and the trust cap the
    optimizer ran with (key "trust_cap": None for none, or an optimizer without one)."""

    def __init__(self):
        self._before: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # opt -> weights

    def start(self, run) -> dict:
        groups = run.opt.param_groups
        # timm's adapt_only_decayed: tensors without decay take ratio 1, not a capped ratio
        adapted = [
            not (g.get("adapt_only_decayed") and not g["weight_decay"])
            for g in groups
            for _ in g["params"]
        ]
        decay = [g["weight_decay"] for g in groups for _ in g["params"]]
        return {
            "trust_cap": groups[0].get("trust_clip"),
            "trust_adapted": adapted,
            "weight_decay": decay,
        }

    @torch.no_grad()
    def step(self, run, lr: float, batch: int) -> dict:
        params = [p for g in run.opt.param_groups for p in g["params"]]
        before = self._before.get(run.opt)
        if before is None:
            self._before[run.opt] = [p.detach().clone() for p in params]
            return {}
        moved = torch.stack(torch._foreach_norm(torch._foreach_sub(params, before)))
        size = torch.stack(torch._foreach_norm(before)).clamp_min(1e-12)
        torch._foreach_copy_(before, params)
        return {"rel_step": moved / size}


def trust_series(run: RunRecord) -> tuple[list, np.ndarray, list[str], float | None]:
    """A run's training records with trust ratios, the ratios (step x tensor; NaN where the
    optimizer left a tensor unscaled), the tensors' names and the trust cap it ran with."""
    pts = [m for m in run.records if m.kind == "train" and "trust" in m.extras]
    first = next((m.extras for m in run.records if "trust_names" in m.extras), {})
    trust = np.array([m.extras["trust"] for m in pts]) if pts else np.zeros((0, 0))
    names = first.get("trust_names", [])
    if pts and "trust_adapted" in first:  # ratios the optimizer did not compute: never capped
        trust = np.where(first["trust_adapted"], trust, np.nan)
    return pts, trust, names, first.get("trust_cap")


def cap_binding(run: RunRecord) -> list[dict]:
    """The tensors on which the trust cap bound: name, weight decay, the steps it bound, the
    first of them, and the tensor's mean step relative to ||w|| on those steps, per unit of lr
    (1 would be an uncapped LAMB step). Empty where there was no cap or it never bound."""
    pts, trust, names, cap = trust_series(run)
    if cap is None or not pts:
        return []
    at_cap = trust >= cap * (1 - 1e-4)
    first = next((m.extras for m in run.records if "trust_names" in m.extras), {})
    decays = first.get("weight_decay", [None] * len(names))  # runs logged before it had none
    out = []
    for i, name in enumerate(names):
        capped = [m for m, c in zip(pts, at_cap[:, i]) if c]
        if not capped:
            continue
        moved = [m.extras["rel_step"][i] / m.lr for m in capped if "rel_step" in m.extras]
        out.append(
            dict(
                name=name,
                decay=decays[i],
                steps=len(capped),
                of=len(pts),
                first=capped[0].step,
                moved=float(np.mean(moved)) if moved else float("nan"),
            )
        )
    return out


def tensor_kind(name: str, decay: float) -> str:
    """ "biases", "norm scales" (weights without decay) or "kernels" (conv and head)."""
    if name.endswith("bias"):
        return "biases"
    return "kernels" if decay else "norm scales"


def relative_steps(run: RunRecord) -> dict[str, float]:
    """Each tensor's median step relative to its norm, per unit of lr, over the run."""
    pts = [m for m in run.records if m.kind == "train" and "rel_step" in m.extras]
    names = next((m.extras["trust_names"] for m in run.records if "trust_names" in m.extras), [])
    if not pts or not names:
        return {}
    rel = np.array([np.array(m.extras["rel_step"]) / m.lr for m in pts])
    return dict(zip(names, np.median(rel, axis=0).tolist(), strict=True))


def end_loss(records) -> float:
    """The mean training loss of a run's last epoch (per sample)."""
    return epoch_train_loss(records)[-1]
