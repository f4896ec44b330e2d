"""Seed runs: the same settings from several seeds, drawn faintly beside their lead, kept in
the run log, and the spread a lesson states its claims against."""

import ipywidgets as W
import pytest

from lessons.config import Metrics, TrainConfig
from widgets import seeds as S
from widgets.live import LiveRun
from widgets.runs import RunRecord

pytestmark = pytest.mark.usefixtures("private_run_log", "shapes_ci")


def _run(run_id, val_loss, loss=2.0, status="done"):
    recs = [
        Metrics(kind="train", step=1, samples=10, epoch=1.0, loss=loss, batch=10, lr=0.1),
        Metrics(
            kind="eval",
            step=1,
            samples=10,
            epoch=1.0,
            val_loss=val_loss,
            val_acc=0.5,
            lr=0.1,
            loss=0.0,
            batch=10,
        ),
    ]
    return RunRecord(run_id, {}, f"run {run_id}", recs, status)


def test_expand_adds_the_next_seeds_after_each_lead():
    a, b = TrainConfig(seed=3), TrainConfig(seed=0)
    out, lead_of = S.expand({"a": a, "b": b}, lambda name: 3 if name == "a" else 1)
    assert list(out) == ["a", "a (seed 4)", "a (seed 5)", "b"]
    assert [c.seed for c in out.values()] == [3, 4, 5, 0]
    assert lead_of == {"a (seed 4)": "a", "a (seed 5)": "a"}


def test_spread_is_the_range_over_finished_seeds():
    lead = _run(1, 2.0)
    assert S.spread(lead, "val_loss") is None  # one seed: no spread
    for i, v in enumerate((2.3, 1.9)):
        seed_run = _run(2 + i, v)
        seed_run.lead = lead
        lead.seed_runs.append(seed_run)
    lead.seed_runs.append(_run(9, 50.0, status="stopped"))  # not finished: not counted
    assert S.spread(lead, "val_loss") == pytest.approx(0.4)
    assert S.mean_final(lead, "val_loss") == pytest.approx(6.2 / 3)
    assert S.largest_spread({"x": lead, "y": _run(7, 1.0)}, "val_loss") == pytest.approx(0.4)
    assert S.in_spreads(-0.8, 0.4) == "2.0 seed spreads"
    with pytest.raises(ValueError, match="train_loss, val_loss or val_acc"):
        S.final_value(lead, "accuracy")


def test_paired_gaps_compare_two_runs_seed_by_seed():
    a, b = _run(1, 2.0), _run(2, 1.5)
    for k, (va, vb) in enumerate(((3.0, 2.6), (2.5, 2.2), (9.0, 1.0))):
        for lead, v in ((a, va), (b, vb)):
            seed_run = _run(10 * (k + 1) + lead.id, v, status="stopped" if v == 9.0 else "done")
            seed_run.lead = lead
            lead.seed_runs.append(seed_run)
    # seed by seed: 0.5, 0.4 and 0.3 (the unfinished third seed run is left out), though
    # each run's own seeds lie a whole unit apart
    assert S.paired_gaps(a, b, "val_loss") == pytest.approx([0.5, 0.4, 0.3])
    assert S.spread(a, "val_loss") == pytest.approx(1.0)


def _live(seeds, name="seeds"):
    controls = {"lr": W.FloatLogSlider(value=0.05, base=10, min=-3, max=0)}

    def make_config(v):
        return {
            "low": TrainConfig.from_profile("ci", device="cpu", lr=v["lr"], max_steps=6),
            "high": TrainConfig.from_profile("ci", device="cpu", lr=3 * v["lr"], max_steps=6),
        }

    return LiveRun(
        controls,
        make_config,
        name=name,
        seeds=seeds,
        color_roles=lambda n: n,
        auto_run=False,
        renderer="plotly",
    )


def test_a_request_trains_each_run_from_two_seeds_drawn_faint_in_its_colour():
    live = _live(seeds=2)
    group = live.run_blocking(timeout=120)
    assert set(group) == {"low", "high"}  # the leads; their seed runs hang off them
    for lead in group.values():
        (seed_run,) = lead.seed_runs
        assert seed_run.lead is lead and seed_run.status == "done"
        assert seed_run.settings == lead.settings
        # another seed: another initialisation and order, so another loss curve
        assert [m.loss for m in seed_run.records if m.kind == "train"] != [
            m.loss for m in lead.records if m.kind == "train"
        ]
        assert S.spread(lead, "val_loss") > 0
    traces = {t.uid: t for t in live.scene()[0]}
    for lead in group.values():
        mine = traces[f"{lead.id}:loss"]
        theirs = traces[f"{lead.seed_runs[0].id}:loss"]
        assert theirs.color == mine.color and theirs.opacity < mine.opacity
        assert mine.showlegend and not theirs.showlegend
        assert mine.name == f"{lead.name} (2 seeds)"  # what differs: only the name
        assert f"{lead.seed_runs[0].id}:loss_raw" not in traces  # no raw noise for seed runs
    assert len({traces[f"{r.id}:loss"].color for r in group.values()}) == 2
    assert "low:" in live.status_text and "seed" not in live.status_text
    # a restarted kernel's widget finds the seed runs under their leads again
    again = _live(seeds=2)
    saved = [r for r in again.runs if r.lead is None]
    assert len(saved) == 2 and all(len(r.seed_runs) == 1 for r in saved)
    assert all(r.color == r.seed_runs[0].color for r in saved)


def test_a_control_that_does_not_change_a_run_reuses_it_and_its_seeds():
    live = _live(seeds=2, name="reuse")
    first = live.run_blocking(timeout=120)
    calls = []
    make_config = live.make_config

    def only_high_changes(v):  # the "low" run ignores this control's new value
        made = make_config(v)
        made["low"] = make_config({"lr": 0.05})["low"]
        calls.append(v)
        return made

    live.make_config = only_high_changes
    second = live.run_blocking(timeout=120, lr=0.02)
    low, high = second["low"], second["high"]
    assert low is not first["low"] and low.meta["reused"]
    assert low.records == first["low"].records and len(low.seed_runs) == 1
    assert low.seed_runs[0].records == first["low"].seed_runs[0].records
    assert not high.meta.get("reused") and high.records != first["high"].records
    assert "2 of 4 runs unchanged by this setting" in live.status_text
    # the run log holds each trained run once: 4 first, then the 2 new "high" runs
    assert len(live.log_path.read_text().splitlines()) == 6
    # a changed seed count or a changed setting is trained, not reused
    live.seeds = 1
    third = live.run_blocking(timeout=120, lr=0.03)
    assert third["low"].meta.get("reused") and not third["low"].seed_runs
    assert not third["high"].meta.get("reused")


def test_a_schedule_is_compared_by_its_values_and_code_is_never_reused():
    from lessons.callbacks import EpochEnd, NoiseScale

    a = TrainConfig(epochs=3, lr_at=lambda e: 0.1 * 0.5**e)
    b = TrainConfig(epochs=3, lr_at=lambda e: 0.1 / 2**e)
    c = TrainConfig(epochs=3, lr_at=lambda e: 0.1 / 3**e)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert TrainConfig(callbacks=[NoiseScale()]).fingerprint() is not None
    assert TrainConfig(callbacks=[EpochEnd(lambda *a: {})]).fingerprint() is None
