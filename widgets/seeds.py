"""Seed spread: the same settings trained from more than one seed, so that a lesson states its
claim against how far apart two seeds land ("the rule's gap is within seed spread, the naive
gap is several spreads away").

A request's run is its *lead*; the same config with the next seeds trains beside it as its
*seed runs* (RunRecord.seed_runs), drawn faintly in the lead's colour. A lesson's summary and
self-checks read the spread from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from statistics import fmean

import numpy as np

from lessons.config import TrainConfig, epoch_train_loss
from widgets.runs import RunRecord

Seeds = int | Callable[[str], int]  # how many seeds: for every run, or by run name


def seed_name(name: str, seed: int) -> str:
    """The request's name for a lead's run with another seed."""
    return f"{name} (seed {seed})".strip()


def expand(
    configs: dict[str, TrainConfig], seeds: Seeds
) -> tuple[dict[str, TrainConfig], dict[str, str]]:
    """Each config followed by its copies with the next seeds; and each copy's lead's name."""
    out: dict[str, TrainConfig] = {}
    lead_of: dict[str, str] = {}
    for name, config in configs.items():
        out[name] = config
        n = seeds(name) if callable(seeds) else seeds
        for k in range(1, max(1, int(n))):
            copy = seed_name(name, config.seed + k)
            out[copy] = replace(config, seed=config.seed + k)
            lead_of[copy] = name
    return out, lead_of


# --------------------------------------------------------------------------- what a run ended at
METRICS = ("train_loss", "val_loss", "val_acc")


def curve(run: RunRecord, metric: str) -> list[float]:
    """A run's "train_loss" per epoch (its mean training loss, epoch_train_loss), or its
    "val_loss" or "val_acc" at each epoch's evaluation."""
    if metric not in METRICS:
        raise ValueError(f"metric must be train_loss, val_loss or val_acc, got {metric!r}")
    if metric == "train_loss":
        return epoch_train_loss(run.records)
    return [getattr(m, metric) for m in run.records if m.kind == "eval"]


def final_value(run: RunRecord, metric: str) -> float | None:
    """Where a run ended: the last point of its ``curve``; None before there is one."""
    points = curve(run, metric)
    return points[-1] if points else None


def finished_seeds(run: RunRecord) -> list[RunRecord]:
    """The lead and those of its seed runs that finished."""
    return [run, *(r for r in run.seed_runs if r.status == "done")]


def finals(run: RunRecord, metric: str) -> list[float]:
    """Where the lead and each of its finished seed runs ended."""
    values = (final_value(r, metric) for r in finished_seeds(run))
    return [v for v in values if v is not None]


def mean_curve(run: RunRecord, metric: str = "train_loss") -> np.ndarray:
    """The run's ``curve``, epoch by epoch, averaged over its finished seeds (as far as the
    shortest reaches)."""
    curves = [curve(r, metric) for r in finished_seeds(run)]
    n = min(len(c) for c in curves)
    return np.mean([c[:n] for c in curves], axis=0)


def mean_final(run: RunRecord, metric: str) -> float:
    """The mean over seeds of where the run ended."""
    return fmean(finals(run, metric))


def spread(run: RunRecord, metric: str) -> float | None:
    """How far apart the seeds of one setting ended (max - min); None with fewer than two."""
    values = finals(run, metric)
    return max(values) - min(values) if len(values) > 1 else None


def largest_spread(runs: dict[str, RunRecord] | list[RunRecord], metric: str) -> float | None:
    """The largest seed spread among runs that trained more than one seed."""
    runs = list(runs.values()) if isinstance(runs, dict) else list(runs)
    spreads = [s for s in (spread(r, metric) for r in runs) if s is not None]
    return max(spreads) if spreads else None


def paired_gaps(a: RunRecord, b: RunRecord, metric: str) -> list[float]:
    """Where ``a`` ended minus where ``b`` ended, seed by seed: lead against lead, the k-th seed
    run against the k-th (as widgets.seeds.expand makes them), where both finished. Two runs of
    one seed start from the same weights and, until their settings part, take the same steps, so
    the gap between them is expected to vary from seed to seed less than where either ends."""
    gaps = []
    for x, y in zip([a, *a.seed_runs], [b, *b.seed_runs]):
        fx, fy = final_value(x, metric), final_value(y, metric)
        if x.status == y.status == "done" and fx is not None and fy is not None:
            gaps.append(fx - fy)
    return gaps


def in_spreads(gap: float, spread_: float | None) -> str:
    """A gap said in seed spreads: "0.4 seed spreads", or "" without a spread."""
    if not spread_:
        return ""
    return f"{abs(gap) / spread_:.1f} seed spreads"
