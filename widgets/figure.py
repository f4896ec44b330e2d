"""What every renderer draws, and how one is chosen.

A figure takes a list of Trace (one curve or bar series each), a title and a list of Mark
(labelled vertical lines) and redraws itself from them. Two renderers implement the Figure
interface below: plotly's FigureWidget (widgets.plotly_figure, JupyterLab) and matplotlib drawn
off-screen into an ipywidgets Image (widgets.mpl_figure, Colab or wherever the plotly front end
is missing). LESSONS_PLOT=plotly|matplotlib picks one; otherwise matplotlib on Colab, plotly
elsewhere.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]


@dataclass
class Trace:
    """One curve or bar series, identified by ``uid`` across redraws."""

    uid: str
    x: list
    y: list
    name: str = ""
    kind: str = "line"  # "line" | "bar"
    mode: str = "lines"  # "lines" | "lines+markers" | "markers"
    dash: str = "solid"  # "solid" | "dash" | "dot" | "dashdot"
    color: str | None = None
    opacity: float = 1.0
    width: float = 2.0
    axis: str = "y"  # "y" (left) or "y2" (right)
    showlegend: bool = True
    group: str | None = None
    rank: int | None = None  # legend order: lower first; None after every ranked entry
    hover: str = ""  # the hover text, where it says more than the name (plotly)


@dataclass(frozen=True)
class Mark:
    """A labelled vertical line, such as a half-life or an effective window."""

    x: float
    label: str
    color: str = "#555555"
    dash: str = "dash"
    side: str = "center"  # where the label sits: "center" over the line, "left" ending at it


class Figure(Protocol):
    """What LiveRun and the lessons ask of a renderer.

    Made with (xlabel, ylabel, y2label=None, y2range=(0, 1), height=420, ylog=False,
    xlog=False).
    ``min_interval``/``max_interval``: seconds between redraws while a run streams in (see
    LiveRun.redraw_interval); ``scale``: the presenter scale set by set_scale."""

    widget: Any  # the ipywidget to display
    min_interval: float
    max_interval: float
    scale: float

    def draw(self, traces: Sequence[Trace], title: str = "", marks: Sequence[Mark] = ()) -> None:
        """Show exactly these traces, this title (lines after the first: a subtitle) and marks."""

    def traces(self) -> list[dict]:
        """What is drawn: {"uid", "name", "points", "opacity"} per trace."""

    def marks(self) -> list[dict]:
        """What is drawn: {"x", "label"} per mark."""

    def title(self) -> str: ...

    def set_xlabel(self, text: str) -> None: ...

    def xlabel(self) -> str: ...

    def set_scale(self, scale: float) -> None:
        """Presenter mode: fonts ``scale`` times larger (line widths come with the traces)."""

    def set_yrange(self, yrange: tuple[float, float] | None) -> None:
        """Fix the left axis' range from the next draw on (None: fit the data)."""

    def font_size(self) -> float: ...


def shared_yrange(*trace_lists: Sequence[Trace], pad: float = 0.05) -> tuple | None:
    """One range of the left axis that holds every finite point of these traces, padded:
    panels compared side by side then read on the same scale. None without points."""
    ys = [
        y
        for traces in trace_lists
        for t in traces
        if t.axis == "y"
        for y in t.y
        if y is not None and math.isfinite(y)
    ]
    if not ys:
        return None
    lo, hi = min(ys), max(ys)
    margin = pad * (hi - lo or abs(hi) or 1.0)
    return lo - margin, hi + margin


def legend_rows(names: Sequence[str], scale: float = 1.0, width: float = 640.0) -> int:
    """How many rows a horizontal legend of these entries fills in ``width`` px: about 6.5 px
    a character of its 12 px font and 40 px for the line's sample, packed as plotly does."""
    rows, used = 0, width
    for name in names:
        w = (40 + 6.5 * len(name)) * scale
        if used + w > width:
            rows, used = rows + 1, 0.0
        used += w
    return rows


# a title character's mean width, in units of its font size (sans-serif, mixed case)
CHAR_WIDTH = 0.55


def wrap_title(title: str, width_px: float, font_px: float) -> str:
    """The title with each of its lines broken at spaces to fit ``width_px`` at ``font_px``:
    a long title, or a presenter's larger font, wraps instead of running off the right edge."""
    chars = max(20, int(width_px / (CHAR_WIDTH * font_px)))
    return "\n".join(
        "\n".join(textwrap.wrap(line, chars, break_on_hyphens=False) or [""])
        for line in title.split("\n")
    )


LOG_SUBS = {"digits": tuple(range(1, 10)), "1-2-5": (1, 2, 5), "decades": (1,)}


def log_ticks(values: Sequence) -> str:
    """Which values a log axis labels, by the decades its positive values span: every digit
    x 10^n within one decade, 1-2-5 x 10^n within three, powers of ten beyond (a key of
    LOG_SUBS). The renderers label each with its full value: 20, 30, 600, not 2, 3, 6."""
    vals = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    decades = math.log10(max(vals) / min(vals)) if vals else 1.0
    return "digits" if decades < 1 else "1-2-5" if decades <= 3 else "decades"


def _on_colab() -> bool:
    return "google.colab" in sys.modules


def in_kernel() -> bool:
    """Inside a Jupyter kernel, where widgets have a front end to report to."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return getattr(shell, "kernel", None) is not None


def choose_renderer(kind: str | None = None) -> str:
    """ "plotly" or "matplotlib": ``kind``, else LESSONS_PLOT, else what this front end shows."""
    kind = kind or os.environ.get("LESSONS_PLOT") or ""
    if kind and kind not in ("plotly", "matplotlib"):
        raise ValueError(f"LESSONS_PLOT must be 'plotly' or 'matplotlib', got {kind!r}")
    if kind:
        return kind
    if _on_colab():
        return "matplotlib"
    try:
        import anywidget  # noqa: F401  (plotly >= 6 FigureWidget needs it)
        import plotly.graph_objects  # noqa: F401
    except ImportError:
        return "matplotlib"
    return "plotly"


def make_figure(renderer: str | None = None, **kwargs) -> Figure:
    """A figure of the chosen renderer (see choose_renderer); kwargs as Figure says."""
    if choose_renderer(renderer) == "plotly":
        from widgets.plotly_figure import PlotlyFigure

        return PlotlyFigure(**kwargs)
    from widgets.mpl_figure import MatplotlibFigure

    return MatplotlibFigure(**kwargs)
