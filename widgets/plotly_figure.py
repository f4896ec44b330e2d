"""The plotly renderer: a FigureWidget redrawn in one batch_update per draw()."""

from __future__ import annotations

import copy
import html
import time
from collections.abc import Sequence
from pathlib import Path

from lessons import data as data_mod
from widgets.figure import Mark, Trace, legend_rows, log_ticks, wrap_title


class PlotlyFigure:
    """A plotly FigureWidget; each draw() is one batch_update that touches only what changed."""

    # seconds between redraws while a run streams in (LiveRun.redraw_interval): each redraw
    # costs the browser a re-render, so a long run is redrawn less often (BENCHMARKS.md)
    min_interval = 0.1
    max_interval = 0.5
    # the top margin: the title hangs TITLE_PAD px below the figure's top edge (1.2x its
    # font high), plotly's subtitle (the data set) SUBTITLE_GAP px under it, then a gap and a
    # MARK_ROW for each row of mark labels (two rows at most; all but the pad grow with the
    # presenter scale), and never less than TOP
    TOP = 50
    TITLE_PAD = 10
    SUBTITLE_GAP = 17
    MARK_ROW = 20
    LEGEND_ROW = 19  # px a row of the horizontal legend takes (12 px font)
    WIDTH = 640  # px the figure is taken to have for wrapping its title (it fills the cell)
    # a log axis' ticks (figure.log_ticks) as plotly's dtick; tickformat labels each in full
    DTICK = {"digits": "D1", "1-2-5": "D2", "decades": 1}

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
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        self._go = go
        base = make_subplots(specs=[[{"secondary_y": y2label is not None}]])
        self.fig = go.FigureWidget(base)
        self.fig.update_layout(
            height=height,
            margin=dict(l=60, r=60, t=self.TOP, b=50),
            title=dict(
                yref="container",
                y=1,
                yanchor="top",
                pad=dict(t=self.TITLE_PAD),
                font=dict(size=16),
                subtitle=dict(font=dict(size=12)),
            ),
            # pinned to the figure's bottom edge, under the x axis' title whatever its rows
            legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
            template="plotly_white",
            barmode="overlay",
        )
        self.fig.update_xaxes(title_text=xlabel, type="log" if xlog else "linear")
        self.fig.update_yaxes(
            title_text=ylabel, secondary_y=False, type="log" if ylog else "linear"
        )
        if y2label is not None:
            self.fig.update_yaxes(
                title_text=y2label,
                secondary_y=True,
                range=y2range,
                showgrid=False,
                **(dict(tickmode="linear", tick0=0, dtick=0.2) if y2range == (0, 1) else {}),
            )
        self.widget = self.fig
        self.log_axes = {"x": xlog, "y": ylog}
        self._ticks: dict[str, str] = {}  # the log_ticks each log axis was last given
        self.height = height  # with a legend of one row; each further row adds LEGEND_ROW
        self._sent: dict[str, tuple] = {}
        self._marks: tuple = ()
        self._title = ""
        self._yrange: tuple | None = None
        self._laid_out: tuple | None = None  # the marks the top margin was last sized for
        self.last_draw = 0.0  # perf_counter of the last draw(): see deaf()
        self.scale = 1.0  # presenter mode: larger fonts (lines are scaled by LiveRun)

    def set_yrange(self, yrange: tuple[float, float] | None) -> None:
        if yrange != self._yrange:
            self._yrange = yrange
            rng = list(yrange) if yrange else None
            self.fig.update_yaxes(range=rng, autorange=yrange is None, secondary_y=False)

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        with self.fig.batch_update():
            self.fig.layout.font.size = round(12 * scale)
            self.fig.layout.title.font.size = round(16 * scale)
            self.fig.layout.title.subtitle.font.size = round(12 * scale)
        self._marks = ()  # mark labels are redrawn at the new size
        self._laid_out = None  # and the title's margin is sized again

    def deaf(self, quiet: float = 4.5) -> bool:
        """Whether the browser has neither counted a view of this figure nor applied any of
        its updates ``quiet`` seconds after the last draw (ask only of a displayed figure).
        anywidget drops every message to a model whose ES module loaded too slowly: the view
        keeps the figure as it was made, empty, and no acknowledgement reaches the kernel."""
        fig = self.fig
        return (
            getattr(fig, "_view_count", None) == 0
            and fig._trace_edit_in_process
            and time.perf_counter() - self.last_draw >= quiet
        )

    def rebuilt(self) -> PlotlyFigure:
        """The same figure as a new widget, whose first state (not a message) carries every
        trace: what a deaf view is replaced with."""
        new = copy.copy(self)
        new.fig = new.widget = self._go.FigureWidget(self.fig)
        new.fig._view_count = 0  # count the new widget's views, as LiveRun does (deaf())
        new._sent = dict(self._sent)
        return new

    def draw(self, traces: Sequence[Trace], title: str = "", marks: Sequence[Mark] = ()) -> None:
        self.last_draw = time.perf_counter()
        marks = tuple(marks)
        with self.fig.batch_update():
            self._sync_traces(traces)
            self._set_log_ticks(traces)
            if marks != self._marks:
                self._draw_marks(marks)
            if title != self._title or marks != self._laid_out:
                self._lay_out_title(title, marks)
            # the figure grows by the legend's rows, so that the plot keeps its height
            rows = legend_rows([t.name for t in traces if t.showlegend], self.scale)
            height = self.height + round(max(0, rows - 1) * self.LEGEND_ROW * self.scale)
            if self.fig.layout.height != height:
                self.fig.layout.height = height

    def _sync_traces(self, traces: Sequence[Trace]) -> None:
        """Add, update or drop traces so the figure shows ``traces``, sending only changes."""
        fig = self.fig
        # a trace whose kind changed (bars <-> line) is replaced, not updated
        wanted = {t.uid for t in traces}
        kinds = {t.uid: "bar" if t.kind == "bar" else "scatter" for t in traces}
        if any(t.meta not in wanted or t.type != kinds[t.meta] for t in fig.data):
            wanted = {t.meta for t in fig.data if t.meta in wanted and t.type == kinds[t.meta]}
            fig.data = tuple(t for t in fig.data if t.meta in wanted)
            self._sent = {k: v for k, v in self._sent.items() if k in wanted}
        have = {t.meta: t for t in fig.data}
        for spec in traces:
            xs, ys = list(spec.x), list(spec.y)  # lists: Colab misreads numpy arrays
            trace = have.get(spec.uid)
            if trace is None:
                self._add_trace(spec, xs, ys)
                continue
            if self._sent.get(spec.uid) != (xs, ys):
                trace.x, trace.y = xs, ys
                self._sent[spec.uid] = (xs, ys)
            if trace.opacity != spec.opacity:
                trace.opacity = spec.opacity
            # a run's legend text, entry and order change as newer requests come
            for key, value in _legend_props(spec).items():
                if trace[key] != value:
                    trace[key] = value
            if spec.kind != "bar" and trace.line.width != spec.width:
                trace.line.width = spec.width

    def _set_log_ticks(self, traces: Sequence[Trace]) -> None:
        """Each log axis labels the ticks log_ticks picks for the drawn values, in full."""
        for axis, log in self.log_axes.items():
            if not log:
                continue
            values = [v for t in traces if axis == "x" or t.axis == "y" for v in getattr(t, axis)]
            ticks = log_ticks(values)
            if self._ticks.get(axis) != ticks:
                update = self.fig.update_xaxes if axis == "x" else self.fig.update_yaxes
                kwargs = {} if axis == "x" else {"secondary_y": False}
                update(dtick=self.DTICK[ticks], tickformat="~g", **kwargs)
                self._ticks[axis] = ticks

    def _add_trace(self, spec: Trace, xs: list, ys: list) -> None:
        common = dict(
            x=xs,
            y=ys,
            meta=spec.uid,
            opacity=spec.opacity,
            **_legend_props(spec),
        )
        if spec.kind == "bar":
            trace = self._go.Bar(marker_color=spec.color, **common)
        else:
            line = dict(color=spec.color, dash=spec.dash, width=spec.width)
            trace = self._go.Scatter(mode=spec.mode, line=line, **common)
        self.fig.add_trace(trace, secondary_y=spec.axis == "y2" or None)
        self._sent[spec.uid] = (xs, ys)

    def _draw_marks(self, marks: tuple) -> None:
        layout = self.fig.layout
        layout.shapes = [
            dict(
                type="line",
                xref="x",
                yref="paper",
                x0=m.x,
                x1=m.x,
                y0=0,
                y1=1,
                line=dict(color=m.color, dash=m.dash),
            )
            for m in marks
        ]
        layout.annotations = [
            dict(
                x=m.x,
                y=1,
                xref="x",
                yref="paper",
                text=m.label,
                showarrow=False,
                yanchor="bottom",
                xanchor="right" if m.side == "left" else "center",
                yshift=self.MARK_ROW * self.scale * (i % 2),  # close marks: alternate rows
                font=dict(color=m.color, size=round(11 * self.scale)),
            )
            for i, m in enumerate(marks)
        ]
        self._marks = marks

    def _lay_out_title(self, title: str, marks: tuple) -> None:
        """The title's first line as plotly's title, the rest as its subtitle (plotly anchors
        a title's first line, so a second line would rise above the figure), and a top margin
        with room for both and the mark labels."""
        width = (self.fig.layout.width or self.WIDTH) - 40
        first, *rest = wrap_title(title, width, 16 * self.scale).split("\n", 1)
        rest = wrap_title(rest[0], width, 12 * self.scale).split("\n") if rest else []
        layout = self.fig.layout
        layout.title.text = first
        layout.title.subtitle.text = "<br>".join(map(html.escape, rest))
        layout.margin.t = self.top_margin(len(rest), len(marks))
        self._title, self._laid_out = title, marks

    def traces(self) -> list[dict]:
        return [
            {"uid": t.meta, "name": t.name, "points": len(t.x or ()), "opacity": t.opacity}
            for t in self.fig.data
        ]

    def set_xlabel(self, text: str) -> None:
        if self.fig.layout.xaxis.title.text != text:
            self.fig.layout.xaxis.title.text = text

    def xlabel(self) -> str:
        return self.fig.layout.xaxis.title.text or ""

    def marks(self) -> list[dict]:
        return [{"x": m.x, "label": m.label} for m in self._marks]

    def title(self) -> str:
        return self._title

    def top_margin(self, subtitle: int, marks: int) -> int:
        """Pixels above the plot for the title, ``subtitle`` lines and ``marks`` labels' rows."""
        s = self.scale
        title = 1.2 * 16 * s + ((self.SUBTITLE_GAP + 1.2 * 12 * subtitle) * s if subtitle else 0)
        rows = min(marks, 2)
        return max(self.TOP, round(self.TITLE_PAD + title + 6 * s + self.MARK_ROW * s * rows))

    def font_size(self) -> float:
        return self.fig.layout.font.size or 12

    def write_html(self, path: Path) -> None:
        """A standalone page (plotly.js inlined) that opens without a kernel or network."""
        import plotly.io as pio

        page = pio.to_html(self._go.Figure(self.fig), include_plotlyjs=True, full_html=True)
        data_mod.atomic_write(path, lambda f: f.write(page), binary=False)


def _legend_props(spec: Trace) -> dict:
    """A trace's legend text, entry, group and rank, and its hover text (the whole label)."""
    hover = f"{html.escape(spec.hover)}<br>%{{x}}, %{{y}}<extra></extra>" if spec.hover else None
    return dict(
        name=spec.name,
        showlegend=spec.showlegend,
        legendgroup=spec.group,
        legendrank=1000 if spec.rank is None else 1 + spec.rank,
        hovertemplate=hover,
    )
