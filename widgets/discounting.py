"""01 discounting: an EMA explorer (no training) and a live run whose loss is smoothed by an EMA."""

from __future__ import annotations

import math

import ipywidgets as W
import numpy as np

from lessons import ema as E
from lessons.config import TrainConfig
from lessons.profiles import get_profile
from widgets.controls import STYLE
from widgets.figure import Mark, Trace, make_figure
from widgets.live import LiveRun
from widgets.scene import VAL_SERIES, Series

BETAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
MAX_POINTS = 4000  # weights drawn per curve; beyond it the curve is subsampled evenly


def steps_text(x: float) -> str:
    """3 significant digits, without exponents for large numbers of steps."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def beta_slider(value: float, description: str, options=BETAS) -> W.SelectionSlider:
    """A slider over betas spaced by log10(1 - beta): 0.5, 0.9, 0.99, 0.999 are all one
    keypress apart from their neighbours."""
    return W.SelectionSlider(
        options=[(f"{b:g}", b) for b in options],
        value=value,
        description=description,
        continuous_update=False,
        style=STYLE,
        layout=W.Layout(width="420px"),
    )


class EMAExplorer:
    """The weights an EMA puts on the past, their running total, half-life and window; and,
    for the first steps, the EMA of a noisy constant with and without bias correction."""

    def __init__(self, beta: float = 0.9, steps: int = 50, renderer: str | None = None):
        self.beta = beta_slider(beta, "beta")
        self.steps = W.IntSlider(
            value=steps,
            min=5,
            max=500,
            step=5,
            continuous_update=False,
            description="first steps",
            style=STYLE,
        )
        self.weights_fig = make_figure(
            renderer,
            xlabel="steps back (k)",
            ylabel="weight (1-beta) beta^k",
            y2label="cumulative weight",
            height=360,
        )
        self.bias_fig = make_figure(
            renderer, xlabel="step t", ylabel="EMA of a constant 1", height=320
        )
        self.readout = W.HTML()
        rng = np.random.default_rng(0)
        self.signal = 1.0 + 0.3 * rng.standard_normal(500)  # a noisy constant, mean 1
        self.beta.observe(lambda _: self.draw(), names="value")
        self.steps.observe(lambda _: self.draw_bias(), names="value")
        self.widget = W.VBox(
            [self.beta, self.readout, self.weights_fig.widget, self.steps, self.bias_fig.widget]
        )
        self.draw()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def draw(self) -> None:
        b = float(self.beta.value)
        h, win = E.half_life(b), E.effective_window(b)
        n = max(10, math.ceil(round(4 * win, 6)))  # round: 1/(1-0.9) is 10.000000000000002
        w = E.ema_weights(b, n)
        k = np.arange(n)
        if n > MAX_POINTS:  # keep the browser fast: an even subsample of the smooth curve
            keep = np.unique(np.linspace(0, n - 1, MAX_POINTS).astype(int))
            k, w_shown = k[keep], w[keep]
        else:
            w_shown = w
        # at k: the weight of the k newest values (0 to k-1 steps back), so that at the
        # window the line reads the readout's 1 - beta^window
        cum = 1 - b**k
        kind = "bar" if n <= 200 else "line"
        self.weights_fig.draw(
            [
                Trace(
                    "weights",
                    k.tolist(),
                    w_shown.tolist(),
                    name="weight of the value k back",
                    kind=kind,
                    color="#1f77b4",
                    opacity=0.8,
                ),
                Trace(
                    "cumulative",
                    k.tolist(),
                    cum.tolist(),
                    name="weight of the k newest values, 1 - beta^k",
                    axis="y2",
                    color="#d62728",
                ),
            ],
            title=f"beta = {b:g}: half-life {steps_text(h)} steps, "
            f"effective window {steps_text(win)} steps",
            marks=[
                Mark(h, f"half-life {steps_text(h)}", "#2ca02c"),
                Mark(win, f"window {steps_text(win)}", "#9467bd"),
            ],
        )
        self.readout.value = (
            f"beta = {b:g}: half-life ln(1/2)/ln(beta) = <b>{h:.4g}</b> steps "
            f"(approximation 0.693/(1-beta) = {math.log(2) / (1 - b):.4g}); "
            f"effective window 1/(1-beta) = <b>{win:.4g}</b> steps; weight of the values "
            f"inside the window 1 - beta^window = <b>{1 - b**win:.3f}</b>"
        )
        self.draw_bias()

    def draw_bias(self) -> None:
        b, t = float(self.beta.value), int(self.steps.value)
        x = self.signal[:t]
        steps = list(range(1, t + 1))
        self.bias_fig.draw(
            [
                Trace(
                    "signal",
                    steps,
                    x.tolist(),
                    name="samples (mean 1)",
                    mode="markers",
                    color="#bbbbbb",
                ),
                Trace(
                    "raw", steps, E.ema(x, b).tolist(), name="EMA, no correction", color="#d62728"
                ),
                Trace(
                    "debiased",
                    steps,
                    E.ema(x, b, debias=True).tolist(),
                    name="EMA / (1 - beta^t)",
                    color="#2ca02c",
                ),
                Trace(
                    "total",
                    steps,
                    (1 - b ** np.arange(1, t + 1)).tolist(),
                    name="total weight 1 - beta^t",
                    dash="dot",
                    color="#555555",
                ),
            ],
            title=f"The first {t} steps at beta = {b:g}: bias correction",
        )


SMOOTHING = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
MOMENTA = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


def smoothed_loss(run, view) -> tuple[list, list]:
    """The run's train loss through a debiased EMA with the smoothing slider's beta."""
    pts = [r for r in run.records if r.kind == "train"]
    beta = float(view.get("smoothing", 0.9))
    ys = [r.loss for r in pts]
    if beta > 0 and ys:
        ys = E.ema(np.asarray(ys), beta, debias=True).tolist()
    return [r.samples for r in pts], ys


def lag_marks(live: LiveRun) -> list[Mark]:
    """Where the smoothed curve's last point 'looks back to': its half-life and its mean lag
    beta/(1-beta), in samples, measured back from the newest point of the newest run."""
    beta = float(live.view().get("smoothing", 0))
    run = live.runs[-1] if live.runs else None
    pts = [r for r in run.records if r.kind == "train"] if run else []
    if beta <= 0 or not pts:
        return []
    end, batch = pts[-1].samples, pts[-1].batch
    h = E.half_life(beta)
    mean_lag = beta / (1 - beta)
    # labels to the left of their lines (the past), in two rows: close lags stay legible
    marks = [
        Mark(end - h * batch, f"half-life {steps_text(h)} steps back", "#2ca02c", side="left"),
        Mark(
            end - mean_lag * batch,
            f"mean lag {steps_text(mean_lag)} steps",
            "#9467bd",
            "dot",
            side="left",
        ),
    ]
    start = pts[0].samples
    return [m for m in marks if m.x >= start]  # a lag longer than the run is not drawn


def live_ema(profile: str | None = None, **kwargs) -> LiveRun:
    """Train with momentum SGD or Adam; beta1 re-runs training, the smoothing beta redraws."""
    p = get_profile(profile)
    controls = {
        "optimizer": W.Dropdown(
            options=[("SGD + momentum", "sgd"), ("Adam", "adam")],
            value="sgd",
            description="optimizer",
        ),
        "beta1": W.SelectionSlider(
            options=[(f"{m:g}", m) for m in MOMENTA],
            value=0.9,
            description="beta1 / momentum",
            continuous_update=False,
            style=STYLE,
        ),
    }
    view = {"smoothing": beta_slider(0.9, "smoothing beta (plot only)", SMOOTHING)}

    def make_config(v: dict) -> TrainConfig:
        beta1 = float(v["beta1"])
        if v["optimizer"] == "adam":
            return TrainConfig.from_profile(p.name, optimizer="adam", lr=2e-3, betas=(beta1, 0.999))
        return TrainConfig.from_profile(p.name, optimizer="sgd", momentum=beta1)

    series = (
        Series("loss", "raw loss", opacity=0.45, width=0.5),
        Series("loss_ema", "smoothed loss", compute=smoothed_loss),
        *VAL_SERIES,
    )
    return LiveRun(
        controls,
        make_config,
        name="01_discounting",
        series=series,
        view_controls=view,
        marks=lag_marks,
        title=f"Raw and EMA-smoothed training loss ({p.name} profile)",
        **kwargs,
    )
