"""LiveRun: sliders that re-run real training and redraw the loss curves while it runs.

One LiveRun lays out the controls a lesson chooses, Run / Stop / Clear / Export buttons, a
status line, a progress line and a figure, and wires them: a changed control becomes a
request to the background worker (widgets.worker: one thread, the newest request wins), which
trains it (widgets.request) while the figure is redrawn at a bounded rate. Earlier runs stay
as faded curves; the legend names each run and what differs, the settings every run shares
stand under the title (widgets.legend), and every finished run is appended to a
JSON-lines log (widgets.runs), so overlays survive a kernel restart.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import ipywidgets as W

from lessons import data as data_mod
from lessons.config import TrainConfig
from lessons.tuning import free_openmp_threads
from lessons.warmup import warm_up
from widgets import front_end, status
from widgets.controls import check_controls, x_axis_toggle
from widgets.export import export_files
from widgets.figure import Mark, Trace, choose_renderer, in_kernel, make_figure, shared_yrange
from widgets.legend import plan as plan_legend
from widgets.pacing import RedrawPacing
from widgets.request import Request
from widgets.runs import RunHistory, RunRecord, load_runs, run_log_path, settings_label
from widgets.scene import DEFAULT_SERIES, Series, run_traces
from widgets.seeds import Seeds
from widgets.worker import Worker, hook_kernel_interrupt, register


class LiveRun:
    """Controls + Run/Stop/Clear + status + progress + a live figure over lessons.train.

    controls: name -> ipywidgets value widget (use continuous_update=False on sliders);
        changing one re-runs training.
    make_config: the controls' values -> TrainConfig, or {run name: TrainConfig} to train
        several runs per request (raise ValueError for impossible values).
    label: the controls' values -> the request's settings, "key=value, ..." (default:
        settings_label), for the status line and each run's label.
    run_label: (run name, its TrainConfig, the values) -> that run's label, "<name>: setting,
        setting, ...", for runs that do not all train with what ``label`` says (default:
        "<name>: <label>"). The legend shows the settings in which runs differ.
    view_controls: name -> widget whose change only redraws (for example a smoothing beta);
        their values reach Series.compute and ``marks``.
    marks: (live) -> list of Mark drawn as labelled vertical lines.
    panel: (live) -> (traces, title) for a second figure under the first, redrawn with it
        (for example per-layer trust ratios); panel_axes: its make_figure arguments;
        shared_y: the figure and the panel share one range of their left axes, for panels
        that are compared by eye.
    color_roles: a run's name -> its role; every run of a role keeps one colour, in every
        panel, request and export (default: a colour per run).
    summary: (live) -> HTML shown under the figure after every redraw (measured numbers).
    seeds: how many seeds each run trains (an int, or by run name): the lead and its seed
        runs, drawn faintly in its colour, show the spread a claim is stated against
        (widgets.seeds).
    x_toggle: add a view control that switches the x axis between samples seen and
        parameter updates (True), or between the given (label, Metrics field) options.
    """

    MAX_REBUILDS = 3  # deaf figures replaced per widget (_heal_deaf_figures)

    def __init__(
        self,
        controls: dict[str, W.ValueWidget],
        make_config: Callable[[dict], TrainConfig | dict[str, TrainConfig]],
        *,
        name: str,
        title: str = "Loss against samples seen",
        label: Callable[[dict], str] | None = None,
        run_label: Callable[[str, TrainConfig, dict], str] | None = None,
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
        shared_y: bool = False,
        color_roles: Callable[[str], str] | None = None,
        summary: Callable[[LiveRun], str] | None = None,
        x_toggle: bool | Sequence[tuple[str, str]] = False,
        seeds: Seeds = 1,
    ):
        check_controls(controls)
        self.name = name
        self.controls = dict(controls)
        self.make_config = make_config
        self.title = title
        self.label = label or settings_label
        self._run_label = run_label
        self.series = tuple(series)
        self.view_controls = dict(view_controls or {})
        toggle, self.xlabels = x_axis_toggle(x_toggle, xlabel)
        if toggle is not None:
            self.view_controls["x"] = toggle
        self.summary = summary
        self.marks = marks
        self.panel = panel
        self.panel_axes = panel_axes
        self.shared_y = shared_y
        self.seeds = seeds
        self._axes = dict(ylabel=ylabel, y2label=y2label)
        self._make_figures(renderer, xlabel)
        self.log_path = run_log_path(name)
        replayed = load_runs(self.log_path, max_history) if replay else []
        self.history = RunHistory(replayed, max_history, color_roles)
        self.subtitle = ""  # the data set, under the title
        self.front_end_notice = ""  # set when plotly could not display and matplotlib took over
        self.redraws = 0  # figure updates sent: each is one batched message
        self.rebuilds = 0  # deaf plotly figures replaced (_heal_deaf_figures)
        self.pacing = RedrawPacing()  # how often a streaming run redraws
        self._shown = False  # displayed in a notebook (_ipython_display_)
        self._suppress = False  # run_blocking sets controls without starting runs
        self._draw_lock = threading.Lock()
        self.worker = Worker(self._execute, f"LiveRun-{name}", self._failed)
        self._build_widgets(auto_run)
        self._set_presenter(draw=False)
        self.draw()
        self.pacing.draw_cost = 0.0  # that first draw pays one-off set-up
        register(name, self)  # a re-run cell's new widget stops the old one's training
        hook_kernel_interrupt()
        # while the student reads, not after the first slider move (see lessons.warmup.warm_up)
        threading.Thread(target=warm_up, daemon=True, name="lessons-warm-up").start()

    def _make_figures(self, renderer: str | None, xlabel: str) -> None:
        self.renderer_name = choose_renderer(renderer)
        self.figure = make_figure(self.renderer_name, xlabel=xlabel, **self._axes)
        # a front end that renders the figure counts its views (not tracked without a kernel)
        self._track_views = self.renderer_name == "plotly" and in_kernel()
        if self._track_views:
            self.figure.widget._view_count = 0
        self.panel_figure = (
            make_figure(self.renderer_name, **(self.panel_axes or {})) if self.panel else None
        )

    def _build_widgets(self, auto_run: bool) -> None:
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
        self.summary_html = W.HTML()
        self.status = W.HTML(value=status.status_html(status.READY))
        self.status_text = status.READY
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
            w.observe(lambda _: self.draw(), names="value")
        row = W.Layout(flex_flow="row wrap")
        buttons = [self.run_button, self.stop_button, self.clear_button, self.export_button]
        self.widget = W.VBox(
            [
                W.HBox([*self.controls.values(), *self.view_controls.values()], layout=row),
                W.HBox([*buttons, self.presenter], layout=row),
                self.status,
                W.HBox([self.progress, self.progress_text]),
                self.figure.widget,
                self.summary_html,
                *([self.panel_figure.widget] if self.panel_figure else []),
                self.export_links,
            ]
        )

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
        free_openmp_threads()  # else CPU steps in the worker thread run slower
        self.worker.submit(dict(values))

    def stop(self) -> None:
        self.worker.stop()

    def clear(self) -> None:
        """Forget the faded runs on screen, keeping the newest request's (the run log keeps
        them all)."""
        self.history.clear()
        self.draw()

    def wait(self, timeout: float | None = None) -> bool:
        return self.worker.wait(timeout)

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
    def runs(self) -> list[RunRecord]:
        """The runs on the figure, oldest first."""
        return self.history.runs

    @property
    def last_run(self) -> RunRecord | None:
        """The run the last request made (None: none)."""
        return self.history.last_run

    @property
    def last_group(self) -> dict[str, RunRecord]:
        """The runs of the last request, by name."""
        return self.history.last_group

    @property
    def busy(self) -> bool:
        return self.worker.busy

    @property
    def threads_started(self) -> int:
        return self.worker.threads_started

    def traces(self) -> list[dict]:
        return self.figure.traces()

    def export(self, folder: str | Path | None = None, stem: str | None = None) -> dict:
        """Save what the figure shows, every run on it: PNG (slides), standalone HTML
        (interactive handouts, no kernel needed) and the runs' records as CSV. Returns
        {"png": path, "html": path, "csv": path, ...}."""
        folder = Path(folder) if folder is not None else data_mod.data_dir() / "exports"
        stem = stem or f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        with self._draw_lock:
            scene = self.scene()
            runs = list(self.runs)
            panel = self._panel_scene() if self.panel else None
        xlabel = self.xlabels[self.view().get("x", "samples")]
        axes = dict(xlabel=xlabel, **self._axes)
        scale = self.figure.scale
        yrange = shared_yrange(scene[0], panel[0]) if self.shared_y and panel else None
        return export_files(
            folder, stem, scene, runs, axes, scale, panel, self.panel_axes, yrange=yrange
        )

    def scene(self) -> tuple[list[Trace], str, list[Mark]]:
        """What the figure shows: a trace per run and series, the title and the marks."""
        runs = list(self.runs)
        legend = plan_legend(runs)
        # under the title, the settings every run shares (the legend says what differs) and
        # the data set, each on a line of its own: at the end of one line they ran off
        lines = [self.title, legend.title_line(), self.subtitle]
        title = "\n".join(line for line in lines if line)
        lw = 2.0 if self.presenter.value else 1.0
        traces = run_traces(runs, self.series, self.view(), lw, legend)
        marks = list(self.marks(self)) if self.marks else []
        return traces, title, marks

    # ---- what a Request calls (widgets.request)
    def say(self, text: str, level: str = "info") -> None:
        """Show ``text`` in the status line, in the colour of ``level``; ``status_text`` keeps
        it as plain text, for a notebook cell to print."""
        self.status_text = text
        self.status.value = status.status_html(text, level)

    def label_run(self, name: str, config: TrainConfig, values: dict) -> str:
        """The legend label of the run ``name`` of a request, trained with ``config``."""
        if self._run_label is not None:
            return self._run_label(name, config, values)
        label = self.label(values)
        return f"{name}: {label}" if name else label

    def show_progress(self, step: int, total: int, elapsed: float) -> None:
        self.progress.max = max(1, total)
        self.progress.value = min(step, total)
        self.progress_text.value = status.progress(step, total, elapsed)

    def redraw_interval(self, now: float) -> float:
        """Seconds a streaming run waits between redraws (widgets.pacing), within the
        figure's bounds."""
        return self.pacing.interval(now, self.figure.min_interval, self.figure.max_interval)

    def redraw_due(self, last_draw: float, step: int, total: int, t0: float) -> float:
        """While records stream in: the progress line and the figure, once redraw_interval
        has passed since ``last_draw``; the time of the last redraw."""
        now = time.perf_counter()
        if now - last_draw < self.redraw_interval(now):
            return last_draw
        self.show_progress(step, total, now - t0)
        self.draw()
        return now

    def draw(self) -> None:
        """Redraw every run (thread-safe: the worker and view controls both call it)."""
        with self._draw_lock:
            t0 = time.perf_counter()
            traces, title, marks = self.scene()
            panel = self._panel_scene() if self.panel_figure is not None else None
            if self.shared_y and panel is not None:
                yrange = shared_yrange(traces, panel[0])
                self.figure.set_yrange(yrange)
                self.panel_figure.set_yrange(yrange)
            self.figure.set_xlabel(self.xlabels[self.view().get("x", "samples")])
            self.figure.draw(traces, title, marks)
            if self.summary is not None:
                self.summary_html.value = self._summary()
            if panel is not None:
                self.panel_figure.draw(*panel)
            self.redraws += 1
            self.pacing.draw_cost = time.perf_counter() - t0

    # ---- internals
    def _summary(self) -> str:
        """The lesson's summary; while the request still trains, marked as partial."""
        text = self.summary(self)
        if text and any(r.status == "running" for r in self.last_group.values()):
            text += "<i>(partial: the request is still training)</i>"
        return text

    def _execute(self, values: dict, stop: threading.Event) -> None:
        """The worker's job: one request (widgets.request)."""
        self.history.new_request()
        self.pacing.restart()  # redraw_interval starts the clock at the first record
        if Request(self, values, stop).execute() and self._track_views:
            # the browser acknowledges edits within milliseconds
            timer = threading.Timer(5.0, self._heal_deaf_figures)
            timer.daemon = True
            timer.start()

    def _failed(self, e: Exception) -> None:
        self.say(status.describe_error(e), "error")
        traceback.print_exc(file=sys.stderr)

    def _on_change(self, change) -> None:
        if self._suppress:
            return
        owner = change.get("owner")
        if change.get("name") in getattr(owner, "_property_lock", {}):  # a person moved it
            self._check_front_end()
        self.request(self.values())

    def _export_clicked(self) -> None:
        try:
            paths = self.export()
        except Exception as e:  # a full disk or a read-only folder: say so, stay usable
            self.say(*status.export_failed(e))
            return
        self.say(*status.exported(paths))

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
            self.draw()

    # ---- front ends that do not show plotly (widgets.front_end)
    def _check_front_end(self) -> None:
        if self._track_views and not self.figure.widget._view_count:
            front_end.fall_back_to_matplotlib(self)

    def _heal_deaf_figures(self) -> int:
        """Rebuild the plotly figures whose view applied none of their updates; how many."""
        if not self._shown or self.rebuilds >= self.MAX_REBUILDS:
            return 0
        with self._draw_lock:
            rebuilt = front_end.rebuild_deaf_figures(self)
        self.rebuilds += rebuilt
        return rebuilt
