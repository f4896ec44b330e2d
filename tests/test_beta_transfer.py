"""Lesson 2's widgets driven headless."""

import csv
from dataclasses import replace

import pytest

from lessons import scaling as S
from widgets import beta_transfer as BT

pytestmark = pytest.mark.usefixtures("private_run_log")


@pytest.mark.parametrize("renderer", ["plotly", "matplotlib"])
def test_per_sample_weights_follow_the_sliders(renderer):
    w = BT.PerSampleWeights(beta=0.9, batch=8, renderer=renderer)
    assert w.figure.marks()[0]["x"] == pytest.approx(8 * 6.578813, rel=1e-5)
    w.batch.value = 16
    assert w.figure.marks()[0]["x"] == pytest.approx(16 * 6.578813, rel=1e-5)
    assert "0.99344" in {t["uid"]: t for t in w.figure.traces()}["per-sample"]["name"]


def test_four_curves_gaps_and_the_x_toggle():
    live = BT.beta_transfer(renderer="plotly")
    runs = live.run_blocking(timeout=300)
    assert list(runs) == ["baseline (B=256)", "naive (b=32)", "lr only (b=32)", "lamb (b=32)"]
    base, naive, lr_only, moved = runs.values()
    # the legend says which batch each run used, and the baseline's does not read "batch=32"
    assert base.label == "baseline (B=256): lamb, lr=0.035, betas=(0.9, 0.99)"
    assert "batch=32" not in base.label
    # the legend line says what differs, the hover text the whole label, the title the rest
    drawn = {t.meta: t for t in live.figure.fig.data}
    shown = drawn[f"{base.id}:loss"]
    assert shown.name == "baseline (B=256): lr=0.035, betas=(0.9, 0.99) (2 seeds)"
    assert shown.hovertemplate.startswith(base.label)
    assert "all runs: lamb" in live.figure.title().split("\n")
    # the baseline trains from two seeds: its other seed is drawn, and measures the spread
    (other,) = base.seed_runs
    assert other.settings == base.settings and f"{other.id}:loss" in drawn
    assert not any(r.seed_runs for r in (naive, lr_only, moved))
    cfg = live.make_config(live.values())
    assert cfg["lamb (b=32)"].lr == pytest.approx(0.035 / 8)
    assert cfg["lamb (b=32)"].betas == pytest.approx((0.9**0.125, 0.99**0.125))
    assert cfg["naive (b=32)"].lr == cfg["baseline (B=256)"].lr
    # lr only: the rule's learning rate with the baseline's betas
    assert cfg["lr only (b=32)"].lr == cfg["lamb (b=32)"].lr
    assert cfg["lr only (b=32)"].betas == cfg["baseline (B=256)"].betas
    assert lr_only.label == f"lr only (b=32): lamb, lr={0.035 / 8:.3g}, betas=(0.9, 0.99)"
    measured = BT.gaps(live)
    assert set(measured) == {"naive (b=32)", "lr only (b=32)", "lamb (b=32)", BT.SEED_SPREAD}
    spread = S.curve_gap(*base.series()["loss"], *other.series()["loss"])
    assert measured[BT.SEED_SPREAD] == pytest.approx(spread) and spread > 0
    naive_in_spreads = f"{measured['naive (b=32)'] / spread:.1f} seed spreads"
    assert "naive (b=32)" in live.summary_html.value
    assert naive_in_spreads in live.summary_html.value
    expect = S.curve_gap(*base.series()["loss"], *moved.series()["loss"])
    assert measured["lamb (b=32)"] == pytest.approx(expect)
    # the x toggle: parameter updates instead of samples, no new run
    started = live.threads_started
    live.view_controls["x"].value = "step"
    xs = {t.meta: t.x for t in live.figure.fig.data}
    for r in (base, naive):
        assert list(xs[f"{r.id}:loss"]) == [m.step for m in r.records if m.kind == "train"]
    assert xs[f"{naive.id}:loss"][-1] > 7 * xs[f"{base.id}:loss"][-1]  # ~8x the updates
    assert live.figure.fig.layout.xaxis.title.text == "parameter updates"
    assert live.threads_started == started and not live.busy


def test_each_run_is_labelled_with_what_it_trained_with(tmp_path):
    """The baseline and the naive run train without the rule: neither their legend labels
    nor their CSV rows may name it, and the transferred run's label gives what it used."""
    live = BT.beta_transfer(renderer="matplotlib")
    make = live.make_config
    live.make_config = lambda v: {k: replace(c, max_steps=3) for k, c in make(v).items()}
    runs = live.run_blocking(rule="sgd-linear", timeout=300)
    # sgd-linear moves the lr alone: no separate lr-only run, it would be the same run
    assert list(runs) == ["baseline (B=256)", "naive (b=32)", "sgd-linear (b=32)"]
    base, naive, moved = runs.values()
    for run in (base, naive):
        assert "rule" not in run.label and "sgd-linear" not in run.label, run.label
    assert naive.label == "naive (b=32): lamb, lr=0.035, betas=(0.9, 0.99)"
    assert moved.label == f"sgd-linear (b=32): lamb, lr={0.035 / 8:.3g}, betas=(0.9, 0.99)"
    names = {t["uid"]: t["name"] for t in live.traces()}
    assert names[f"{base.id}:loss"] == "baseline (B=256): lr=0.035 (2 seeds)"
    assert names[f"{moved.id}:loss"] == f"sgd-linear (b=32): lr={0.035 / 8:.3g}"
    assert "all runs: lamb, betas=(0.9, 0.99)" in live.figure.title().split("\n")
    rows = list(csv.DictReader(live.export(tmp_path, stem="runs")["csv"].open()))
    labels = {r["run"]: r["label"] for r in rows}
    assert labels[str(base.id)] == base.label and labels[str(naive.id)] == naive.label


def test_an_impossible_rule_is_a_message():
    live = BT.beta_transfer(renderer="matplotlib")
    assert live.run_blocking(base_batch=8, batch=256, rule="adam-sqrt", timeout=60) is None
    assert "Impossible setting" in live.status.value and "1 - beta" in live.status.value


def test_the_rule_menu_fits_this_lessons_optimizers():
    """No 'invariant-adam' (this lesson has no invariant optimizer); SGD's momentum is carried
    by the 'lamb' rule with its step per sample, and 'adam-sqrt' is refused for it with what
    to choose instead."""
    live = BT.beta_transfer(renderer="matplotlib")
    assert [r for _, r in live.controls["rule"].options] == ["lamb", "adam-sqrt", "sgd-linear"]
    cfg = live.make_config({**live.values(), "optimizer": "sgd", "rule": "lamb"})
    moved = cfg["lamb (b=32)"]
    assert moved.momentum == pytest.approx(0.9**0.125)
    assert moved.lr == pytest.approx(0.035 * S.momentum_lr_factor(0.9, 0.125))
    assert live.run_blocking(optimizer="sgd", rule="adam-sqrt", timeout=60) is None
    assert "Impossible setting" in live.status.value and "use &#x27;lamb&#x27;" in live.status.value


def test_each_role_keeps_its_colour_across_requests():
    """Lesson 2's baseline was red, then grey, then green: a run's colour now comes from its
    role, the same in every request, whatever the batches and the rule."""
    live = BT.beta_transfer(renderer="plotly")
    make = live.make_config
    live.make_config = lambda v: {k: replace(c, max_steps=3) for k, c in make(v).items()}
    first = live.run_blocking(timeout=300)  # B=256 -> b=32 with the lamb rule
    second = live.run_blocking(batch=64, rule="sgd-linear", timeout=300)

    def colour(runs, role):
        return next(r.color for name, r in runs.items() if BT.role(name) == role)

    for role in ("baseline", "naive", "transferred"):
        assert colour(first, role) == colour(second, role), role
    assert len({r.color for r in first.values()}) == len(first)  # the roles apart
    drawn = {t.meta: t.line.color for t in live.figure.fig.data}
    assert all(drawn[f"{r.id}:loss"] == r.color for r in live.runs)  # as the figure draws


@pytest.mark.parametrize("renderer", ["plotly", "matplotlib"])
@pytest.mark.parametrize(("beta", "batch"), [(0.99, 64), (0.9999, 128), (0.5, 2)])
def test_per_sample_weights_reach_past_the_half_life(renderer, beta, batch):
    w = BT.PerSampleWeights(beta=beta, batch=batch, renderer=renderer)
    half_life = w.figure.marks()[0]["x"]
    if renderer == "plotly":
        shown = {t.meta: t for t in w.figure.fig.data}
        xs, ys = shown["per-sample"].x, shown["per-sample"].y
        assert len(xs) <= 4000
        # where the curves are plotted, they are the EMAs' weights
        per_sample = S.scale_beta(beta, batch, 1)
        assert ys[-1] == pytest.approx((1 - per_sample) * per_sample ** xs[-1])
        stairs = shown["batched"].y
        assert stairs[-1] == pytest.approx((1 - beta) * beta ** (xs[-1] // batch) / batch)
    else:
        xs = w.figure.ax.lines[0].get_xdata()
    assert max(xs) > 1.5 * half_life


def test_x_axis_toggle_keeps_its_label_beside_its_buttons():
    """In the wrapping row of controls the toggle moves as one: never shrunk (its buttons
    would wrap under its label), its label at its own width."""
    live = BT.beta_transfer(renderer="matplotlib")
    toggle = live.view_controls["x"]
    assert toggle.description == "x axis"
    assert toggle.layout.flex == "0 0 auto" and toggle.layout.width == "max-content"
    assert toggle.style.description_width == "initial"
