"""What the renderers write on a figure: log axes' tick labels and titles that fit."""

import pytest

from widgets.figure import Trace, log_ticks, wrap_title
from widgets.mpl_figure import MatplotlibFigure
from widgets.plotly_figure import PlotlyFigure

NOISE = [20.0, 30.0, 45.0, 600.0]  # lesson 4's noise scale: a decade and a half
TRUST = [0.002, 0.0035, 0.009]  # lesson 3's trust ratios: under a decade
WIDE = [1e-4, 0.3, 10.0]  # five decades


def test_log_ticks_thin_out_with_the_decades_spanned():
    assert log_ticks(TRUST) == "digits"
    assert log_ticks(NOISE) == "1-2-5"
    assert log_ticks(WIDE) == "decades"
    assert log_ticks([0.0, None, float("nan")]) == "1-2-5"  # nothing positive to span


@pytest.mark.parametrize(
    ("ys", "dtick"), [(NOISE, "D2"), (TRUST, "D1"), (WIDE, 1)], ids=["noise", "trust", "wide"]
)
def test_plotly_log_axis_labels_its_ticks_in_full(ys, dtick):
    fig = PlotlyFigure(xlabel="epoch", ylabel="g", ylog=True)
    fig.draw([Trace("g", list(range(len(ys))), ys)])
    # tickformat makes plotly write 20, 30, 600 where a bare dtick "D" writes 2, 3, 6
    assert fig.fig.layout.yaxis.dtick == dtick and fig.fig.layout.yaxis.tickformat == "~g"
    fig.draw([Trace("g", list(range(len(ys))), [y * 10 for y in ys])])
    assert fig.fig.layout.yaxis.dtick == dtick  # the same span: the same ticks


def _labels(ax) -> list[str]:
    lo, hi = ax.get_ylim()
    return [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]


def test_matplotlib_log_axis_labels_its_ticks_in_full():
    fig = MatplotlibFigure(xlabel="epoch", ylabel="g", ylog=True)
    fig.draw([Trace("g", [1, 2, 3, 4], NOISE)])
    assert _labels(fig.ax) == ["20", "50", "100", "200", "500"]
    assert all(t.get_text() == "" for t in fig.ax.get_yticklabels(minor=True))
    fig.draw([Trace("g", [1, 2, 3], TRUST)])
    assert _labels(fig.ax) == [
        "0.002",
        "0.003",
        "0.004",
        "0.005",
        "0.006",
        "0.007",
        "0.008",
        "0.009",
    ]
    fig.draw([Trace("g", [1, 2, 3], WIDE)])
    assert _labels(fig.ax) == ["0.0001", "0.001", "0.01", "0.1", "1", "10"]


def test_matplotlib_log_x_axis_too():
    fig = MatplotlibFigure(xlabel="B", ylabel="v", xlog=True)
    fig.draw([Trace("v", [8, 64, 512], [3.0, 2.0, 1.5])])
    lo, hi = fig.ax.get_xlim()
    shown = [t.get_text() for t in fig.ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert shown == ["10", "20", "50", "100", "200", "500"]


LONG = "Trust ratio per tensor: LAMB (b=256): lamb, lr=0.02, betas=(0.9, 0.999), wd=0.01, cap=10"


def test_wrap_title_wraps_sooner_at_a_larger_font():
    assert wrap_title("short title", 640, 16) == "short title"
    normal, presenter = wrap_title(LONG, 600, 16), wrap_title(LONG, 600, 16 * 1.6)
    assert normal.count("\n") < presenter.count("\n")
    for text in (normal, presenter):
        assert text.replace("\n", " ") == LONG  # every word kept, in order
    assert all(len(line) <= 600 / (0.55 * 16 * 1.6) for line in presenter.split("\n"))
    assert wrap_title("first\nsecond", 640, 16) == "first\nsecond"  # lines kept


def test_plotly_wraps_a_long_title_into_its_subtitle():
    fig = PlotlyFigure(xlabel="samples", ylabel="loss")
    fig.draw([Trace("a", [1, 2], [1, 2])], "A short title\nthe data")
    assert fig.fig.layout.title.text == "A short title"
    assert fig.fig.layout.title.subtitle.text == "the data"
    low = fig.fig.layout.margin.t
    fig.set_scale(1.6)
    fig.draw([Trace("a", [1, 2], [1, 2])], LONG + "\nthe data")
    title, subtitle = fig.fig.layout.title.text, fig.fig.layout.title.subtitle.text
    assert len(title) < len(LONG) and LONG.startswith(title)
    assert subtitle.endswith("<br>the data") and subtitle.count("<br>") >= 1
    assert " ".join([title, *subtitle.split("<br>")[:-1]]) == LONG
    # room for every subtitle line above the plot
    assert fig.fig.layout.margin.t >= low + 1.6 * 12 * (subtitle.count("<br>"))
    assert fig.title() == LONG + "\nthe data"  # what was asked for, unwrapped


def test_matplotlib_wraps_a_long_title_in_presenter_mode():
    fig = MatplotlibFigure(xlabel="samples", ylabel="loss")
    fig.draw([Trace("a", [1, 2], [1, 2])], LONG)
    normal = fig.ax.get_title().count("\n")
    fig.set_scale(1.6)
    fig.draw([Trace("a", [1, 2], [1, 2])], LONG)
    assert fig.ax.get_title().count("\n") > normal
    renderer = fig.fig.canvas.get_renderer()
    box = fig.ax.title.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.fig.bbox.x1  # inside the image
