"""Lesson 3's widgets driven headless, and LAMB in the engine."""

import numpy as np
import pytest

from lessons.callbacks import TrustRatios
from lessons.config import TrainConfig
from lessons.optim import LAMB_VARIANTS
from lessons.train import run
from widgets import lamb as L
from widgets.legend import identical_runs

pytestmark = pytest.mark.usefixtures("private_run_log")


def test_lamb_converges_on_the_generated_data(shapes_ci):
    c = TrainConfig.from_profile(
        "ci",
        device="cpu",
        optimizer="lamb",
        lr=0.02,
        weight_decay=0.01,
        epochs=5,
        callbacks=[TrustRatios()],
    )
    records = run(c, dataset=shapes_ci)
    losses = [r.loss for r in records if r.kind == "train"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3
    assert [r for r in records if r.kind == "eval"][-1].val_acc > 0.25
    trust = [r.extras["trust"] for r in records if r.kind == "train"]
    names = records[0].extras["trust_names"]
    assert all(len(t) == len(names) for t in trust) and max(map(max, trust)) <= 10.0


def test_inspector_controls_change_the_table():
    ins = L.StepInspector()
    assert len(ins.rows) == 14 and "trust ratio" in ins.table.value
    lr = ins.lr.value
    # uncapped tensors with a weight move by lr x ||w||
    for row in ins.rows:
        if row["w"] > 0 and row["trust"] < 10:
            assert row["relative"] == pytest.approx(lr, rel=1e-4)
    zero = [r for r in ins.rows if r["name"].endswith(".1.bias")]
    assert zero and all(r["trust"] == 1.0 and r["w"] == 0 for r in zero)
    ins.cap.value = 1.0  # a user picks the cap of 1
    assert max(r["trust"] for r in ins.rows) <= 1.0
    ins.steps.value = 5
    assert all(r["w"] > 0 for r in ins.rows)  # after a few steps the biases have moved
    before = [r["trust"] for r in ins.rows]
    ins.centered.value = True
    assert [r["trust"] for r in ins.rows] != before


def test_lamb_against_adamw_trains_both_and_draws_trust_ratios():
    live = L.lamb_vs_adamw(renderer="plotly")
    runs = live.run_blocking(timeout=300)
    assert set(runs) == {"LAMB", "AdamW"} and all(r.status == "done" for r in runs.values())
    shown = {t["uid"]: t for t in live.traces()}
    assert all(shown[f"{r.id}:loss"]["opacity"] == 1.0 for r in runs.values())
    panel = live.panel_figure.traces()
    names = runs["LAMB"].records[0].extras["trust_names"]
    # a line per tensor, then the cap and the points on it (none: the cap of 10 never binds)
    uids = [f"trust:{n}" for n in names] + ["trust:cap", "trust:at cap"]
    assert [t["uid"] for t in panel] == uids
    n_train = sum(r.kind == "train" for r in runs["LAMB"].records)
    assert all(t["points"] == n_train for t in panel[: len(names)])
    assert panel[-1]["points"] == 0 and "never bound" in live.summary_html.value
    assert "LAMB" in live.panel_figure.title()
    # a new setting: both runs again, the first pair fades
    again = live.run_blocking(cap="off", timeout=300)
    shown = {t["uid"]: t for t in live.traces()}
    assert shown[f"{runs['LAMB'].id}:loss"]["opacity"] < 1.0
    assert shown[f"{again['LAMB'].id}:loss"]["opacity"] == 1.0
    cfg = live.make_config(live.values())
    assert cfg["LAMB"].opt_options["trust_clip"] is None
    assert "cap=off" in again["LAMB"].label
    # each label says what its run used: AdamW has no trust cap to claim
    assert "cap=" not in again["AdamW"].label and "lr=" in again["AdamW"].label
    assert "cap=10" in runs["LAMB"].label


def test_choosing_no_cap_keeps_the_dropdown_showing_off():
    """The browser sends the chosen option's index. An option whose value was None came back
    as "nothing selected": the dropdown went blank (index None) though LAMB ran uncapped."""
    ins = L.StepInspector()
    ins.steps.value = 50  # by step 50 a ratio has reached the cap of 10 (16.7 uncapped)
    capped = max(r["trust"] for r in ins.rows)
    ins.cap.index = 0  # a student picks "off"
    assert (ins.cap.index, ins.cap.label) == (0, "off")
    assert max(r["trust"] for r in ins.rows) > capped == pytest.approx(10.0)
    live = L.lamb_vs_adamw(renderer="matplotlib")
    live.controls["cap"].index = 0
    assert live.controls["cap"].label == "off"
    values = live.values()
    assert live.make_config(values)["LAMB"].opt_options["trust_clip"] is None
    assert "cap=off" in live.label(values)
    # runs logged before the change stored the value None for "off"
    assert L.trust_clip(None) is None and L.trust_clip(10.0) == 10.0


def test_all_variants_are_configs_of_the_one_optimizer():
    live = L.lamb_vs_adamw(renderer="matplotlib")
    configs = live.make_config({**live.values(), "variant": "all variants"})
    assert set(configs) == {f"LAMB {k}" for k in LAMB_VARIANTS} | {"AdamW"}
    assert all(c.optimizer == "lamb" for k, c in configs.items() if k != "AdamW")
    assert configs["LAMB timm trust_clip"].opt_options == LAMB_VARIANTS["timm trust_clip"]


def test_the_panel_and_summary_show_where_the_cap_binds():
    live = L.lamb_vs_adamw(renderer="matplotlib")
    runs = live.run_blocking(cap=3.0, timeout=300)
    bound = L.cap_binding(runs["LAMB"])
    # the cap of 3 binds on the norm scales (no weight decay), late, and shortens their steps
    assert bound and all(b["decay"] == 0 and b["first"] > 1 for b in bound), bound
    assert all(b["moved"] < 1 for b in bound), bound
    panel = {t["uid"]: t for t in live.panel_figure.traces()}
    assert "trust:cap" in panel and panel["trust:at cap"]["points"] == sum(
        b["steps"] for b in bound
    )
    assert all("capped" in panel[f"trust:{b['name']}"]["name"] for b in bound)
    assert "cap of 3 bound on" in live.summary_html.value
    # uncapped tensors of a LAMB run moved lr x ||w||; AdamW's steps differ between tensors
    moved = L.relative_steps(runs["AdamW"])
    assert max(moved.values()) > 10 * min(moved.values())
    free = [n for n in L.relative_steps(runs["LAMB"]) if n not in {b["name"] for b in bound}]
    assert all(L.relative_steps(runs["LAMB"])[n] == pytest.approx(1, rel=1e-3) for n in free)


def test_identical_runs_of_all_variants_are_named_in_the_summary():
    """Lesson 3's "all variants": course and no cap (the cap of 10 never binds here) drew one
    curve, as did the two timm rows; the legend showed 5 names of 7 without saying why."""
    live = L.lamb_vs_adamw(renderer="matplotlib")
    runs = live.run_blocking(variant="all variants", timeout=300)
    groups = [{r.name for r in g} for g in identical_runs(runs.values())]
    assert {"LAMB course", "LAMB no cap"} in groups
    assert {"LAMB timm / NVIDIA", "LAMB timm trust_clip"} in groups
    assert not any("AdamW" in g for g in groups)
    text = live.summary_html.value
    assert "LAMB course = LAMB no cap</b>: identical" in text
