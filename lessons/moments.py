"""What the Adam-like optimizers here share: argument checks and the moment state."""

from __future__ import annotations

import math

import torch


def check_adam_args(lr, betas, eps, weight_decay) -> None:
    """The arguments every Adam-like optimizer here shares; a ValueError names the bad one."""
    if not (isinstance(lr, float | int) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def advance_moments(opt: torch.optim.Optimizer, params: list) -> tuple[list, list, list]:
    """For a step of ``params``: their states, each step count advanced by one (the moments
    made, zero, at the first step), and the lists of first and second moments."""
    states = [opt.state[p] for p in params]
    for p, state in zip(params, states):
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
    return states, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
