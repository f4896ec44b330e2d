"""Lesson 1's widgets, driven headless: set the sliders, read the figures."""

import math

import pytest

from lessons import ema as E
from widgets import discounting as D
from widgets.figure import Trace

pytestmark = pytest.mark.usefixtures("private_run_log")


@pytest.mark.parametrize("renderer", ["plotly", "matplotlib"])
def test_explorer_redraws_weights_marks_and_bias_correction(renderer):
    ex = D.EMAExplorer(beta=0.9, steps=20, renderer=renderer)
    shown = {t["uid"]: t for t in ex.weights_fig.traces()}
    assert shown["weights"]["points"] == 40  # four windows of 10 steps
    marks = ex.weights_fig.marks()
    assert marks[0]["x"] == pytest.approx(E.half_life(0.9))
    assert marks[1]["x"] == pytest.approx(10.0)
    ex.beta.value = 0.999  # a user moves the slider
    marks = ex.weights_fig.marks()
    assert marks[0]["x"] == pytest.approx(692.8, rel=1e-4) and "693" in marks[0]["label"]
    assert {t["uid"]: t for t in ex.weights_fig.traces()}["weights"]["points"] == 4000
    assert "window 1,000" in ex.weights_fig.title()
    bias = {t["uid"]: t for t in ex.bias_fig.traces()}
    assert bias["debiased"]["points"] == bias["raw"]["points"] == 20
    ex.steps.value = 100
    assert {t["uid"]: t for t in ex.bias_fig.traces()}["raw"]["points"] == 100


def test_explorer_reaches_the_landmark_betas():
    ex = D.EMAExplorer()
    values = [v for _, v in ex.beta.options]
    assert {0.5, 0.9, 0.99, 0.999} <= set(values)
    gaps = [-math.log10(1 - b) for b in values]
    assert gaps == sorted(gaps)  # monotone on the log10(1 - beta) scale


def test_bias_correction_figure_numbers():
    ex = D.EMAExplorer(beta=0.9, steps=10, renderer="plotly")
    traces = {t.meta: t for t in ex.bias_fig.fig.data}
    x = ex.signal[:10]
    assert list(traces["raw"].y) == pytest.approx(E.ema(x, 0.9).tolist())
    assert list(traces["debiased"].y) == pytest.approx(E.ema(x, 0.9, debias=True).tolist())
    assert traces["total"].y[0] == pytest.approx(0.1)


def test_beta1_reruns_training_and_smoothing_only_redraws():
    live = D.live_ema(renderer="plotly")
    first = live.run_blocking(beta1=0.9, timeout=120)
    assert first.status == "done" and first.settings["beta1"] == 0.9
    traces = {t.meta: t for t in live.figure.fig.data}
    raw = [r.loss for r in first.records if r.kind == "train"]
    smooth = list(traces[f"{first.id}:loss_ema"].y)
    assert smooth == pytest.approx(E.ema(raw, 0.9, debias=True).tolist())
    marks = live.figure.marks()
    assert [m["label"].split()[0] for m in marks] == ["half-life", "mean"]
    last = [r for r in first.records if r.kind == "train"][-1]
    end, batch = last.samples, last.batch
    assert marks[0]["x"] == pytest.approx(end - E.half_life(0.9) * batch)
    assert marks[1]["x"] == pytest.approx(end - 9.0 * batch)  # beta/(1-beta) = 9 steps
    # the smoothing slider: no new run, new curve, new marks
    started, n_runs = live.threads_started, len(live.runs)
    live.view_controls["smoothing"].value = 0.5
    assert live.threads_started == started and len(live.runs) == n_runs and not live.busy
    smooth2 = list({t.meta: t for t in live.figure.fig.data}[f"{first.id}:loss_ema"].y)
    assert smooth2 == pytest.approx(E.ema(raw, 0.5, debias=True).tolist())
    assert live.figure.marks()[0]["x"] == pytest.approx(end - 1.0 * batch)  # half-life 1 step
    # beta1: a new run with the new momentum, the old one faded
    second = live.run_blocking(beta1=0.5, timeout=120)
    assert second.id != first.id and second.status == "done"
    opacity = {t["uid"]: t["opacity"] for t in live.traces()}
    assert opacity[f"{second.id}:loss_ema"] == 1.0 > opacity[f"{first.id}:loss_ema"]


def test_adam_choice_trains_with_adam_betas():
    live = D.live_ema(renderer="matplotlib")
    cfg = live.make_config({"optimizer": "adam", "beta1": 0.8})
    assert cfg.optimizer == "adam" and cfg.betas == (0.8, 0.999)
    run = live.run_blocking(optimizer="adam", beta1=0.8, timeout=120)
    assert run.status == "done"


@pytest.mark.parametrize("beta", [0.9, 0.99])
def test_cumulative_line_reads_the_readouts_weight_at_the_window(beta):
    """The line at k is the weight of the k newest values, as the readout's 1 - beta^window."""
    ex = D.EMAExplorer(beta=beta, renderer="plotly")
    cum = {t.meta: t for t in ex.weights_fig.fig.data}["cumulative"]
    window = round(E.effective_window(beta))
    at_window = cum.y[list(cum.x).index(window)]
    assert at_window == pytest.approx(1 - beta**window)
    assert f"1 - beta^window = <b>{at_window:.3f}</b>" in ex.readout.value
    assert cum.y[0] == 0.0  # no value yet, no weight


def _lag_marks(smoothing: float):
    """lag_marks for a finished run of 100 steps of batch 64 at this smoothing beta."""
    from types import SimpleNamespace

    records = [
        SimpleNamespace(kind="train", samples=64 * (i + 1), batch=64, step=i + 1)
        for i in range(100)
    ]
    live = SimpleNamespace(
        view=lambda: {"smoothing": smoothing}, runs=[SimpleNamespace(records=records)]
    )
    return D.lag_marks(live)


@pytest.mark.parametrize("smoothing", [0.8, 0.9, 0.95])
def test_half_life_and_mean_lag_labels_do_not_overlap(smoothing):
    from widgets.mpl_figure import MatplotlibFigure
    from widgets.plotly_figure import PlotlyFigure

    marks = _lag_marks(smoothing)
    assert [m.label.split()[0] for m in marks] == ["half-life", "mean"]
    trace = Trace("loss", [64 * (i + 1) for i in range(100)], [2.0 - i / 100 for i in range(100)])
    # plotly: two rows further apart than a label is high, each label left of its line
    plotly = PlotlyFigure(xlabel="samples", ylabel="loss")
    plotly.draw([trace], "title", marks)
    first, second = plotly.fig.layout.annotations
    assert abs(second.yshift - first.yshift) >= 1.3 * first.font.size
    assert first.xanchor == second.xanchor == "right"
    # matplotlib: the drawn labels' boxes are apart, and neither crosses its line
    mpl = MatplotlibFigure(xlabel="samples", ylabel="loss")
    mpl.draw([trace], "title", marks)
    renderer = mpl.fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in mpl.ax.texts]
    assert not boxes[0].overlaps(boxes[1])
    for box, m in zip(boxes, marks):
        line_x = mpl.ax.transData.transform((m.x, 0))[0]
        assert box.x1 <= line_x + 1
