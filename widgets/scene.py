"""What a LiveRun's figure shows: a trace per run and series, the newest request's runs
bright and the earlier ones faded, each run named once in the legend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lessons.config import epoch_train_loss
from lessons.ema import ema_over_samples
from widgets.figure import Trace
from widgets.legend import EARLIER, Legend, fold, plan
from widgets.runs import RunRecord

FADED = 0.3  # the opacity of earlier requests' runs, relative to the newest
SEED_RUN = 0.45  # the opacity of a run's seed runs (widgets.seeds), relative to the run's
# the smoothed training loss's half-life, in epochs' worth of samples: the same samples for
# every run, whatever its batch (lessons.ema.ema_over_samples)
SMOOTHING_EPOCHS = 0.1


@dataclass(frozen=True)
class Series:
    """One curve drawn for every run. Its points are ``RunRecord.series()[key]``, or
    ``compute(run, view)`` where ``view`` holds the values of the redraw-only controls."""

    key: str
    label: str
    axis: str = "y"  # "y" (left) or "y2" (right)
    mode: str = "lines"  # "lines" | "lines+markers" | "markers"
    dash: str = "solid"  # "solid" | "dash" | "dot"
    compute: Callable | None = None
    opacity: float = 1.0  # relative: a faint raw curve under a smoothed one
    width: float = 1.0  # relative line width


def _train_points(run: RunRecord) -> list:
    return [r for r in run.records if r.kind == "train"]


def raw_loss(run: RunRecord, view: dict) -> tuple[list, list]:
    """Every step's training loss, against the view's x axis."""
    return run.series(view.get("x", "samples"))["loss"]


def smoothed_loss(run: RunRecord, view: dict) -> tuple[list, list]:
    """The training loss as a bias-corrected EMA with a half-life of SMOOTHING_EPOCHS of an
    epoch's samples, so that curves are compared, not the noise of single steps."""
    pts = _train_points(run)
    if not pts:
        return [], []
    per_epoch = pts[-1].samples / pts[-1].epoch
    losses, batches = [r.loss for r in pts], [r.batch for r in pts]
    ys = ema_over_samples(losses, batches, SMOOTHING_EPOCHS * per_epoch)
    return [getattr(r, view.get("x", "samples")) for r in pts], ys.tolist()


def epoch_mean_loss(run: RunRecord, view: dict) -> tuple[list, list]:
    """The mean training loss of each epoch, per sample (lessons.config.epoch_train_loss), at
    the epoch's last step: the curve to compare where a lesson compares epochs."""
    pts = _train_points(run)
    last = {r.epoch_index: r for r in pts}  # each epoch's last step
    x = view.get("x", "samples")
    return [getattr(r, x) for _, r in sorted(last.items())], epoch_train_loss(pts)


RAW_LOSS = Series("loss_raw", "raw loss", compute=raw_loss, opacity=0.25, width=0.5)
VAL_SERIES = (
    Series("val_loss", "val loss", mode="lines+markers", dash="dash"),
    Series("val_acc", "val accuracy", axis="y2", mode="lines+markers", dash="dot"),
)
# the faint raw loss under the smoothed one, and the validation numbers
DEFAULT_SERIES = (
    RAW_LOSS,
    Series("loss", "train loss, smoothed", compute=smoothed_loss),
    *VAL_SERIES,
)
# where a lesson compares epochs: each epoch's mean loss over the raw loss
EPOCH_SERIES = (
    RAW_LOSS,
    Series("loss", "train loss, epoch mean", mode="lines+markers", compute=epoch_mean_loss),
    *VAL_SERIES,
)


def run_traces(
    runs: Sequence[RunRecord],
    series: Sequence[Series],
    view: dict,
    line_width: float = 1.0,
    legend: Legend | None = None,
) -> list[Trace]:
    """A trace per run and series; ``view["x"]`` picks the x axis (samples by default).
    ``legend`` (widgets.legend.plan of ``runs`` by default) names each run in the legend and
    orders its entries; the older requests' runs fold into one entry (widgets.legend.fold);
    a run identical to an earlier one is drawn dash-dotted over it; the hover text keeps each run's
    whole label."""
    legend = legend or plan(runs)
    traces, owners, entries = [], [], set()  # each trace's run id; the runs with an entry
    # the legend names a run once, on its most prominent curve
    lead = next((s for s in series if s.opacity >= 1), series[0])
    newest = max((r.group for r in runs if not r.replayed), default=None)
    for run in runs:
        active = run.group == newest and not run.replayed
        data = run.series(view.get("x", "samples"))  # samples, step or epoch
        seed_run = run.lead is not None
        name = legend.short.get((run.lead or run).id, run.display_label)
        for s in series:
            if seed_run and s.opacity < 1:
                continue  # a seed run: its main curves only, faint, without a legend entry
            xs, ys = s.compute(run, view) if s.compute else data.get(s.key, ([], []))
            first = s is lead and not seed_run
            faint = (SEED_RUN if seed_run else 1.0) * (1.0 if active else FADED)
            # a run identical to an earlier one: its main curve dash-dotted, so both show
            dash = "dashdot" if first and run.id in legend.twins and s.dash == "solid" else s.dash
            traces.append(
                Trace(
                    uid=f"{run.id}:{s.key}",
                    x=xs,
                    y=ys,
                    name=name if first else f"{name} {s.label}",
                    mode=s.mode,
                    dash=dash,
                    color=run.color,
                    opacity=s.opacity * faint,
                    width=s.width * (2.5 if active and not seed_run else 1.5) * line_width,
                    axis=s.axis,
                    showlegend=first and bool(xs),  # no entry for a curve not drawn
                    group=str((run.lead or run).id),  # a seed run toggles with its lead
                    rank=legend.rank.get(run.id),
                    hover=run.display_label + ("" if first else f" {s.label}"),
                )
            )
            owners.append(run.id)
            if traces[-1].showlegend:
                entries.add(run.id)
    fold(legend, runs, entries)
    for t, owner in zip(traces, owners):
        if owner in legend.folded:
            t.showlegend, t.group = False, EARLIER  # drawn, toggled with the EARLIER entry
    return traces + earlier_entry(sum(i in legend.folded for i in entries), legend, line_width)


def earlier_entry(n: int, legend: Legend, line_width: float) -> list[Trace]:
    """One legend entry, "earlier runs (N)", for the ``n`` folded runs drawn: their curves
    stay, faded, and toggle together (a grey sample line, no points of its own)."""
    if not n:
        return []
    return [
        Trace(
            uid=EARLIER,
            x=[None],
            y=[None],
            name=f"{EARLIER} ({n})",
            color="#999999",
            opacity=FADED * 2,
            width=1.5 * line_width,
            group=EARLIER,
            rank=max(legend.rank.values()) + 1,
        )
    ]
