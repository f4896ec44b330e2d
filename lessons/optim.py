"""The optimizers a run can use, by name, and how one is built from plain hyperparameters.

LAMB (``lessons.lamb``) and batch-size-invariant AdamW (``lessons.invariant_adam``) are the
optimizers the lessons open up; SGD, Adam and AdamW are torch's own. A lesson that brings
another optimizer registers its class in OPTIMIZERS: it is built as
``cls(param_groups, lr=..., betas=..., eps=..., **options)``.
"""

from __future__ import annotations

import torch

from lessons.invariant_adam import InvariantAdamW
from lessons.lamb import LAMB_VARIANTS, Lamb

__all__ = [
    "FUSABLE",
    "LAMB_VARIANTS",
    "OPTIMIZERS",
    "InvariantAdamW",
    "Lamb",
    "build_optimizer",
    "param_groups",
]

# name -> optimizer class
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "lamb": Lamb,
    "invariant-adamw": InvariantAdamW,
}

# the classes that take ``fused=True`` (torch's one-kernel-per-group step)
FUSABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only, not on biases and norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    name: str,
    groups,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool = False,
    **options,
) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``groups``: SGD takes momentum and nesterov, the others betas and
    eps; ``options`` (a LAMB variant's) win over both. ``fused`` applies to FUSABLE classes."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    if issubclass(cls, torch.optim.SGD):
        kwargs = dict(momentum=momentum, nesterov=nesterov)
    else:
        kwargs = dict(betas=tuple(betas), eps=eps)
    kwargs |= options
    if fused and issubclass(cls, FUSABLE):
        kwargs["fused"] = True
    return cls(groups, lr=lr, **kwargs)
