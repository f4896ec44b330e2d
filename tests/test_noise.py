"""lessons.noise and batch-size schedules in the engine; lesson 4's widget headless."""

import numpy as np
import pytest

from lessons import noise as N
from lessons.callbacks import NoiseScale
from lessons.config import TrainConfig, epoch_train_loss
from lessons.profiles import get_profile
from lessons.train import run
from widgets import seeds as S


def test_noise_scale_formula():
    assert N.noise_scale(0.1, 9469, 128) == pytest.approx(0.1 * (9469 / 128 - 1))
    assert N.noise_scale(0.1, 9469, 128, 0.9) == pytest.approx(10 * 0.1 * (9469 / 128 - 1))
    assert N.noise_scale(0.1, 100, 100) == 0.0  # the full batch has no noise


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.1, 100, 200), "larger than the data set"),
        ((0.1, 100, 10, 1.0), "momentum"),
        ((0.1, 100, 10, -0.1), "momentum"),
        ((0.0, 100, 10), "lr must be a positive"),
        ((0.1, 100, 0), "batch must be a positive"),
    ],
)
def test_noise_scale_errors(args, match):
    with pytest.raises(ValueError, match=match):
        N.noise_scale(*args)


def test_the_noise_scale_predicts_sgds_stationary_variance():
    """SGD on N quadratics: the variance of w about the minimum is (T / 2) F / h with the
    mean-loss temperature T = noise_scale / N, including the finite-N factor (at B = N/2 the
    batch noise is half of F / B); the summed-cost g put where T belongs is N times off."""
    for lr, batch, n in ((0.02, 100, 200), (0.02, 10, 200), (0.01, 4, 1000)):
        var, f = N.sgd_stationary_variance(lr, batch, n, steps=40_000)
        g = N.noise_scale(lr, n, batch)
        assert var == pytest.approx(g / n * f / 2, rel=0.1), (lr, batch, n)
        assert var < 0.1 * g * f / 2  # the summed-cost g in the mean-loss flow: wrong
    var, f = N.sgd_stationary_variance(0.02, 100, 200, steps=40_000)
    assert var < 0.6 * 0.02 / 100 * f / 2  # lr / B alone misses the 1 - B/N


def test_momentum_batch_keeps_the_noise_scale():
    b = N.momentum_batch(32, 9469, 0.9, 0.99)
    assert 300 < b < 330  # about 10x (B << N), less the (N/B - 1)
    assert N.noise_scale(0.1, 9469, b, 0.99) == pytest.approx(
        N.noise_scale(0.1, 9469, 32, 0.9), rel=0.01
    )
    with pytest.raises(ValueError, match="new_momentum"):
        N.momentum_batch(32, 9469, 0.9, 1.0)


def test_schedules_share_one_noise_profile():
    n, lr, batch, k = 9469, 0.1, 64, 3
    plans = N.schedules(lr, batch, n, k, [3, 6, 8])
    for epoch in range(10):
        g = []
        for o in plans.values():
            e_lr = o["lr_at"](epoch) if "lr_at" in o else o["lr"]
            e_b = o["batch_at"](epoch) if "batch_at" in o else o["batch"]
            g.append(N.noise_scale(e_lr, n, e_b, 0.9))
        expect = N.noise_scale(lr, n, batch, 0.9) / k ** sum(epoch >= m for m in (3, 6, 8))
        # equal up to rounding the grown batch to a whole number of samples
        assert max(abs(x / expect - 1) for x in g) < 1 / batch, (epoch, g, expect)
    assert N.matching_batch(64, 9469, 3) == 189  # 9469 / (1 + (9469/64 - 1)/3) = 189.45
    with pytest.raises(ValueError, match="k must be > 1"):
        N.schedules(lr, batch, n, 1, [2])
    with pytest.raises(ValueError, match="milestones"):
        N.schedules(lr, batch, n, 2, [])


def test_a_batch_schedule_changes_the_number_of_updates_exactly(shapes_ci):
    n = shapes_ci.n_train
    plans = N.schedules(0.05, 32, n, 2, [1, 2])
    records = run(
        TrainConfig.from_profile(
            "ci", device="cpu", epochs=3, callbacks=[NoiseScale()], **plans["grow batch"]
        ),
        dataset=shapes_ci,
    )
    train = [r for r in records if r.kind == "train"]
    batches = [32, N.matching_batch(32, n, 2), N.matching_batch(32, n, 4)]
    assert len(train) == sum(n // b for b in batches)  # 62 + 31 + 16 for n = 2000
    assert sorted({r.batch for r in train}) == batches
    assert train[-1].samples == sum((n // b) * b for b in batches)
    for r in train:  # lr, batch and the noise scale recorded with every point
        assert r.extras["noise"] == pytest.approx(N.noise_scale(r.lr, n, r.batch, 0.9))
    assert [round(r.epoch, 6) for r in records if r.kind == "eval"] == [1.0, 2.0, 3.0]


def test_a_batch_larger_than_the_data_set_is_capped_with_a_notice(shapes_ci):
    n = shapes_ci.n_train
    c = TrainConfig.from_profile(
        "ci", device="cpu", epochs=2, batch=500, batch_at=lambda e: 500 if e == 0 else 10 * n
    )
    records = run(c, dataset=shapes_ci)
    train = [r for r in records if r.kind == "train"]
    assert train[-1].batch == n
    assert "capped" in train[0].extras["batch_notice"] and "[1]" in train[0].extras["batch_notice"]


def test_simple_noise_scale_recovers_a_known_value():
    rng = np.random.default_rng(0)
    d = 20
    mu = rng.standard_normal(d) * 0.3
    scales = rng.uniform(0.5, 2.0, d)  # a diagonal covariance
    truth = (scales**2).sum() / (mu**2).sum()

    def batch_sq_norm(b):
        g = mu + rng.standard_normal((b, d)) * scales
        return float((g.mean(0) ** 2).sum())

    small = [batch_sq_norm(8) for _ in range(4000)]
    big = [batch_sq_norm(128) for _ in range(4000)]
    est = N.simple_noise_scale(small, big, 8, 128, beta=None)
    assert est == pytest.approx(truth, rel=0.1)
    smoothed = N.simple_noise_scale(small, big, 8, 128, beta=0.999)
    assert smoothed == pytest.approx(truth, rel=0.25)
    with pytest.raises(ValueError, match="b_small < b_big"):
        N.simple_noise_scale(small, big, 128, 8)


@pytest.mark.usefixtures("private_run_log")
def test_schedules_widget_trains_three_runs_with_panels():
    from widgets import noise_scale as NS

    live = NS.schedules_live(renderer="plotly", seeds=1)  # one seed each: the panels' test
    runs = live.run_blocking(reference=False, timeout=300)
    assert list(runs) == ["decay lr", "grow batch", "hybrid"]
    counts = NS.update_counts(live)
    assert counts["grow batch"] < counts["hybrid"] < counts["decay lr"]
    assert "updates" in live.summary_html.value
    n = get_profile().n_train  # Smith et al.'s B proportional to 1 / (1 - m), for these settings
    for m in (0.0, 0.5, 0.99):
        assert f"{m:g}: batch {N.momentum_batch(32, n, 0.9, m):,}" in live.summary_html.value
    for name, r in runs.items():  # the witness lesson 4's self-check compares
        last = epoch_train_loss(r.records)[-1]
        row = f"{name}: {counts[name]:,} updates, last epoch's train loss {last:.3f}"
        assert row in live.summary_html.value, live.summary_html.value
    panel = {t["uid"]: t for t in live.panel_figure.traces()}
    assert set(panel) == {"noise:decay lr", "noise:grow batch", "noise:hybrid"}
    assert live.figure.fig.layout.xaxis.title.text == "epochs"  # the first x option
    live.view_controls["x"].value = "step"
    xs = {t.meta: t.x for t in live.figure.fig.data}
    assert xs[f"{runs['grow batch'].id}:loss"][-1] == counts["grow batch"]
    live.run_blocking(k=3, timeout=300)
    cfg = live.make_config(live.values())
    assert cfg["decay lr"].lr_at(6) == pytest.approx(NS.DEFAULTS["lr"] / 9)


@pytest.mark.usefixtures("private_run_log")
def test_schedules_widget_trains_the_null_run_and_seeds_by_default():
    from widgets import noise_scale as NS

    live = NS.schedules_live(renderer="plotly")
    # on by default: the null run is what lowering the noise buys, the lesson's claim
    assert live.controls[NS.REFERENCE].value is True
    runs = live.run_blocking(timeout=300)
    assert list(runs) == ["decay lr", "grow batch", "hybrid", NS.REFERENCE_NAME]
    # two seeds for each schedule the claim compares, one for hybrid
    assert {name: len(r.seed_runs) for name, r in runs.items()} == {
        "decay lr": 1,
        "grow batch": 1,
        "hybrid": 0,
        NS.REFERENCE_NAME: 1,
    }
    assert all(r.status == "done" for r in runs["grow batch"].seed_runs)
    ref = [m for m in runs[NS.REFERENCE_NAME].records if m.kind == "train"]
    assert {m.lr for m in ref} == {NS.DEFAULTS["lr"]} and {m.batch for m in ref} == {32}
    assert len({round(m.extras["noise"], 9) for m in ref}) == 1
    decay = [m.extras["noise"] for m in runs["decay lr"].records if m.kind == "train"]
    assert decay[-1] == pytest.approx(ref[-1].extras["noise"] / 4)  # k = 2, two milestones
    panel = {t["uid"] for t in live.panel_figure.traces()}
    assert f"noise:{NS.REFERENCE_NAME}" in panel and len(panel) == 4
    summary = live.summary_html.value
    assert f"{NS.REFERENCE_NAME}: " in summary
    spread = S.spread(runs["decay lr"], "train_loss")
    assert f"(seed spread {spread:.3f})" in summary, summary
    gap = S.mean_final(runs[NS.REFERENCE_NAME], "train_loss") - S.mean_final(
        runs["decay lr"], "train_loss"
    )
    assert f"{NS.REFERENCE_NAME} ends {gap:+.3f} from decay lr" in summary, summary
    curve = S.mean_curve(runs["decay lr"])  # the seeds' mean, epoch by epoch
    seeds = [runs["decay lr"], *runs["decay lr"].seed_runs]
    assert curve == pytest.approx(np.mean([epoch_train_loss(r.records) for r in seeds], axis=0))


def test_the_momentum_line_converts_the_base_batch():
    from widgets import noise_scale as NS

    line = NS.momentum_batches(32, 9469, 0.9)
    assert "0.99: batch 311" in line and "0: batch 3" in line and "0.9:" not in line


def test_noise_probe_measures_images_of_every_class_the_same_each_epoch(monkeypatch):
    """The training set is stored class by class, so its first n images hold a few classes
    only: the probe draws its images at random, and keeps them from epoch to epoch."""
    from types import SimpleNamespace

    import torch

    from lessons import measure as M

    seen = []
    monkeypatch.setattr(
        M, "measure_simple_noise_scale", lambda model, x, y, *a, **k: seen.append(y) or 1.0
    )
    ds = SimpleNamespace(
        train_x=torch.zeros(1000, 3, 4, 4, dtype=torch.uint8),
        train_y=torch.arange(10).repeat_interleave(100),  # class by class
    )
    probe = M.noise_probe(8, 64, n=200)
    for epoch in (0, 1):
        probe.epoch(SimpleNamespace(model=torch.nn.Conv2d(3, 1, 1), dataset=ds), epoch)
    assert len(seen[0]) == 200 and torch.bincount(seen[0], minlength=10).min() >= 10, seen[0]
    assert torch.equal(seen[0], seen[1])
