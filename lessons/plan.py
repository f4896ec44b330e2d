"""A run's plan: the batch size and number of steps of every epoch, and the learning rate of
every step, fixed before the first step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lessons.config import TrainConfig


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    batch: int
    steps_per_epoch: int  # a whole epoch's steps at this batch
    steps: int  # the steps taken (fewer in a fractional last epoch)


@dataclass(frozen=True)
class Plan:
    epochs: tuple[EpochPlan, ...]
    total: int  # steps in the whole run (at most config.max_steps)
    notice: str | None  # why a scheduled batch was capped, or None

    def lr(self, c: TrainConfig, epoch: int, step: int) -> float:
        """The learning rate of ``step`` (counted over the run), which lies in ``epoch``."""
        base = c.lr_at(epoch) if c.lr_at is not None else c.lr
        return base * lr_multiplier(c, step, self.total)


def scheduled_batch(c: TrainConfig, epoch: int) -> int:
    return int(c.batch_at(epoch)) if c.batch_at is not None else int(c.batch)


def make_plan(c: TrainConfig, n: int) -> Plan:
    """The plan of run ``c`` over ``n`` training images. A scheduled batch larger than the data
    set is capped at its size; a fractional last epoch takes that fraction of its steps."""
    epochs, epoch, left = [], 0, float(c.epochs)
    while left > 1e-12:
        batch = min(scheduled_batch(c, epoch), n)
        if batch < 1:
            raise ValueError(f"the batch schedule gave {batch} for epoch {epoch}: need >= 1")
        per_epoch = n // batch
        epochs.append(EpochPlan(epoch, batch, per_epoch, math.ceil(min(1.0, left) * per_epoch)))
        epoch, left = epoch + 1, left - 1
    total = sum(e.steps for e in epochs)
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    capped = [e.epoch for e in epochs if e.batch < scheduled_batch(c, e.epoch)]
    notice = None
    if capped:
        notice = (
            f"the batch schedule asked for more than the {n:,} training "
            f"images in epoch(s) {capped}: capped at {n:,}"
        )
    return Plan(tuple(epochs), total, notice)


def lr_multiplier(c: TrainConfig, step: int, total: int) -> float:
    """The schedule's factor at ``step``: 1, or onecycle's linear warm-up then cosine decay."""
    if c.schedule == "constant":
        return 1.0
    warm = max(1, int(c.warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
