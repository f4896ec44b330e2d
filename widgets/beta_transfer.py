"""02 deriving beta^(1/b): per-sample weights, and a baseline carried to another batch size."""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from lessons import scaling as S
from lessons.config import TrainConfig
from lessons.ema import half_life
from lessons.profiles import get_profile
from widgets.controls import STYLE, log_slider
from widgets.discounting import MAX_POINTS, beta_slider
from widgets.figure import Mark, Trace, make_figure
from widgets.live import LiveRun
from widgets.seeds import in_spreads

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# the rules this lesson's optimizers take ("invariant-adam" is notebook 05's); lessons.scaling
# refuses "adam-sqrt" for SGD's momentum with a message that says what to choose
RULES = (
    ("lamb: horizons and step per sample kept", "lamb"),
    ("adam-sqrt: lr sqrt(k), 1 - beta x k", "adam-sqrt"),
    ("sgd-linear: lr x k only", "sgd-linear"),
)


class PerSampleWeights:
    """The EMA at batch b (a staircase: a batch's samples share its weight) against the
    per-sample EMA with beta^(1/b): equal up to the flattening inside a batch."""

    def __init__(self, beta: float = 0.9, batch: int = 8, renderer: str | None = None):
        self.beta = beta_slider(beta, "per-step beta")
        self.batch = W.SelectionSlider(
            options=BATCHES[1:8], value=batch, description="batch b", continuous_update=False
        )
        self.figure = make_figure(
            renderer, xlabel="samples back", ylabel="weight per sample", height=340
        )
        for w in (self.beta, self.batch):
            w.observe(lambda _: self.draw(), names="value")
        self.widget = W.VBox([W.HBox([self.beta, self.batch]), self.figure.widget])
        self.draw()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def draw(self) -> None:
        beta, b = float(self.beta.value), int(self.batch.value)
        per_sample = S.scale_beta(beta, b, 1)
        h = half_life(per_sample)
        # four windows of samples, past the half-life marked; at most MAX_POINTS drawn
        n = int(max(40, np.ceil(4 * b / (1 - beta))))
        j = np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).astype(int))
        batched = S.per_sample_weights(beta, b, b)[0] * beta ** (j // b)
        self.figure.draw(
            [
                Trace(
                    "batched",
                    j.tolist(),
                    batched.tolist(),
                    name=f"beta = {beta:g} per step of batch {b}",
                    color="#1f77b4",
                ),
                Trace(
                    "per-sample",
                    j.tolist(),
                    (S.per_sample_weights(per_sample, 1, 1)[0] * per_sample**j).tolist(),
                    name=f"beta^(1/b) = {per_sample:.5g} per sample",
                    color="#d62728",
                    dash="dash",
                ),
            ],
            title=f"The same discount per sample: half-life {h:.3g} samples either way",
            marks=[Mark(h, "half-life", "#2ca02c")],
        )


SEED_SPREAD = "baseline, another seed"  # gaps()'s entry for the baseline's seed spread


def gaps(live: LiveRun) -> dict[str, float]:
    """For the newest request: each curve's gap to the baseline (mean |loss difference| over
    the second half, at equal samples seen; see lessons.scaling.curve_gap), and as
    SEED_SPREAD the gap between two seeds of the baseline itself: how far apart the same
    settings land, the unit the lesson states its claims in."""
    group = list(live.last_group.values())
    base = next((r for r in group if r.name.startswith("baseline")), None)
    if base is None or not base.records:
        return {}
    bx, by = base.series()["loss"]
    others = [r for r in group if r is not base] + base.seed_runs[:1]
    out = {}
    for r in others:
        if r.records:
            try:
                gap = S.curve_gap(bx, by, *r.series()["loss"])
            except ValueError:  # not far enough yet to overlap the second half
                continue
            out[SEED_SPREAD if r.lead is base else r.name] = gap
    return out


def gap_summary(live: LiveRun) -> str:
    measured = gaps(live)
    spread = measured.get(SEED_SPREAD)
    rows = "".join(
        f"<li>{html.escape(k)}: <b>{v:.3f}</b>"
        + (f" ({in_spreads(v, spread)})" if spread and k != SEED_SPREAD else "")
        + "</li>"
        for k, v in measured.items()
    )
    if not rows:
        return ""
    return (
        "Gap to the baseline (mean |loss difference| over the second half, at equal "
        f"samples seen). The baseline's other seed is the seed spread: a gap within about one "
        f"spread is noise, one several spreads away is not.<ul>{rows}</ul>"
    )


def role(name: str) -> str:
    """A run's role, whose colour it keeps whatever the batches and the rule."""
    kind = name.split(" (")[0]
    return kind if kind in ("baseline", "naive", "lr only") else "transferred"


def run_label(name: str, c: TrainConfig, values: dict) -> str:
    """A run's legend label: its name (which batch, which rule) and the hyperparameters it
    trained with; the baseline and the naive run used no rule, and their labels say none."""
    if c.optimizer == "sgd":
        moments = f"momentum={c.momentum:.3g}"
    else:
        moments = f"betas=({c.betas[0]:.3g}, {c.betas[1]:.3g})"
    return f"{name}: {c.optimizer}, lr={c.lr:.3g}, {moments}"


def _transfer_controls(batches: list[int]) -> dict[str, W.ValueWidget]:
    """The optimizer, the batches B and b, the lr at B and the rule that carries it."""
    return {
        "optimizer": W.Dropdown(
            options=[("LAMB", "lamb"), ("AdamW", "adamw"), ("SGD + momentum", "sgd")],
            value="lamb",
            description="optimizer",
        ),
        "base_batch": W.SelectionSlider(
            options=batches,
            value=256 if 256 in batches else batches[-1],
            description="baseline batch B",
            continuous_update=False,
            style=STYLE,
        ),
        "batch": W.SelectionSlider(
            options=batches,
            value=32,
            description="target batch b",
            continuous_update=False,
            style=STYLE,
        ),
        "lr": log_slider(0.035, "lr at B", -4, 0),
        "rule": W.Dropdown(options=RULES, value="lamb", description="rule"),
    }


def beta_transfer(profile: str | None = None, **kwargs) -> LiveRun:
    """Baseline (batch B, from two seeds) against naive, lr-only and transferred runs at
    batch b."""
    p = get_profile(profile)
    n_train = p.n_train  # Imagenette's count, or the generated set's
    batches = [b for b in BATCHES[3:] if b <= n_train // 4]
    epochs = max(p.epochs, 6)
    controls = _transfer_controls(batches)

    def make_config(v: dict) -> dict[str, TrainConfig]:
        opt, B, b = v["optimizer"], int(v["base_batch"]), int(v["batch"])
        hp = dict(lr=float(v["lr"]), betas=(0.9, 0.99), weight_decay=0.01)
        if opt == "sgd":
            hp = dict(lr=float(v["lr"]), momentum=0.9, weight_decay=5e-4)
        moved = S.transfer(hp, B, b, v["rule"])  # ValueError: shown in the status line
        # the rule's learning rate alone, the betas (momentum) left as at B: what the lr
        # contributes, and the full rule what the betas add (not drawn where the rule moves
        # the lr only)
        lr_only = {**hp, "lr": moved["lr"]}
        common = dict(optimizer=opt, epochs=epochs, eps=1e-6)
        hparams = {f"baseline (B={B})": (B, hp), f"naive (b={b})": (b, hp)}
        if lr_only != moved:
            hparams[f"lr only (b={b})"] = (b, lr_only)
        hparams[f"{v['rule']} (b={b})"] = (b, moved)
        return {
            name: TrainConfig.from_profile(p.name, batch=size, **common, **h)
            for name, (size, h) in hparams.items()
        }

    def label(v: dict) -> str:
        # the request, for the status line; each run's legend label is run_label's
        return (
            f"{v['optimizer']}, B={v['base_batch']} -> b={v['batch']}, "
            f"lr={v['lr']:.3g} at B, rule={v['rule']}"
        )

    return LiveRun(
        controls,
        make_config,
        name="02_beta_transfer",
        label=label,
        run_label=run_label,
        color_roles=role,
        seeds=lambda name: 2 if name.startswith("baseline") else 1,  # the seed spread
        summary=gap_summary,
        x_toggle=True,
        title=f"Carrying hyperparameters from batch B to b ({p.name} profile)",
        **kwargs,
    )
