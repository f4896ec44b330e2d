"""Measurements a lesson adds to a run's records, passed in ``TrainConfig.callbacks``.

The training loop calls each callback at three points and merges what it returns into the
records' ``extras``: ``start`` into the first training record, ``step`` into every training
record (tensors stay on the device until the loop fetches the losses), ``epoch`` into the
record of each end-of-epoch evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lessons.noise import noise_scale

if TYPE_CHECKING:
    from lessons.train import Run


class Callback:
    """The three hooks, each returning a dict of extras (empty by default)."""

    def start(self, run: Run) -> dict:
        return {}

    def step(self, run: Run, lr: float, batch: int) -> dict:
        return {}

    def epoch(self, run: Run, epoch: int) -> dict:
        return {}


class TrustRatios(Callback):
    """LAMB's per-tensor trust ratios after every step (lesson 3), with the tensors' names."""

    def start(self, run: Run) -> dict:
        return {"trust_names": run.param_names}

    def step(self, run: Run, lr: float, batch: int) -> dict:
        if not hasattr(run.opt, "trust_ratios"):
            return {}
        return {"trust": run.opt.trust_ratios()}


class NoiseScale(Callback):
    """Smith & Le's noise scale of every step, lr/(1-m) (N/B - 1) (lesson 4); momentum counts
    for SGD only."""

    def step(self, run: Run, lr: float, batch: int) -> dict:
        c = run.config
        momentum = c.momentum if c.optimizer == "sgd" else 0.0
        return {"noise": noise_scale(lr, run.dataset.n_train, batch, momentum)}


class EpochEnd(Callback):
    """``fn(model, dataset, epoch) -> dict`` at the end of every epoch, for example a
    measurement on the model as it stands (lessons.measure.noise_probe)."""

    def __init__(self, fn: Callable[..., dict]):
        self.fn = fn

    def epoch(self, run: Run, epoch: int) -> dict:
        return self.fn(run.model, run.dataset, epoch) or {}
