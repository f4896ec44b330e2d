"""What a LiveRun's figure shows: a trace per run and series, the newest request's runs
bright and the earlier ones faded, each run named once in the legend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from widgets.figure import Trace
from widgets.runs import RunRecord

FADED = 0.3  # the opacity of earlier requests' runs, relative to the newest


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


DEFAULT_SERIES = (
    Series("loss", "train loss"),
    Series("val_loss", "val loss", mode="lines+markers", dash="dash"),
    Series("val_acc", "val accuracy", axis="y2", mode="lines+markers", dash="dot"),
)


def run_traces(
    runs: Sequence[RunRecord], series: Sequence[Series], view: dict, line_width: float = 1.0
) -> list[Trace]:
    """A trace per run and series; ``view["x"]`` picks the x axis (samples by default)."""
    traces = []
    # the legend names a run once, on its most prominent curve
    lead = next((s for s in series if s.opacity >= 1), series[0])
    newest = max((r.group for r in runs if not r.replayed), default=None)
    for run in runs:
        active = run.group == newest and not run.replayed
        data = run.series(view.get("x", "samples"))  # samples, step or epoch
        for s in series:
            xs, ys = s.compute(run, view) if s.compute else data.get(s.key, ([], []))
            first = s is lead
            traces.append(
                Trace(
                    uid=f"{run.id}:{s.key}",
                    x=xs,
                    y=ys,
                    name=run.display_label if first else f"{run.display_label} {s.label}",
                    mode=s.mode,
                    dash=s.dash,
                    color=run.color,
                    opacity=s.opacity * (1.0 if active else FADED),
                    width=s.width * (2.5 if active else 1.5) * line_width,
                    axis=s.axis,
                    showlegend=first,
                    group=str(run.id),
                )
            )
    return traces
