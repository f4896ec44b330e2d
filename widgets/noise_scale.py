"""04 the noise scale: decay the learning rate, grow the batch, or both - side by side."""

from __future__ import annotations

import functools
import html

import ipywidgets as W

from lessons import noise as N
from lessons.callbacks import NoiseScale
from lessons.config import TrainConfig, epoch_train_loss
from lessons.profiles import get_profile
from widgets import seeds as S
from widgets.controls import STYLE, log_slider
from widgets.figure import Trace
from widgets.live import LiveRun
from widgets.runs import RunRecord
from widgets.scene import EPOCH_SERIES

REFERENCE = "reference"  # the control's key
REFERENCE_NAME = "no decay"  # its run: base lr and base batch throughout, the noise never drops
SEEDS = 2  # seeds per schedule in the claim: the spread it is stated against


def seeds_of(name: str) -> int:
    """Seeds cost runs: the claim compares decay lr, grow batch and the null run; hybrid once."""
    return 1 if name == "hybrid" else SEEDS


# the first run's settings: a large lr at a base batch well below B_simple, where the noise is
# what limits the loss, so lowering it (by decaying lr or growing the batch) pays at once
DEFAULTS = dict(lr=0.2, batch=32, k=2, milestones=(4, 6), momentum=0.9)
MIN_EPOCHS = 8  # milestones at 4 and 6 leave two epochs at each noise level


def noise_panel(live: LiveRun) -> tuple[list[Trace], str]:
    """The Smith-Le noise scale of each run of the newest request, against epochs."""
    traces = []
    for i, run in enumerate(live.last_group.values()):
        pts = [m for m in run.records if m.kind == "train" and "noise" in m.extras]
        traces.append(
            Trace(
                f"noise:{run.name}",
                [m.epoch for m in pts],
                [m.extras["noise"] for m in pts],
                name=run.name,
                color=run.color,
                dash=("solid", "dash", "dot")[i % 3],
            )
        )
    return traces, "Noise scale g = lr / (1 - m) (N/B - 1)"


def update_counts(live: LiveRun) -> dict[str, int]:
    """Parameter updates each run of the newest request took."""
    return {
        r.name: max((m.step for m in r.records if m.kind == "train"), default=0)
        for r in live.last_group.values()
    }


MOMENTA = (0.0, 0.5, 0.9, 0.99)  # the momenta the summary converts the base batch to


def momentum_batches(batch: int, n: int, momentum: float) -> str:
    """Smith et al.'s B proportional to 1/(1 - m), for the widget's settings: the base batch that
    keeps this noise scale at the same lr under each other momentum."""
    others = [
        f"{m:g}: batch {N.momentum_batch(batch, n, momentum, m):,}"
        for m in MOMENTA
        if m != momentum
    ]
    return (
        f"The same noise scale at this lr with base batch {batch} and momentum {momentum:g} "
        f"needs, at momentum {'; '.join(others)} "
        f"(B proportional to 1/(1 - m) while B << N = {n:,})."
    )


def summary(live: LiveRun, n: int) -> str:
    rows, counts = [], update_counts(live)
    for r in live.last_group.values():
        ev = r.last("eval")
        if ev is None:
            continue
        curve = epoch_train_loss(r.records)
        spread = S.spread(r, "train_loss")
        seeds = f" (seed spread {spread:.3f})" if spread is not None else ""
        rows.append(
            f"<li>{html.escape(r.name)}: {counts[r.name]:,} updates, "
            f"last epoch's train loss {curve[-1]:.3f}{seeds}, "
            f"final val loss {ev.val_loss:.3f}, val accuracy {ev.val_acc:.1%}</li>"
        )
    notice = next(
        (
            m.extras.get("batch_notice")
            for r in live.last_group.values()
            for m in r.records[:1]
            if m.extras.get("batch_notice")
        ),
        None,
    )
    if not rows:
        return ""
    note = f"<br><i>{html.escape(notice)}</i>" if notice else ""
    v = next(iter(live.last_group.values())).settings  # what the shown runs trained with
    batches = html.escape(momentum_batches(int(v["batch"]), n, float(v["momentum"])))
    claim = html.escape(claim_line(live.last_group))
    return f"<ul>{''.join(rows)}</ul>{claim}<br>{batches}{note}"


def claim_line(runs: dict[str, RunRecord]) -> str:
    """Where grow batch and the null run ended against decay lr: the mean over seeds in seed
    spreads of the last epoch's training loss, and seed by seed (seeds.paired_gaps); "" until
    decay lr and another schedule have finished seeds."""
    unit = S.largest_spread(runs, "train_loss")
    decay = runs.get("decay lr")
    if decay is None or decay.status != "done" or not unit:
        return ""
    parts = []
    for name in ("grow batch", REFERENCE_NAME):
        r = runs.get(name)
        if r is None or r.status != "done":
            continue
        gap = S.mean_final(r, "train_loss") - S.mean_final(decay, "train_loss")
        each = ", ".join(f"{g:+.3f}" for g in S.paired_gaps(r, decay, "train_loss"))
        parts.append(
            f"{name} ends {gap:+.3f} from decay lr ({S.in_spreads(gap, unit)}; seed by seed {each})"
        )
    return f"Mean over seeds, last epoch's train loss: {'; '.join(parts)}." if parts else ""


def schedules_live(profile: str | None = None, **kwargs) -> LiveRun:
    """The three schedules of Smith et al. trained side by side, each from ``seeds_of`` seeds;
    with the "reference" box ticked (the default), also the null schedule that keeps the base
    lr and batch, so its noise never drops. ``kwargs`` go to LiveRun (``seeds`` among them)."""
    p = get_profile(profile)
    n_train = p.n_train  # Imagenette's count, or the generated set's
    epochs = max(p.epochs, MIN_EPOCHS)
    d = DEFAULTS
    controls = {
        "k": W.IntSlider(
            value=d["k"], min=2, max=5, description="factor k", continuous_update=False
        ),
        "milestones": W.IntRangeSlider(
            value=d["milestones"],
            min=1,
            max=epochs - 1,
            description="milestones (epochs)",
            continuous_update=False,
            style=STYLE,
        ),
        "momentum": W.SelectionSlider(
            options=[0.0, 0.5, 0.9],
            value=d["momentum"],
            description="momentum",
            continuous_update=False,
        ),
        "lr": log_slider(d["lr"], "base lr", -3, 0),
        "batch": W.SelectionSlider(
            options=[b for b in (16, 32, 64, 128) if b <= n_train // 16],
            value=d["batch"],
            description="base batch",
            continuous_update=False,
            style=STYLE,
        ),
        # the null schedule: what lowering the noise buys at all
        REFERENCE: W.Checkbox(value=True, description="also: no decay, no growth"),
    }

    def make_config(v: dict) -> dict[str, TrainConfig]:
        ms = sorted(set(v["milestones"]))
        plans = N.schedules(float(v["lr"]), int(v["batch"]), n_train, int(v["k"]), ms)
        if v.get(REFERENCE):
            plans[REFERENCE_NAME] = dict(lr=float(v["lr"]), batch=int(v["batch"]))
        return {
            name: TrainConfig.from_profile(
                p.name,
                epochs=epochs,
                momentum=float(v["momentum"]),
                callbacks=[NoiseScale()],
                **o,
            )
            for name, o in plans.items()
        }

    kwargs.setdefault("seeds", seeds_of)
    return LiveRun(
        controls,
        make_config,
        name="04_noise_scale",
        series=EPOCH_SERIES,
        color_roles=lambda name: name,  # a schedule keeps its colour in both panels
        summary=functools.partial(summary, n=n_train),
        x_toggle=[("epochs", "epoch"), ("parameter updates", "step")],
        panel=noise_panel,
        panel_axes=dict(xlabel="epoch", ylabel="noise scale g", ylog=True, height=300),
        title=f"Decay the learning rate or grow the batch ({p.name} profile)",
        **kwargs,
    )
