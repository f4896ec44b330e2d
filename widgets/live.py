"""LiveRun: sliders that re-run real training and redraw the loss curves while it runs.

One LiveRun owns: the controls a lesson chooses, Run / Stop / Clear buttons, a status line, a
progress line (steps done, total, time left) and a figure. Training runs in one background
thread; a new setting stops the run in flight (within one step) and the newest setting wins, so
at most one training thread is ever alive. The figure is redrawn at most ~10 times a second,
each redraw one batched update. Earlier runs stay as faded curves labelled with their settings,
and every finished run is appended to a JSON-lines log in the cache folder, so overlays survive
a kernel restart and runs recorded on a GPU can be replayed in class on a CPU.

Two renderers sit behind one interface: plotly's FigureWidget (JupyterLab) and matplotlib
drawn off-screen into an ipywidgets Image (Colab, or wherever the plotly front end is missing).
LESSONS_PLOT=plotly|matplotlib picks one; otherwise matplotlib on Colab, plotly elsewhere.
"""

from __future__ import annotations

import copy
import csv
import html
import io
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import ipywidgets as W
from tqdm.auto import tqdm

from lessons import data as data_mod
from lessons.compute import resolve
from lessons.config import Metrics, TrainConfig
from lessons.profiles import pick_device
from lessons.sweep import concurrent_by_default, train_many
from lessons.train import load_data, train
from lessons.tuning import free_openmp_threads
from lessons.warmup import warm_up

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
FADED = 0.3
STYLE = {"description_width": "initial"}  # long slider labels stay readable


def log_slider(
    value: float, description: str, lo: float, hi: float, step: float = 0.1
) -> W.FloatLogSlider:
    """A slider on a log10 scale from 10**lo to 10**hi (learning rates), committing on
    release so that each move starts one run."""
    return W.FloatLogSlider(
        value=value,
        base=10,
        min=lo,
        max=hi,
        step=step,
        description=description,
        continuous_update=False,
        readout_format=".3g",
        style=STYLE,
    )


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


# the controls that select one of their options (LiveRun refuses an option whose value is None)
ONE_OF = (W.Dropdown, W.RadioButtons, W.Select, W.SelectionSlider, W.ToggleButtons)


@dataclass
class RunRecord:
    """A run's settings and records; what the figure draws and the run log stores."""

    id: int
    settings: dict
    label: str
    records: list[Metrics] = field(default_factory=list)
    status: str = "running"  # running | done | stopped | diverged | error
    replayed: bool = False
    meta: dict = field(default_factory=dict)
    group: int = 0  # runs started by one request (one setting) share a group
    name: str = ""  # the run's name inside its group ("LAMB", "AdamW"...), "" when alone

    @property
    def display_label(self) -> str:
        """The legend text: settings, and for a run from the log where it ran."""
        if not self.replayed:
            return self.label
        return f"{self.label} (saved, {self.meta.get('device', '?')})"

    def series(self, x: str = "samples") -> dict[str, tuple[list, list]]:
        """Train loss, val loss and val accuracy against ``x``: "samples" or "step"."""
        train = [r for r in self.records if r.kind == "train"]
        evals = [r for r in self.records if r.kind == "eval"]
        return {
            "loss": ([getattr(r, x) for r in train], [r.loss for r in train]),
            "val_loss": ([getattr(r, x) for r in evals], [r.val_loss for r in evals]),
            "val_acc": ([getattr(r, x) for r in evals], [r.val_acc for r in evals]),
        }

    @property
    def color(self) -> str:
        """The run's colour, the same in every figure and panel."""
        return COLORS[self.id % len(COLORS)]

    def result(self) -> str:
        """The last validation numbers, as the status line says them ("" before any)."""
        ev = self.last("eval")
        return f"val accuracy {ev.val_acc:.1%}, val loss {ev.val_loss:.3f}" if ev else ""

    def last(self, kind: str) -> Metrics | None:
        return next((r for r in reversed(self.records) if r.kind == kind), None)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "settings": self.settings,
                "label": self.label,
                "status": self.status,
                "meta": self.meta,
                "records": [r.to_dict() for r in self.records],
            }
        )

    @classmethod
    def from_json(cls, line: str, run_id: int) -> RunRecord:
        d = json.loads(line)
        return cls(
            run_id,
            d["settings"],
            d["label"],
            [Metrics.from_dict(r) for r in d["records"]],
            d["status"],
            True,
            d.get("meta", {}),
            group=run_id,  # each saved run stands alone
            name=d.get("name", ""),
        )


# --------------------------------------------------------------------------- run log
def run_log_path(name: str) -> Path:
    """LESSONS_RUNS/<name>.jsonl, by default in the data folder's runs/."""
    folder = os.environ.get("LESSONS_RUNS")
    return (Path(folder) if folder else data_mod.data_dir() / "runs") / f"{name}.jsonl"


def append_run(path: Path, run: RunRecord) -> None:
    """Append one line and fsync; a torn last line is skipped on load, never misread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(run.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_runs(path: Path, limit: int) -> list[RunRecord]:
    runs = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return runs
    for i, line in enumerate(lines):
        try:
            runs.append(RunRecord.from_json(line, -1 - i))
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line: skip it
    return runs[-limit:] if limit else []


# --------------------------------------------------------------------------- renderers
def _on_colab() -> bool:
    return "google.colab" in sys.modules


def choose_renderer(kind: str | None = None) -> str:
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


@dataclass
class Trace:
    """One curve or bar series, identified by ``uid`` across redraws."""

    uid: str
    x: list
    y: list
    name: str = ""
    kind: str = "line"  # "line" | "bar"
    mode: str = "lines"  # "lines" | "lines+markers" | "markers"
    dash: str = "solid"  # "solid" | "dash" | "dot"
    color: str | None = None
    opacity: float = 1.0
    width: float = 2.0
    axis: str = "y"  # "y" (left) or "y2" (right)
    showlegend: bool = True
    group: str | None = None


@dataclass(frozen=True)
class Mark:
    """A labelled vertical line, such as a half-life or an effective window."""

    x: float
    label: str
    color: str = "#555555"
    dash: str = "dash"


class PlotlyFigure:
    """A plotly FigureWidget; each draw() is one batch_update that touches only what changed."""

    # seconds between redraws while a run streams in: min_interval at first, growing with the
    # request's age to max_interval (LiveRun.redraw_interval). Each redraw costs the browser a
    # re-render: at 10 a second it took most of a core, and a 20 s run of lesson 4 took 82 s
    # in JupyterLab with Chromium on 2 cores (BENCHMARKS.md)
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

    def __init__(
        self,
        xlabel: str,
        ylabel: str,
        y2label: str | None = None,
        y2range: tuple | None = (0, 1),
        height: int = 420,
        ylog: bool = False,
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
            # (at y=-0.2 of the plot, a long legend ran over that title)
            legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
            template="plotly_white",
            barmode="overlay",
        )
        self.fig.update_xaxes(title_text=xlabel)
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
        self.height = height  # with a legend of one row; each further row adds LEGEND_ROW
        self._sent: dict[str, tuple] = {}
        self._marks: tuple = ()
        self._title = ""
        self._laid_out: tuple | None = None  # the marks the top margin was last sized for
        self.last_draw = 0.0  # perf_counter of the last draw(): see deaf()
        self.scale = 1.0  # presenter mode: larger fonts (lines are scaled by LiveRun)

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
        anywidget gives a model 2 s to load its ES module (plotly's is 5 MB, sent inline) and
        drops every message to that model once a slower load ends: the view keeps the figure
        as it was made, empty, and neither its view count nor plotly's acknowledgement of an
        edit reaches the kernel (reproduced by slowing Chromium 40x for 8 s of a run-all)."""
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
        fig = self.fig
        # a trace whose kind changed (bars <-> line) is replaced, not updated
        wanted = {t.uid for t in traces}
        kinds = {t.uid: "bar" if t.kind == "bar" else "scatter" for t in traces}
        with fig.batch_update():
            if any(t.meta not in wanted or t.type != kinds[t.meta] for t in fig.data):
                wanted = {t.meta for t in fig.data if t.meta in wanted and t.type == kinds[t.meta]}
                fig.data = tuple(t for t in fig.data if t.meta in wanted)
                self._sent = {k: v for k, v in self._sent.items() if k in wanted}
            have = {t.meta: t for t in fig.data}
            for spec in traces:
                xs, ys = list(spec.x), list(spec.y)  # lists: Colab misreads numpy arrays
                trace = have.get(spec.uid)
                if trace is None:
                    common = dict(
                        x=xs,
                        y=ys,
                        meta=spec.uid,
                        name=spec.name,
                        opacity=spec.opacity,
                        showlegend=spec.showlegend,
                        legendgroup=spec.group,
                    )
                    if spec.kind == "bar":
                        fig.add_trace(
                            self._go.Bar(marker_color=spec.color, **common),
                            secondary_y=spec.axis == "y2" or None,
                        )
                    else:
                        fig.add_trace(
                            self._go.Scatter(
                                mode=spec.mode,
                                line=dict(color=spec.color, dash=spec.dash, width=spec.width),
                                **common,
                            ),
                            secondary_y=spec.axis == "y2" or None,
                        )
                    self._sent[spec.uid] = (xs, ys)
                    continue
                if self._sent.get(spec.uid) != (xs, ys):
                    trace.x, trace.y = xs, ys
                    self._sent[spec.uid] = (xs, ys)
                if trace.opacity != spec.opacity:
                    trace.opacity = spec.opacity
                if trace.name != spec.name:
                    trace.name = spec.name
                if spec.kind != "bar" and trace.line.width != spec.width:
                    trace.line.width = spec.width
            marks = tuple(marks)
            if marks != self._marks:
                fig.layout.shapes = [
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
                fig.layout.annotations = [
                    dict(
                        x=m.x,
                        y=1,
                        xref="x",
                        yref="paper",
                        text=m.label,
                        showarrow=False,
                        yanchor="bottom",
                        yshift=14 * self.scale * (i % 2),  # close marks stay legible
                        font=dict(color=m.color, size=round(11 * self.scale)),
                    )
                    for i, m in enumerate(marks)
                ]
                self._marks = marks
            if title != self._title or marks != self._laid_out:
                # a long title ran past the figure's right edge and hid the data set's notice
                # at its end: the lines after the first are plotly's subtitle, and the margin
                # makes room for both and the mark labels (lesson 1's lifted label ran into
                # the title). A second line in the title itself, after <br>, rose above the
                # figure's top edge: plotly anchors a title's first line, not its block
                first, *rest = title.split("\n")
                fig.layout.title.text = first
                fig.layout.title.subtitle.text = "<br>".join(map(html.escape, rest))
                fig.layout.margin.t = self.top_margin(bool(rest), len(marks))
                self._title, self._laid_out = title, marks
            # the figure grows by the legend's rows, so that earlier runs replayed from the
            # run log (a class shown last night's GPU runs) leave the plot its height
            rows = legend_rows([t.name for t in traces if t.showlegend], self.scale)
            height = self.height + round(max(0, rows - 1) * self.LEGEND_ROW * self.scale)
            if fig.layout.height != height:
                fig.layout.height = height

    def traces(self) -> list[dict]:
        return [
            {"uid": t.meta, "name": t.name, "points": len(t.x or ()), "opacity": t.opacity}
            for t in self.fig.data
        ]

    def set_xlabel(self, text: str) -> None:
        if self.fig.layout.xaxis.title.text != text:
            self.fig.layout.xaxis.title.text = text

    def marks(self) -> list[dict]:
        return [{"x": m.x, "label": m.label} for m in self._marks]

    def title(self) -> str:
        return self._title

    def top_margin(self, subtitle: bool, marks: int) -> int:
        """Pixels above the plot for the title, its subtitle and ``marks`` labels' rows."""
        s = self.scale
        title = 1.2 * 16 * s + ((self.SUBTITLE_GAP + 1.2 * 12) * s if subtitle else 0)
        rows = min(marks, 2)
        return max(self.TOP, round(self.TITLE_PAD + title + 6 * s + self.MARK_ROW * s * rows))

    def font_size(self) -> float:
        return self.fig.layout.font.size or 12

    def write_html(self, path: Path) -> None:
        """A standalone page (plotly.js inlined) that opens without a kernel or network."""
        import plotly.io as pio

        page = pio.to_html(self._go.Figure(self.fig), include_plotlyjs=True, full_html=True)
        data_mod.atomic_write(path, lambda f: f.write(page), binary=False)


class MatplotlibFigure:
    """matplotlib (Agg, no pyplot) into an ipywidgets Image: works wherever core widgets do."""

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
        self.widget = W.Image(format="png", layout=W.Layout(width="100%", max_width="900px"))
        self._traces: list[dict] = []
        self._marks: list[dict] = []
        self._title = ""
        self.scale = 1.0  # presenter mode: larger fonts (lines are scaled by LiveRun)

    def set_scale(self, scale: float) -> None:
        self.scale = scale  # used by the next draw

    def draw(self, traces: Sequence[Trace], title: str = "", marks: Sequence[Mark] = ()) -> None:
        ax, ax2 = self.ax, self.ax2
        ax.clear()
        if ax2 is not None:
            ax2.clear()
        dashes = {"solid": "-", "dash": "--", "dot": ":"}
        fs = 9 * self.scale  # base font size
        self._traces = []
        for t in traces:
            target = ax2 if t.axis == "y2" and ax2 is not None else ax
            label = t.name if t.showlegend else None
            if t.kind == "bar":
                target.bar(t.x, t.y, color=t.color, alpha=t.opacity, label=label)
            else:
                target.plot(
                    t.x,
                    t.y,
                    color=t.color,
                    alpha=t.opacity,
                    lw=t.width * 0.8,
                    linestyle=dashes[t.dash] if "lines" in t.mode else "none",
                    marker="o" if "markers" in t.mode else None,
                    markersize=3,
                    label=label,
                )
            self._traces.append(
                {"uid": t.uid, "name": t.name, "points": len(t.x), "opacity": t.opacity}
            )
        for i, m in enumerate(marks):
            ax.axvline(m.x, color=m.color, linestyle=dashes.get(m.dash, "--"), lw=1)
            ax.annotate(
                m.label,
                (m.x, 1.0 + 0.05 * (i % 2)),
                xycoords=("data", "axes fraction"),
                fontsize=fs - 1,
                color=m.color,
                ha="center",
                va="bottom",
            )
        self._marks = [{"x": m.x, "label": m.label} for m in marks]
        ax.set_xlabel(self.labels[0], fontsize=fs)
        ax.set_ylabel(self.labels[1], fontsize=fs)
        ax.tick_params(labelsize=fs - 1)
        if self.ylog and traces:
            ax.set_yscale("log")
        if ax2 is not None:
            ax2.yaxis.tick_right()  # clear() moves a twin axis back to the left
            ax2.yaxis.set_label_position("right")
            ax2.set_ylabel(self.labels[2], fontsize=fs)
            ax2.tick_params(labelsize=fs - 1)
            if self.y2range:
                ax2.set_ylim(*self.y2range)
        ax.set_title(title, fontsize=fs + 1, pad=(26 if marks else 6) * self.scale)
        self._title = title
        ax.grid(alpha=0.3)
        for old in list(self.fig.legends):
            old.remove()
        rows = 0
        if any(t.showlegend for t in traces):
            handles, labels = ax.get_legend_handles_labels()
            if ax2 is not None:
                more = ax2.get_legend_handles_labels()
                handles, labels = handles + more[0], labels + more[1]
            # under the plot, as plotly's: inside it, nine runs replayed from the run log
            # covered half the curves (Colab draws with matplotlib)
            rows = max(1, legend_rows(labels, self.scale, width=720))
            self.fig.legend(
                handles,
                labels,
                loc="outside lower center",
                ncol=math.ceil(len(labels) / rows),
                fontsize=fs - 1,
                frameon=False,
            )
        # the figure grows by the legend's rows, so that the plot keeps its height
        self.fig.set_figheight(self.height / 100 + rows * 1.45 * (fs - 1) / 72)
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        self.widget.value = buf.getvalue()

    def font_size(self) -> float:
        return self.ax.title.get_fontsize()

    def write_png(self, path: Path, dpi: int = 150) -> None:
        data_mod.atomic_write(path, lambda f: self.fig.savefig(f, format="png", dpi=dpi))

    def traces(self) -> list[dict]:
        return list(self._traces)

    def set_xlabel(self, text: str) -> None:
        self.labels = (text, *self.labels[1:])  # used by the next draw

    def marks(self) -> list[dict]:
        return list(self._marks)

    def title(self) -> str:
        return self._title


FIGURES = {"plotly": PlotlyFigure, "matplotlib": MatplotlibFigure}


def make_figure(renderer: str | None = None, **kwargs) -> PlotlyFigure | MatplotlibFigure:
    """A figure of the chosen renderer (see choose_renderer)."""
    return FIGURES[choose_renderer(renderer)](**kwargs)


def free_gpu_memory() -> None:
    """Give the cached allocator's blocks back after an out-of-memory error, so that the
    next, smaller run (or another notebook) can have them."""
    import gc

    import torch

    gc.collect()  # the failed run's tensors: frames of the traceback may still hold them
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- interrupts
# Every LiveRun alive, by name: a re-run widget cell replaces (and stops) the old widget,
# and a kernel interrupt stops them all.
_LIVE: weakref.WeakValueDictionary[str, LiveRun] = weakref.WeakValueDictionary()


def stop_all() -> int:
    """Stop every run in flight, in every widget; returns how many were running."""
    busy = [live for live in list(_LIVE.values()) if live.busy]
    for live in busy:
        live.stop()
    return len(busy)


def _sigint_idle(signum, frame) -> None:
    stop_all()  # the kernel is idle: nothing else to interrupt


def _sigint_busy(signum, frame) -> None:
    stop_all()
    raise KeyboardInterrupt  # and the cell that is running stops as usual


def hook_kernel_interrupt() -> bool:
    """Make Jupyter's interrupt button stop the runs training in the background.

    ipykernel ignores SIGINT while idle (when a slider's run trains in a thread) and installs
    Python's default handler while a cell runs, restoring ``kernel.saved_sigint_handler``
    afterwards. So the idle handler goes into saved_sigint_handler, and the busy one into
    every cell through pre_handler_hook. Returns False outside an IPython kernel."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or not hasattr(kernel, "pre_handler_hook"):
        return False
    if not getattr(kernel, "_lessons_interrupt_hooked", False):
        pre = kernel.pre_handler_hook

        def pre_handler_hook():
            pre()
            signal.signal(signal.SIGINT, _sigint_busy)

        kernel.pre_handler_hook = pre_handler_hook
        kernel._lessons_interrupt_hooked = True
    kernel.saved_sigint_handler = _sigint_idle
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _sigint_busy)  # the cell running now
    return True


def _in_kernel() -> bool:
    """Inside a Jupyter kernel, where widgets have a front end to report to."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return getattr(shell, "kernel", None) is not None


def describe_error(e: BaseException) -> str:
    """A message that says what happened and what to do."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        free_gpu_memory()
        return (
            "The GPU ran out of memory: lower the batch size (or restart the kernel to "
            "free memory held by other notebooks) and run again."
        )
    if isinstance(e, data_mod.DataError):
        return f"The data set is not available: {e}"
    if isinstance(e, ValueError):
        return f"Impossible setting: {e}"
    return f"The run failed ({type(e).__name__}: {e}). Change a setting and run again."


class CoreShare:
    """How many of the CPU cores this process may use other programs kept busy from the
    moment it is made: psutil's per-core busy time on those cores, less this process's own
    CPU time, over the wall time. A team of torch threads waits at every operation for its
    slowest member, so when another program takes one of their cores a step can take many
    times longer: on 2 cores one busy process made the ci model's engine 10 - 13x slower
    with 2 threads, against none with 1 (BENCHMARKS.md)."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        proc = psutil.Process()
        try:
            allowed = sorted(proc.cpu_affinity())  # Linux, Windows
        except (AttributeError, psutil.Error, OSError):
            allowed = list(range(psutil.cpu_count() or 1))
        self.cores = len(allowed)
        self._allowed = allowed
        self._proc = proc
        self._start = (time.perf_counter(), self._busy(), self._own())

    def _busy(self) -> float:
        times = self._psutil.cpu_times(percpu=True)
        total = 0.0
        for i in self._allowed:
            if i < len(times):
                t = times[i]._asdict()
                # guest time is already counted in user time (Linux)
                idle = sum(t.get(k, 0.0) for k in ("idle", "iowait", "guest", "guest_nice"))
                total += sum(t.values()) - idle
        return total

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def others(self, min_wall: float = 1.0) -> float | None:
        """Cores' worth of CPU time other programs used since this object was made; None
        before ``min_wall`` seconds (the system's counters tick at 10 ms)."""
        t0, busy0, own0 = self._start
        wall = time.perf_counter() - t0
        if wall < min_wall:
            return None
        return max(0.0, ((self._busy() - busy0) - (self._own() - own0)) / wall)


def core_share_note(others: float | None, cores: int, threads: int) -> str:
    """What to tell the user when other programs held cores that the run's torch threads
    needed: a team of two or more threads, more threads than the cores others left free, and
    most of a core taken. Below that it stays quiet: in JupyterLab on 2 cores the browser's
    own redraws took 0.3 - 0.6 of a core in most lessons' runs, where one thread instead of two
    was at most 15% faster (or slower), and 0.8 - 1.0 in lessons 1 and 3 on the ci profile
    (before its strided stem), where one thread was 1.9 - 2.4x faster (BENCHMARKS.md)."""
    if others is None or threads < 2 or others < 0.75 or threads + others <= cores + 0.25:
        return ""
    free = max(1, int(cores - others + 0.25))
    return (
        f" Other programs kept {others:.1f} of the {cores} CPU cores busy during this run, "
        f"and torch's {threads} threads wait for each other when one loses its core: that "
        f"can make training several times slower. Close them, or start Jupyter with "
        f"OMP_NUM_THREADS={free} (e.g. OMP_NUM_THREADS={free} make lab)."
    )


class LiveRun:
    """Controls + Run/Stop/Clear + status + progress + a live figure over lessons.train.

    controls: name -> ipywidgets value widget (use continuous_update=False on sliders);
        changing one re-runs training.
    make_config: the controls' values -> TrainConfig (raise ValueError for impossible ones).
    view_controls: name -> widget whose change only redraws (for example a smoothing beta);
        their values reach Series.compute and ``marks``.
    marks: (live) -> list of Mark drawn as labelled vertical lines.
    panel: (live) -> (traces, title) for a second figure under the first, redrawn with it
        (for example per-layer trust ratios); panel_axes: its make_figure arguments.
    summary: (live) -> HTML shown under the figure after every redraw (measured numbers).
    x_toggle: add a view control that switches the x axis between samples seen and
        parameter updates (True), or between the given (label, Metrics field) options.
    """

    MAX_REBUILDS = 3  # deaf figures replaced per widget (_heal_deaf_figures)

    def __init__(
        self,
        controls: dict[str, W.ValueWidget],
        make_config: Callable[[dict], TrainConfig],
        *,
        name: str,
        title: str = "Loss against samples seen",
        label: Callable[[dict], str] | None = None,
        series: Sequence[Series] = DEFAULT_SERIES,
        xlabel: str = "samples seen",
        ylabel: str = "loss",
        y2label: str = "val accuracy",
        renderer: str | None = None,
        max_history: int = 6,
        replay: bool = True,
        auto_run: bool = True,
        view_controls: dict[str, W.ValueWidget] | None = None,
        marks: Callable[[LiveRun], list[Mark]] | None = None,
        panel: Callable[[LiveRun], tuple[list[Trace], str]] | None = None,
        panel_axes: dict | None = None,
        summary: Callable[[LiveRun], str] | None = None,
        x_toggle: bool | Sequence[tuple[str, str]] = False,
    ):
        self.name = name
        self.controls = dict(controls)
        for key, control in self.controls.items():
            if isinstance(control, ONE_OF) and None in control._options_values:
                # ipywidgets reads a selection's value None as "nothing selected": picking
                # that option blanks the control in the browser (widgets.lamb.CAPS)
                raise ValueError(
                    f"control {key!r} offers the value None, which ipywidgets shows as no "
                    "selection: give that option another value (a string such as 'off')"
                )
        self.make_config = make_config
        self.title = title
        self.label = label or settings_label
        self.max_history = max_history
        self.series = tuple(series)
        self.view_controls = dict(view_controls or {})
        x_options = (
            list(x_toggle)
            if not isinstance(x_toggle, bool)
            else ([(xlabel, "samples"), ("parameter updates", "step")] if x_toggle else [])
        )
        if x_options:
            self.view_controls["x"] = W.ToggleButtons(
                options=x_options, value=x_options[0][1], description="x axis"
            )
        self.xlabels = {"samples": xlabel, **{v: k for k, v in x_options}}
        self.summary = summary
        self.summary_html = W.HTML()
        self.marks = marks
        self.renderer_name = choose_renderer(renderer)
        self.figure = make_figure(self.renderer_name, xlabel=xlabel, ylabel=ylabel, y2label=y2label)
        # a front end that renders the figure counts its views; None: not tracked (no kernel)
        self._track_views = self.renderer_name == "plotly" and _in_kernel()
        if self._track_views:
            self.figure.widget._view_count = 0
        self.panel = panel
        self.panel_axes = panel_axes
        self._axes = dict(ylabel=ylabel, y2label=y2label)
        self.panel_figure = make_figure(self.renderer_name, **(panel_axes or {})) if panel else None
        self._draw_lock = threading.Lock()
        self.log_path = run_log_path(name)
        self.runs: list[RunRecord] = load_runs(self.log_path, max_history) if replay else []
        self.redraws = 0  # figure updates sent: each is one batched message
        self.rebuilds = 0  # deaf plotly figures replaced (_heal_deaf_figures)
        self._shown = False  # displayed in a notebook (_ipython_display_)
        self.throttle = True  # False: redraw for every record (widgets.bench's baseline)
        self.redraw_age_share = 1 / 20  # the redraw interval grows by this share of the age
        self._request_t0: float | None = None  # when the current request's first record came
        self._draw_cost = 0.0  # seconds the last redraw took in the kernel
        self.threads_started = 0
        self._next_id = 0
        self._group = 0
        self._core_share: CoreShare | None = None  # a CPU request's other programs' share
        self.last_group: dict[str, RunRecord] = {}  # the runs of the last request, by name
        self._cond = threading.Condition()
        self._pending: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._suppress = False
        self._subtitle = ""
        self.last_run: RunRecord | None = None  # the run the last request made (None: none)
        self.front_end_notice = ""  # set when plotly could not display and matplotlib took over

        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop")
        self.clear_button = W.Button(description="Clear old runs", icon="eraser")
        self.export_button = W.Button(
            description="Export", icon="download", tooltip="figure as PNG and HTML, runs as CSV"
        )
        self.presenter = W.ToggleButton(
            value=os.environ.get("LESSONS_PRESENTER", "") not in ("", "0"),
            description="Presenter",
            icon="television",
            tooltip="large fonts and thick lines for a projector",
        )
        self.export_links = W.HTML()
        self.status = W.HTML(value="Ready: move a slider or press Run.")
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="40%"))
        self.progress_text = W.Label(value="")
        self.run_button.on_click(lambda _: self.request(self.values()))
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.export_button.on_click(lambda _: self._export_clicked())
        self.presenter.observe(lambda _: self._set_presenter(), names="value")
        if auto_run:
            for w in self.controls.values():
                w.observe(self._on_change, names="value")
        for w in self.view_controls.values():
            w.observe(lambda _: self._draw(), names="value")
        self.widget = W.VBox(
            [
                W.HBox(
                    list(self.controls.values()) + list(self.view_controls.values()),
                    layout=W.Layout(flex_flow="row wrap"),
                ),
                W.HBox(
                    [
                        self.run_button,
                        self.stop_button,
                        self.clear_button,
                        self.export_button,
                        self.presenter,
                    ],
                    layout=W.Layout(flex_flow="row wrap"),
                ),
                self.status,
                W.HBox([self.progress, self.progress_text]),
                self.figure.widget,
                self.summary_html,
                *([self.panel_figure.widget] if self.panel_figure else []),
                self.export_links,
            ]
        )
        self._set_presenter(draw=False)
        self._draw()
        self._draw_cost = 0.0  # that first draw pays one-off set-up (matplotlib: ~0.2 s)
        # a re-run cell makes a new widget of the same name: the old one stops training
        old = _LIVE.get(name)
        if old is not None and old is not self:
            old.stop()
        _LIVE[name] = self
        hook_kernel_interrupt()
        # while the student reads, not after the first slider move (see lessons.train.warm_up)
        threading.Thread(target=warm_up, daemon=True, name="lessons-warm-up").start()

    # ---- public API
    def _ipython_display_(self):
        from IPython.display import display

        self._shown = True
        display(self.widget)

    def values(self) -> dict:
        return {k: w.value for k, w in self.controls.items()}

    def view(self) -> dict:
        return {k: w.value for k, w in self.view_controls.items()}

    def request(self, values: dict) -> None:
        """Start a run with these settings; a run in flight is stopped, the newest wins."""
        free_openmp_threads()  # else CPU steps in the worker thread ran 1.4-2.2x slower
        with self._cond:
            self._pending = dict(values)
            self._stop.set()
            self._idle.clear()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._worker, daemon=True, name=f"LiveRun-{self.name}"
                )
                self.threads_started += 1
                self._thread.start()
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._pending = None
            self._stop.set()

    def clear(self) -> None:
        """Forget the faded runs on screen (the run log keeps them)."""
        with self._cond:
            self.runs = [r for r in self.runs if r.status == "running"]
        self._draw()

    def wait(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def run_blocking(self, timeout: float | None = None, **values):
        """Set controls to ``values`` (without triggering), run once and wait. Returns the run
        (None if none started), or {name: run} when the request trained several configs."""
        self._suppress = True
        try:
            for k, v in values.items():
                if k not in self.controls:
                    raise ValueError(f"unknown control {k!r}: one of {', '.join(self.controls)}")
                self.controls[k].value = v
        finally:
            self._suppress = False
        self.request(self.values())
        try:
            finished = self.wait(timeout)
        except KeyboardInterrupt:  # an interrupted cell leaves nothing training behind
            self.stop()
            raise
        if not finished:
            self.stop()
            raise TimeoutError(f"the run did not finish in {timeout} s (it was stopped)")
        if len(self.last_group) > 1:
            return dict(self.last_group)
        return self.last_run

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def traces(self) -> list[dict]:
        return self.figure.traces()

    def export(self, folder: str | Path | None = None, stem: str | None = None) -> dict:
        """Save what the figure shows, every run on it: PNG (slides), standalone HTML
        (interactive handouts, no kernel needed) and the runs' records as CSV. Returns
        {"png": path, "html": path, "csv": path, ...}; each file is written atomically."""
        folder = Path(folder) if folder is not None else data_mod.data_dir() / "exports"
        stem = stem or f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        with self._draw_lock:
            traces, title, marks = self.scene()
            runs = list(self.runs)
            panel = self._panel_scene() if self.panel else None
        xlabel = self.xlabels[self.view().get("x", "samples")]
        axes = dict(xlabel=xlabel, ylabel=self._axes["ylabel"], y2label=self._axes["y2label"])
        paths = {"png": folder / f"{stem}.png", "html": folder / f"{stem}.html"}
        png = MatplotlibFigure(**axes)
        png.set_scale(self.figure.scale)
        png.draw(traces, title, marks)
        png.write_png(paths["png"])
        page = PlotlyFigure(**axes)
        page.set_scale(self.figure.scale)
        page.draw(traces, title, marks)
        page.write_html(paths["html"])
        if panel is not None:
            paths["panel_png"] = folder / f"{stem}-panel.png"
            fig = MatplotlibFigure(**(self.panel_axes or {}))
            fig.draw(*panel)
            fig.write_png(paths["panel_png"])
        paths["csv"] = folder / f"{stem}.csv"
        data_mod.atomic_write(paths["csv"], lambda f: write_runs_csv(f, runs), binary=False)
        return paths

    def _export_clicked(self) -> None:
        try:
            paths = self.export()
        except Exception as e:  # a full disk or a read-only folder: say so, stay usable
            self._set_status(f"Export failed ({type(e).__name__}: {e}).", "error")
            return
        folder = paths["png"].parent
        names = ", ".join(p.name for p in paths.values())
        self._set_status(f"Exported {names} to {folder}", "ok")

    # ---- internals
    def _on_change(self, change) -> None:
        if self._suppress:
            return
        owner = change.get("owner")
        if change.get("name") in getattr(owner, "_property_lock", {}):  # a person moved it
            self._check_front_end()
        self.request(self.values())

    def _check_front_end(self) -> None:
        """A control moved in the browser, yet no view of the plotly figure was ever made
        there: the plotly front end is missing (Colab, an old or locked-down Jupyter). Draw
        with matplotlib into an image from now on."""
        if not self._track_views or self.figure.widget._view_count:
            return
        self._track_views = False
        old = self.figure
        new = MatplotlibFigure(
            xlabel=old.fig.layout.xaxis.title.text or "",
            ylabel=self._axes["ylabel"],
            y2label=self._axes["y2label"],
        )
        new.set_scale(old.scale)
        self._swap_figure("figure", new)
        self.renderer_name = "matplotlib"
        if self.panel_figure is not None:
            panel = MatplotlibFigure(**(self.panel_axes or {}))
            panel.set_scale(self.panel_figure.scale)
            self._swap_figure("panel_figure", panel)
        self._draw()
        self.front_end_notice = (
            "The plotly figure did not display in this front end, so plots are drawn with "
            "matplotlib (set LESSONS_PLOT=matplotlib to start that way)."
        )

    def _set_status(self, text: str, level: str = "info") -> None:
        color = {"info": "#333", "ok": "#1a7f37", "warn": "#9a6700", "error": "#cf222e"}[level]
        self.status.value = f'<span style="color:{color}">{html.escape(text)}</span>'

    def scene(self) -> tuple[list[Trace], str, list[Mark]]:
        """What the figure shows: a trace per run and series, the title and the marks."""
        # the data set on a line of its own: at the end of one long line it ran off the figure
        title = self.title + (f"\n{self._subtitle}" if self._subtitle else "")
        runs, view = list(self.runs), self.view()
        lw = 2.0 if self.presenter.value else 1.0
        traces = []
        # the legend names a run once, on its most prominent curve
        lead = next((s for s in self.series if s.opacity >= 1), self.series[0])
        newest = max((r.group for r in runs if not r.replayed), default=None)
        for run in runs:
            active = run.group == newest and not run.replayed
            data = run.series(view.get("x", "samples"))  # samples, step or epoch
            for s in self.series:
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
                        width=s.width * (2.5 if active else 1.5) * lw,
                        axis=s.axis,
                        showlegend=first,
                        group=str(run.id),
                    )
                )
        marks = list(self.marks(self)) if self.marks else []
        return traces, title, marks

    def redraw_interval(self, now: float) -> float:
        """Seconds a streaming run waits between redraws: the figure's min_interval at first,
        so a slider move shows its curve growing at once; then redraw_age_share (a twentieth)
        of the time since the request's first record (its first call here: a first run's
        warm-up does not count), up to the figure's max_interval, so a long run costs the
        browser a bounded number of re-renders; and never less than 4x what the last redraw
        cost the kernel (matplotlib renders there), so drawing takes at most a fifth of it."""
        if not self.throttle:
            return 0.0
        if self._request_t0 is None:
            self._request_t0 = now
        fig = self.figure
        grown = (now - self._request_t0) * self.redraw_age_share
        return max(min(fig.max_interval, max(fig.min_interval, grown)), 4 * self._draw_cost)

    def _redraw_due(self, last_draw: float, step: int, total: int, t0: float) -> float:
        """While records stream in: the progress line and the figure, once redraw_interval
        has passed since ``last_draw``; the time of the last redraw."""
        now = time.perf_counter()
        if now - last_draw < self.redraw_interval(now):
            return last_draw
        self._progress(step, total, now - t0)
        self._draw()
        return now

    def _draw(self) -> None:
        """Redraw every run (thread-safe: the worker and view controls both call it)."""
        with self._draw_lock:
            t0 = time.perf_counter()
            traces, title, marks = self.scene()
            self.figure.set_xlabel(self.xlabels[self.view().get("x", "samples")])
            self.figure.draw(traces, title, marks)
            if self.summary is not None:
                self.summary_html.value = self.summary(self)
            if self.panel_figure is not None:
                self.panel_figure.draw(*self._panel_scene())
            self.redraws += 1
            self._draw_cost = time.perf_counter() - t0

    def _panel_scene(self) -> tuple[list[Trace], str]:
        traces, title = self.panel(self)
        lw = 2.0 if self.presenter.value else 1.0
        return [replace(t, width=t.width * lw) for t in traces], title

    def _set_presenter(self, draw: bool = True) -> None:
        scale = 1.6 if self.presenter.value else 1.0
        for fig in (self.figure, self.panel_figure):
            if fig is not None:
                fig.set_scale(scale)
        if draw:
            self._draw()

    def _worker(self) -> None:
        while True:
            with self._cond:
                if self._pending is None:
                    self._thread = None
                    self._idle.set()
                    return
                values, self._pending = self._pending, None
                self._stop = threading.Event()
                stop = self._stop
            try:
                self._execute(values, stop)
            except Exception as e:  # the thread must survive anything a run does
                self._set_status(describe_error(e), "error")
                traceback.print_exc(file=sys.stderr)

    def _execute(self, values: dict, stop: threading.Event) -> None:
        """One request: one run, or several side by side when make_config returns a dict."""
        self.last_run, self.last_group = None, {}
        try:
            made = self.make_config(values)
            configs = made if isinstance(made, dict) else {"": made}
            first = next(iter(configs.values()))
            device = pick_device() if first.device is None else first.device
            self._set_status(f"Preparing {first.dataset} data on {device}...")
            data = {name: load_data(c, device) for name, c in configs.items()}
            for name, c in configs.items():
                c.check(data[name].n_train)
        except Exception as e:
            self._set_status(describe_error(e), "error")
            return
        self._group += 1
        on = next(iter(data.values())).device  # the device the data loaded on
        self._core_share = None
        if on.type == "cpu":
            try:
                self._core_share = CoreShare()
            except Exception:  # advice only (psutil absent, counters unreadable)
                pass
        t0 = time.perf_counter()
        self._request_t0 = None  # redraw_interval starts the clock at the first record
        together = len(configs) > 1 and concurrent_by_default(on)
        if together:
            self._train_together(values, configs, data, stop)
        for i, (name, config) in enumerate({} if together else configs.items()):
            if stop.is_set():
                break
            run = self._train_one(
                values,
                name,
                config,
                data[name],
                stop,
                f" ({i + 1} of {len(configs)})" if len(configs) > 1 else "",
            )
            if run is None or run.status in ("error", "stopped"):
                break
        if self._track_views:  # the browser acknowledges edits within milliseconds
            timer = threading.Timer(5.0, self._heal_deaf_figures)
            timer.daemon = True
            timer.start()
        group = list(self.last_group.values())
        if group and all(r.status == "done" for r in group) and len(configs) == len(group):
            parts = [f"{r.name}: {r.result()}" if r.name else r.result() for r in group]
            self._say_done(
                self.label(values),
                time.perf_counter() - t0,
                "; ".join(parts),
                group[0].meta.get("notice"),
            )

    def _say_done(self, what: str, secs: float, result: str, notice: str | None) -> None:
        """Say "Done <what> in <secs> s: <result>.", then the data notice and, on a CPU,
        whether another program took the cores; a warning colour if either is there."""
        cores = self._core_note()
        self._set_status(
            f"Done {what} in {secs:.1f} s"
            + (f": {result}" if result else "")
            + "."
            + (f" NOTICE: {notice}" if notice else "")
            + cores,
            "warn" if notice or cores else "ok",
        )

    def _swap_figure(self, attr: str, new) -> None:
        """Put figure ``new`` in the place of ``self.<attr>``, on screen too."""
        old = getattr(self, attr)
        self.widget.children = [new.widget if c is old.widget else c for c in self.widget.children]
        setattr(self, attr, new)

    def _heal_deaf_figures(self) -> int:
        """Replace each plotly figure of a displayed widget whose view applied none of its
        updates (PlotlyFigure.deaf) with a rebuilt one, so the curves drawn so far appear;
        how many. A figure rebuilt while the browser was only slow (a run-all keeps the
        kernel from reading the view's messages) costs one redraw of the same curves; a front
        end that never shows plotly gets at most MAX_REBUILDS (then _check_front_end's
        matplotlib takes over at the first slider move)."""
        rebuilt = 0
        if not self._shown or self.rebuilds >= self.MAX_REBUILDS:
            return 0
        with self._draw_lock:
            for attr in ("figure", "panel_figure"):
                old = getattr(self, attr)
                if not isinstance(old, PlotlyFigure) or not old.deaf():
                    continue
                self._swap_figure(attr, old.rebuilt())
                rebuilt += 1
        self.rebuilds += rebuilt
        return rebuilt

    def _core_note(self) -> str:
        """core_share_note for the request so far (CPU runs only)."""
        share = self._core_share
        if share is None:
            return ""
        import torch

        try:
            others = share.others()
        except Exception:  # the counters are advice: never let them fail a finished run
            return ""
        return core_share_note(others, share.cores, torch.get_num_threads())

    def _train_one(self, values, name, config, ds, stop, of: str) -> RunRecord | None:
        """Train one config into a new RunRecord of the current group; say how it ended."""
        run = self._start_run(values, name, config, ds)
        self._set_status(
            f"Running {run.label}{of} on {ds.device}, {resolve(config, ds.device).precision} "
            f"({ds.name}).{_notice(ds)}"
            + (f" {self.front_end_notice}" if self.front_end_notice else ""),
            "warn" if ds.notice or self.front_end_notice else "info",
        )
        t0 = time.perf_counter()
        last_draw = 0.0
        total = 1
        try:
            for rec in train(config, stop, dataset=ds):
                run.records.append(rec)
                total = rec.extras.get("total_steps", total)
                last_draw = self._redraw_due(last_draw, rec.step, total, t0)
        except Exception as e:
            run.status = "error"
            self._progress(
                run.records[-1].step if run.records else 0, total, time.perf_counter() - t0
            )
            self._draw()
            self._set_status(describe_error(e), "error")
            return run
        last = run.records[-1] if run.records else None
        self._progress(last.step if last else 0, total, time.perf_counter() - t0)
        self._finish_run(run, name, total, time.perf_counter() - t0, say=True)
        self._draw()
        return run

    def _train_together(self, values, configs, data, stop) -> None:
        """Train every config of a request side by side (lessons.train.train_many): their
        curves grow together; the progress line counts the steps of all of them."""
        runs = {name: self._start_run(values, name, c, data[name]) for name, c in configs.items()}
        ds = next(iter(data.values()))
        self._set_status(
            f"Running {len(runs)} runs side by side on {ds.device}, "
            f"{resolve(next(iter(configs.values())), ds.device).precision} ({ds.name}): "
            f"{self.label(values)}.{_notice(ds)}",
            "warn" if ds.notice else "info",
        )
        t0 = time.perf_counter()
        last_draw = 0.0
        totals = {name: 1 for name in runs}
        steps = dict.fromkeys(runs, 0)
        try:
            for name, rec in train_many(configs, stop, data, concurrent=True):
                runs[name].records.append(rec)
                totals[name] = rec.extras.get("total_steps", totals[name])
                steps[name] = rec.step
                last_draw = self._redraw_due(
                    last_draw, sum(steps.values()), sum(totals.values()), t0
                )
        except Exception as e:
            for run in runs.values():
                run.status = "error"
            self._draw()
            self._set_status(describe_error(e), "error")
            return
        self._progress(sum(steps.values()), sum(totals.values()), time.perf_counter() - t0)
        for name, run in runs.items():
            self._finish_run(run, name, totals[name], time.perf_counter() - t0, say=False)
        self._draw()
        bad = [r for r in runs.values() if r.status == "diverged"]
        if bad:
            self._set_status(
                "; ".join(_diverged_text(r) for r in bad) + ": lower the learning rate.", "error"
            )
        elif any(r.status == "stopped" for r in runs.values()) and self._pending is None:
            self._set_status(f"Stopped {len(runs)} runs of {self.label(values)}.", "warn")

    def _start_run(self, values, name, config, ds) -> RunRecord:
        """A new RunRecord of the current group, on the figure at once."""
        self._subtitle = ds.name + (
            " - GENERATED DATA, Imagenette unavailable" if ds.notice else ""
        )
        label = self.label(values)
        with self._cond:
            self._next_id += 1
            run = RunRecord(
                self._next_id,
                dict(values),
                f"{name}: {label}" if name else label,
                meta={
                    "profile": config.profile,
                    "device": str(ds.device),
                    "precision": resolve(config, ds.device).precision,
                    "dataset": ds.name,
                    "notice": ds.notice,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
                group=self._group,
                name=name,
            )
            # one curve per setting: a rerun replaces the older curve of the same settings
            self.runs = [r for r in self.runs if r.label != run.label or r.status == "running"]
            self.runs.append(run)
            self.last_run = run
            self.last_group[name] = run
            self._trim()
        return run

    def _finish_run(self, run: RunRecord, name: str, total: int, secs: float, say: bool):
        """Set how the run ended, say so (``say``) and append it to the run log."""
        last = run.records[-1] if run.records else None
        kind = last.kind if last else "stopped"
        run.status = {"done": "done", "diverged": "diverged"}.get(kind, "stopped")
        if run.status == "stopped" and not any(r.kind == "train" for r in run.records):
            with self._cond:  # superseded before its first point: nothing worth keeping
                if run in self.runs:
                    self.runs.remove(run)
                self.last_group.pop(name, None)
        if say and run.status == "done":
            result = run.result() if run.last("eval") else ""
            self._say_done(run.label, secs, result, run.meta.get("notice"))
        elif say and run.status == "diverged":
            text = _diverged_text(run)
            self._set_status(f"{text}: lower the learning rate and run again.", "error")
        elif say and self._pending is None:
            self._set_status(
                f"Stopped {run.label} at step {last.step if last else 0} of {total}.", "warn"
            )
        if run.status in ("done", "diverged") or run.status == "stopped" and run.records:
            try:
                append_run(self.log_path, run)
            except OSError as e:
                self._set_status(f"{self.status.value} (could not save the run log: {e})")

    def _trim(self) -> None:
        """Keep the newest request's runs and those of the ``max_history`` before it."""
        groups = list(dict.fromkeys(r.group for r in self.runs))
        keep = set(groups[-(self.max_history + 1) :])
        self.runs = [r for r in self.runs if r.group in keep]

    def _progress(self, step: int, total: int, elapsed: float) -> None:
        self.progress.max = max(1, total)
        self.progress.value = min(step, total)
        self.progress_text.value = tqdm.format_meter(
            step,
            total,
            elapsed,
            unit="step",
            bar_format="{n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {rate_fmt}]",
        )


CSV_FIELDS = ("run", "label", "status", "device", "kind", "step", "samples", "epoch")


def write_runs_csv(f, runs: Sequence[RunRecord]) -> None:
    """One row per record of every run: its settings, where it ran, and every number."""
    settings = list(dict.fromkeys(k for r in runs for k in r.settings))
    numbers = list(
        dict.fromkeys(
            k
            for r in runs
            for rec in r.records
            for k, v in {**rec.to_dict(), **rec.extras}.items()
            if k not in CSV_FIELDS and k != "extras" and isinstance(v, (int, float))
        )
    )
    writer = csv.writer(f)
    writer.writerow([*CSV_FIELDS, *(f"setting_{k}" for k in settings), *numbers])
    for run in runs:
        for rec in run.records:
            d = {**rec.to_dict(), **rec.extras}
            writer.writerow(
                [
                    run.id,
                    run.display_label,
                    run.status,
                    run.meta.get("device", ""),
                    rec.kind,
                    rec.step,
                    rec.samples,
                    rec.epoch,
                    *(run.settings.get(k, "") for k in settings),
                    *(_csv_number(d.get(k)) for k in numbers),
                ]
            )


def _csv_number(v) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return ""
    return repr(v)


def _notice(ds) -> str:
    return f" NOTICE: {ds.notice}" if ds.notice else ""


def _diverged_text(run: RunRecord) -> str:
    last = run.records[-1]
    return (
        f"Diverged at step {last.step} ({last.extras.get('reason', 'loss not finite')})"
        f" with {run.label}"
    )


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def settings_label(values: dict) -> str:
    """A run's settings for its legend entry: key=value each, a ticked box by its name alone
    and an unticked one left out (lesson 4's legend said "reference=False" on every run)."""
    parts = [k if isinstance(x, bool) else f"{k}={_fmt(x)}" for k, x in values.items()]
    return ", ".join(p for p, x in zip(parts, values.values()) if x is not False) or "defaults"
