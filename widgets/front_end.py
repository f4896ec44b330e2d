"""What a LiveRun does when the browser does not show its plotly figure.

Two ways it fails. A front end without plotly's code (Colab, an old or locked-down Jupyter)
never makes a view of the figure: at the first slider moved in the browser the LiveRun draws
with matplotlib into an image from then on. And anywidget drops every message to a figure
whose code loaded slowly (a busy machine, a cold browser): the view stays empty, and the
figure is rebuilt as a new widget whose first state carries every curve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from widgets import status
from widgets.mpl_figure import MatplotlibFigure
from widgets.plotly_figure import PlotlyFigure

if TYPE_CHECKING:
    from widgets.live import LiveRun


def fall_back_to_matplotlib(live: LiveRun) -> None:
    """Replace the plotly figure (and panel) of ``live`` by matplotlib ones, and say why."""
    live._track_views = False
    new = MatplotlibFigure(xlabel=live.figure.xlabel(), **live._axes)
    new.set_scale(live.figure.scale)
    swap_figure(live, "figure", new)
    live.renderer_name = "matplotlib"
    if live.panel_figure is not None:
        panel = MatplotlibFigure(**(live.panel_axes or {}))
        panel.set_scale(live.panel_figure.scale)
        swap_figure(live, "panel_figure", panel)
    live.draw()
    live.front_end_notice = status.FRONT_END_NOTICE


def rebuild_deaf_figures(live: LiveRun) -> int:
    """Replace each plotly figure of ``live`` whose view applied none of its updates
    (PlotlyFigure.deaf) with a rebuilt one, so the curves drawn so far appear; how many.
    A figure rebuilt while the browser was only slow costs one redraw of the same curves."""
    rebuilt = 0
    for attr in ("figure", "panel_figure"):
        old = getattr(live, attr)
        if isinstance(old, PlotlyFigure) and old.deaf():
            swap_figure(live, attr, old.rebuilt())
            rebuilt += 1
    return rebuilt


def swap_figure(live: LiveRun, attr: str, new) -> None:
    """Put figure ``new`` in the place of ``live.<attr>``, on screen too."""
    old = getattr(live, attr)
    live.widget.children = [new.widget if c is old.widget else c for c in live.widget.children]
    setattr(live, attr, new)
