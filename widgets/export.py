"""Export what a LiveRun shows: PNG for slides, a standalone HTML page for handouts, and
the runs' records as CSV; each file written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lessons import data as data_mod
from widgets.figure import Mark, Trace
from widgets.mpl_figure import MatplotlibFigure
from widgets.plotly_figure import PlotlyFigure
from widgets.runs import RunRecord, write_runs_csv


def export_files(
    folder: Path,
    stem: str,
    scene: tuple[list[Trace], str, list[Mark]],
    runs: Sequence[RunRecord],
    axes: dict,
    scale: float = 1.0,
    panel: tuple[list[Trace], str] | None = None,
    panel_axes: dict | None = None,
    yrange: tuple | None = None,
) -> dict[str, Path]:
    """Write <stem>.png, <stem>.html, <stem>.csv (and <stem>-panel.png and .html) into ``folder``;
    ``axes``: the figure's make_figure arguments; ``yrange``: the left axis' range the figure
    and its panel share (None: each fits its data). Returns {"png": path, ...}."""
    paths = {"png": folder / f"{stem}.png", "html": folder / f"{stem}.html"}
    png = MatplotlibFigure(**axes)
    png.set_scale(scale)
    png.set_yrange(yrange)
    png.draw(*scene)
    png.write_png(paths["png"])
    page = PlotlyFigure(**axes)
    page.set_scale(scale)
    page.set_yrange(yrange)
    page.draw(*scene)
    page.write_html(paths["html"])
    if panel is not None:
        paths["panel_png"] = folder / f"{stem}-panel.png"
        fig = MatplotlibFigure(**(panel_axes or {}))
        fig.set_yrange(yrange)
        fig.draw(*panel)
        fig.write_png(paths["panel_png"])
        paths["panel_html"] = folder / f"{stem}-panel.html"
        page = PlotlyFigure(**(panel_axes or {}))
        page.set_yrange(yrange)
        page.draw(*panel)
        page.write_html(paths["panel_html"])
    paths["csv"] = folder / f"{stem}.csv"
    data_mod.atomic_write(paths["csv"], lambda f: write_runs_csv(f, runs), binary=False)
    return paths
