"""The matplotlib renderer: Agg (no pyplot) drawn into an ipywidgets Image as a PNG."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import ipywidgets as W

from lessons import data as data_mod
from widgets.figure import LOG_SUBS, Mark, Trace, legend_rows, log_ticks, wrap_title

DASHES = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}


def row_major(items: list, ncol: int) -> list:
    """``items`` reordered so that matplotlib's legend, which fills its columns top to bottom
    (``np.array_split`` into ``ncol`` columns), reads them left to right, row by row: the
    newest runs along the first row, as plotly's horizontal legend shows them."""
    rows = math.ceil(len(items) / ncol) if items else 0
    full = len(items) - (rows - 1) * ncol  # the columns that reach the last row
    columns = [range(c, len(items), ncol)[: rows if c < full else rows - 1] for c in range(ncol)]
    return [items[i] for column in columns for i in column]


class MatplotlibFigure:
    """matplotlib into an ipywidgets Image: works wherever core widgets do (Colab)."""

    min_interval = 0.25
    max_interval = 1.0

    def __init__(
        self,
        xlabel: str,
        ylabel: str,
        y2label: str | None = None,
        y2range: tuple | None = (0, 1),
        height: int = 420,
        ylog: bool = False,
        xlog: bool = False,
    ):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(8.5, height / 100), dpi=90, layout="constrained")
        self.height = height  # without a legend: each legend row adds a line
        FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_subplot()
        self.ax2 = self.ax.twinx() if y2label is not None else None
        self.labels = (xlabel, ylabel, y2label)
        self.y2range = y2range
        self.ylog = ylog
        self.xlog = xlog
        self.widget = W.Image(format="png", layout=W.Layout(width="100%", max_width="900px"))
        self._traces: list[dict] = []
        self._entries: list[tuple] = []
        self._marks: list[dict] = []
        self._title = ""
        self.yrange: tuple | None = None  # the left axis' range; None: fit the data
        self.scale = 1.0  # presenter mode: larger fonts (lines are scaled by LiveRun)

    def set_yrange(self, yrange: tuple[float, float] | None) -> None:
        self.yrange = yrange  # used by the next draw

    def set_scale(self, scale: float) -> None:
        self.scale = scale  # used by the next draw

    def draw(self, traces: Sequence[Trace], title: str = "", marks: Sequence[Mark] = ()) -> None:
        fs = 9 * self.scale  # base font size
        self.ax.clear()
        if self.ax2 is not None:
            self.ax2.clear()
        self._plot(traces)
        self._draw_marks(marks, fs)
        self._label_axes(traces, fs)
        if self.yrange is not None:
            self.ax.set_ylim(*self.yrange)
        # the axes take about 85% of the figure's width; points are 1/72 inch
        width = 0.85 * self.fig.get_figwidth() * self.fig.dpi
        self.ax.set_title(
            wrap_title(title, width, (fs + 1) * self.fig.dpi / 72),
            fontsize=fs + 1,
            pad=(3.2 * fs if marks else 6 * self.scale),
        )
        self._title = title
        self.ax.grid(alpha=0.3)
        rows = self._legend(any(t.showlegend for t in traces), fs)
        # the figure grows by the legend's rows, so that the plot keeps its height
        self.fig.set_figheight(self.height / 100 + rows * 1.45 * (fs - 1) / 72)
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        self.widget.value = buf.getvalue()

    def _plot(self, traces: Sequence[Trace]) -> None:
        self._traces = []
        self._entries = []  # (rank, handle, name) of each trace with a legend entry
        for t in traces:
            target = self.ax2 if t.axis == "y2" and self.ax2 is not None else self.ax
            label = t.name if t.showlegend else None
            if t.kind == "bar":
                handle = target.bar(t.x, t.y, color=t.color, alpha=t.opacity, label=label)
            else:
                (handle,) = target.plot(
                    t.x,
                    t.y,
                    color=t.color,
                    alpha=t.opacity,
                    lw=t.width * 0.8,
                    linestyle=DASHES[t.dash] if "lines" in t.mode else "none",
                    marker="o" if "markers" in t.mode else None,
                    markersize=3,
                    label=label,
                )
            if label and not label.startswith("_"):  # as matplotlib's own legend
                self._entries.append((1000 if t.rank is None else 1 + t.rank, handle, label))
            self._traces.append(
                {"uid": t.uid, "name": t.name, "points": len(t.x), "opacity": t.opacity}
            )

    def _draw_marks(self, marks: Sequence[Mark], fs: float) -> None:
        for i, m in enumerate(marks):
            self.ax.axvline(m.x, color=m.color, linestyle=DASHES.get(m.dash, "--"), lw=1)
            self.ax.annotate(
                m.label,
                (m.x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 1.5 * (fs - 1) * (i % 2)),  # close marks: alternate rows
                textcoords="offset points",
                fontsize=fs - 1,
                color=m.color,
                ha="right" if m.side == "left" else "center",
                va="bottom",
            )
        self._marks = [{"x": m.x, "label": m.label} for m in marks]

    def _label_axes(self, traces: Sequence[Trace], fs: float) -> None:
        ax, ax2 = self.ax, self.ax2
        ax.set_xlabel(self.labels[0], fontsize=fs)
        ax.set_ylabel(self.labels[1], fontsize=fs)
        ax.tick_params(labelsize=fs - 1)
        if self.ylog and traces:
            ys = [y for t in traces if t.axis == "y" for y in t.y]
            _log_axis(ax.yaxis, ax.set_yscale, ys)
        if self.xlog and traces:
            _log_axis(ax.xaxis, ax.set_xscale, [x for t in traces for x in t.x])
        if ax2 is not None:
            ax2.yaxis.tick_right()  # clear() moves a twin axis back to the left
            ax2.yaxis.set_label_position("right")
            ax2.set_ylabel(self.labels[2], fontsize=fs)
            ax2.tick_params(labelsize=fs - 1)
            if self.y2range:
                ax2.set_ylim(*self.y2range)

    def _legend(self, shown: bool, fs: float) -> int:
        """The legend under the plot, as plotly's (inside it, it covered the curves); its rows."""
        for old in list(self.fig.legends):
            old.remove()
        if not shown:
            return 0
        # ordered by rank (the newest request's runs first), else as drawn
        entries = sorted(self._entries, key=lambda e: e[0])
        handles, labels = [e[1] for e in entries], [e[2] for e in entries]
        if not labels:  # only unnamed curves: matplotlib leaves them out of a legend
            return 0
        rows = max(1, legend_rows(labels, self.scale, width=720))
        ncol = math.ceil(len(labels) / rows)
        self.fig.legend(
            row_major(handles, ncol),
            row_major(labels, ncol),
            loc="outside lower center",
            ncol=ncol,
            fontsize=fs - 1,
            frameon=False,
        )
        return rows

    def font_size(self) -> float:
        return self.ax.title.get_fontsize()

    def write_png(self, path: Path, dpi: int = 150) -> None:
        data_mod.atomic_write(path, lambda f: self.fig.savefig(f, format="png", dpi=dpi))

    def traces(self) -> list[dict]:
        return list(self._traces)

    def set_xlabel(self, text: str) -> None:
        self.labels = (text, *self.labels[1:])  # used by the next draw

    def xlabel(self) -> str:
        return self.labels[0]

    def marks(self) -> list[dict]:
        return list(self._marks)

    def title(self) -> str:
        return self._title


def _log_axis(axis, set_scale, values: list) -> None:
    """A log scale whose labelled ticks are figure.log_ticks' values, each in full (20, not
    2 x 10^1); the other digits' ticks stay, unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    set_scale("log")
    axis.set_major_locator(LogLocator(subs=LOG_SUBS[log_ticks(values)]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(LogLocator(subs=LOG_SUBS["digits"]))
    axis.set_minor_formatter(NullFormatter())
