"""LiveRun driven headless, as a user would: set control values, press buttons, read the
figure and the status line."""

import json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import ipywidgets as W
import pytest

from lessons.config import TrainConfig
from lessons.train import run as train_run
from widgets import figure as figure_mod
from widgets import live as live_mod
from widgets import request as request_mod
from widgets import status as status_mod
from widgets.cores import CoreShare
from widgets.figure import Mark, Trace, legend_rows
from widgets.live import LiveRun
from widgets.mpl_figure import MatplotlibFigure
from widgets.plotly_figure import PlotlyFigure
from widgets.runs import settings_label
from widgets.start import start_here

# the ci data set is built and held in memory before a test times a run: on a fresh machine its
# first build, beside the other worker's tests, took longer than a first point may
pytestmark = pytest.mark.usefixtures("private_run_log", "shapes_ci")
ROOT = Path(__file__).resolve().parents[1]


def wait_until(cond, timeout=60.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def live_threads():
    return [t for t in threading.enumerate() if t.name.startswith("LiveRun-")]


def make_live(renderer="plotly", epochs=1.0, **kw):
    controls = {
        "lr": W.FloatLogSlider(value=0.05, base=10, min=-3, max=7, continuous_update=False),
        "batch": W.IntSlider(value=64, min=1, max=100_000, continuous_update=False),
    }

    def make_config(v):
        return TrainConfig.from_profile(
            "ci", device="cpu", lr=v["lr"], batch=v["batch"], epochs=epochs
        )

    return LiveRun(controls, make_config, name="test", renderer=renderer, **kw)


def points(live, key):
    return {t["uid"]: t for t in live.traces()}.get(key, {}).get("points", 0)


def test_moving_a_slider_starts_a_run_and_the_plot_grows():
    live = start_here()
    assert live.traces() == []
    live.controls["lr"].value = 0.03  # what a released slider does
    wait_until(lambda: live.last_run is not None and points(live, f"{live.last_run.id}:loss"))
    live.wait(60)
    run = live.last_run
    assert run.status == "done" and run.settings["lr"] == pytest.approx(0.03)
    n_train = sum(r.kind == "train" for r in run.records)
    assert points(live, f"{run.id}:loss") == n_train > 0
    n_eval = sum(r.kind == "eval" for r in run.records)
    # lesson 0 trains the ci profile 4 epochs, for its 4x-batch run to leave chance
    assert points(live, f"{run.id}:val_acc") == n_eval == 4
    assert "Done" in live.status.value and "val accuracy" in live.status.value
    assert f"{n_train}/{n_train} steps" in live.progress_text.value
    assert live.progress.value == live.progress.max == n_train


def test_quick_changes_keep_one_thread_and_the_last_setting_wins():
    live = make_live(epochs=20)
    peak = []
    watcher_stop = threading.Event()

    def watch():
        while not watcher_stop.is_set():
            peak.append(len(live_threads()))
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    live.controls["lr"].value = 0.02
    wait_until(lambda: live.last_run is not None and live.last_run.records)
    live.controls["lr"].value = 0.01
    live.controls["batch"].value = 32
    live.controls["batch"].value = 128  # the last setting
    wait_until(
        lambda: (
            live.last_run is not None
            and live.last_run.settings["batch"] == 128
            and live.last_run.records
        )
    )
    live.stop()
    live.wait(60)
    watcher_stop.set()
    assert max(peak) == 1
    assert live.threads_started == 1  # the same worker took every request
    runs = {r.settings["batch"]: r for r in live.runs}
    assert 32 not in runs  # replaced while it settled: never started
    # the first run was stopped by a newer setting within its first steps: a stub, dropped
    assert 64 not in runs and set(runs) == {128}
    assert runs[128].settings["lr"] == pytest.approx(0.01)
    uids = {t["uid"]: t for t in live.traces()}
    assert uids[f"{runs[128].id}:loss"]["opacity"] == 1.0
    assert not live_threads()


def test_stop_button_stops_and_says_so():
    live = make_live(epochs=50)
    live.run_button.click()
    wait_until(lambda: live.last_run is not None and len(live.last_run.records) > 2)
    live.stop_button.click()
    assert live.wait(30)
    assert live.last_run.status == "stopped"
    assert "Stopped" in live.status.value
    assert live.last_run.records[-1].kind == "stopped"


def test_diverging_run_is_shown_and_the_widget_stays_usable(capfd):
    live = make_live()
    run = live.run_blocking(lr=10.0, timeout=60)
    assert run.status == "diverged"
    step = run.records[-1].step
    assert f"Diverged at step {step} " in live.status.value
    assert "lower the learning rate" in live.status.value
    assert "Traceback" not in capfd.readouterr().err
    run = live.run_blocking(lr=0.05, timeout=60)
    assert run.status == "done" and "Done" in live.status.value


def test_a_control_offering_the_value_none_is_refused():
    """ipywidgets shows a selection whose value is None as no selection at all: a control
    with such an option would go blank when a student picks it (lesson 3's trust cap did)."""

    def make(v):
        return TrainConfig.from_profile("ci")

    blank = W.Dropdown(options=(("off", None), ("10", 10.0)), value=10.0)
    with pytest.raises(ValueError, match="'cap' offers the value None"):
        LiveRun({"cap": blank}, make, name="none-option")
    fine = W.Dropdown(options=(("off", "off"), ("10", 10.0)), value=10.0)
    assert LiveRun({"cap": fine}, make, name="none-option").controls["cap"] is fine


def test_impossible_setting_is_a_message_not_a_crash():
    live = make_live()
    assert live.run_blocking(batch=50_000, timeout=60) is None
    assert "Impossible setting" in live.status.value and "smaller batch" in live.status.value
    assert live.run_blocking(batch=64, timeout=60).status == "done"


def test_errors_inside_a_run_are_shown(monkeypatch):
    live = make_live()

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        yield

    monkeypatch.setattr(request_mod, "train_many", boom)
    live.run_blocking(timeout=60)
    assert "out of memory" in live.status.value and "lower the batch size" in live.status.value
    monkeypatch.undo()
    assert live.run_blocking(timeout=60).status == "done"


def test_missing_dataset_is_a_message(monkeypatch):
    from lessons import data

    def unavailable(*a, **k):
        raise data.DataError("archive corrupt: run again to download it afresh")

    monkeypatch.setattr(request_mod, "load_data", unavailable)
    live = make_live()
    assert live.run_blocking(timeout=60) is None
    assert "not available" in live.status.value and "afresh" in live.status.value


def test_fallback_data_is_announced_in_status_and_title(monkeypatch, shapes_ci):
    from dataclasses import replace

    noticed = replace(shapes_ci, notice="Imagenette is not available (offline)")
    monkeypatch.setattr(request_mod, "load_data", lambda c, d: noticed)
    live = make_live(renderer="plotly")
    live.run_blocking(timeout=60)
    assert "NOTICE" in live.status.value and "offline" in live.status.value
    assert "GENERATED DATA" in live.figure.title()


def test_runs_are_logged_and_replayed_faded_after_a_restart():
    live = make_live()
    run = live.run_blocking(lr=0.04, timeout=60)
    path = live.log_path
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["settings"]["lr"] == pytest.approx(0.04)
    assert json.loads(lines[0])["meta"]["precision"] == "float32"  # the ci profile's, anywhere
    with open(path, "a") as f:
        f.write('{"settings": {"lr": 0.1}, "label": "torn')  # a write cut off by a crash
    fresh = make_live()  # a new kernel, the same log
    assert len(fresh.runs) == 1
    replayed = fresh.runs[0]
    assert replayed.replayed and "saved, cpu" in replayed.display_label
    n = sum(r.kind == "train" for r in run.records)
    assert all(t["opacity"] < 1 for t in fresh.traces())
    assert points(fresh, f"{replayed.id}:loss") == n
    fresh.clear_button.click()
    assert fresh.traces() == []


def test_both_renderers_draw_the_same_runs():
    a = make_live(renderer="plotly", replay=False)
    b = make_live(renderer="matplotlib", replay=False)
    for live in (a, b):
        live.run_blocking(lr=0.05, timeout=60)
        live.run_blocking(lr=0.02, timeout=60)
    shape = [
        [(t["uid"].split(":")[1], t["points"], t["opacity"]) for t in live.traces()]
        for live in (a, b)
    ]
    assert shape[0] == shape[1]
    assert len(shape[0]) == 8 and shape[0][0][2] < 1 and shape[0][-1][2] == 1
    assert b.figure.widget.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_redraws_are_throttled():
    live = make_live(epochs=3)
    t0 = time.perf_counter()
    run = live.run_blocking(timeout=60)
    secs = time.perf_counter() - t0
    steps = sum(r.kind == "train" for r in run.records)
    # at most one redraw per 0.1 s of running, plus the first and the last
    assert live.redraws <= secs / 0.1 + 3
    assert live.redraws < steps


def test_the_redraw_interval_starts_short_grows_with_age_and_covers_the_draw_cost():
    live = make_live()
    fig = live.figure
    assert live.pacing.started is None  # no record yet: the first one starts the clock
    assert live.redraw_interval(100.0) == fig.min_interval == 0.1  # a slider move: at once
    assert live.pacing.started == 100.0
    assert live.redraw_interval(105.0) == pytest.approx(0.25)  # a twentieth of 5 s
    assert live.redraw_interval(160.0) == fig.max_interval == 0.5  # a long run: capped
    live.pacing.draw_cost = 0.2  # a slow renderer: drawing may take a fifth of the time
    assert live.redraw_interval(100.0) == pytest.approx(0.8)
    live.pacing.throttle = False
    assert live.redraw_interval(160.0) == 0.0
    mpl = make_live(renderer="matplotlib")
    assert mpl.pacing.draw_cost == 0.0  # its first draw's one-off set-up does not count
    assert (mpl.redraw_interval(0.0), mpl.redraw_interval(100.0)) == (0.25, 1.0)


def test_redraws_thin_out_as_a_run_ages():
    live = make_live(epochs=15)  # 2 - 4 s on the ci profile, past the cap's second
    live.pacing.age_share = 0.5  # reach the 0.5 s cap one second into the run
    stamps = []
    draw = live.figure.draw

    def stamped(*args, **kwargs):
        stamps.append(time.perf_counter())
        return draw(*args, **kwargs)

    live.figure.draw = stamped
    run = live.run_blocking(timeout=120)
    assert run.status == "done"
    t0 = live.pacing.started  # the first record's time
    streamed = [t for t in stamps if t >= t0][:-1]  # the last draw shows the finished run
    assert len(streamed) >= 3
    gaps = [(b, b - a) for a, b in zip(streamed, streamed[1:])]
    for t, gap in gaps:  # never sooner than the interval at that age (5 ms of slack)
        assert gap >= min(0.5, max(0.1, 0.5 * (t - t0))) - 0.005, (t - t0, gap)
    assert max(gap for _, gap in gaps) >= 0.45  # the run lasted long enough to reach the cap
    assert min(gap for _, gap in gaps) < 0.45  # and it started out faster


def test_renderer_choice(monkeypatch):
    import sys
    import types

    monkeypatch.setenv("LESSONS_PLOT", "matplotlib")
    assert figure_mod.choose_renderer() == "matplotlib"
    monkeypatch.setenv("LESSONS_PLOT", "bokeh")
    with pytest.raises(ValueError, match="LESSONS_PLOT"):
        figure_mod.choose_renderer()
    monkeypatch.delenv("LESSONS_PLOT")
    assert figure_mod.choose_renderer() == "plotly"
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert figure_mod.choose_renderer() == "matplotlib"


def test_a_rerun_replaces_the_older_curve_of_the_same_settings():
    live = make_live(replay=False)
    first = live.run_blocking(lr=0.05, timeout=60)
    other = live.run_blocking(lr=0.02, timeout=60)
    again = live.run_blocking(lr=0.05, timeout=60)
    assert [r.id for r in live.runs] == [other.id, again.id] and first.id not in (
        other.id,
        again.id,
    )
    assert {t["uid"].split(":")[0] for t in live.traces()} == {str(other.id), str(again.id)}


def group_live(name: str, epochs: float):
    """A LiveRun whose every request trains two batch sizes ("small" 32, "large" 128)."""
    controls = {"lr": W.FloatLogSlider(value=0.05, base=10, min=-3, max=0)}

    def make_config(v):
        return {
            run: TrainConfig.from_profile("ci", device="cpu", lr=v["lr"], batch=b, epochs=epochs)
            for run, b in (("small", 32), ("large", 128))
        }

    return LiveRun(controls, make_config, name=name, replay=False), make_config


@pytest.mark.parametrize("concurrent", ["0", "1"])
def test_a_request_can_train_several_configs_side_by_side(monkeypatch, concurrent):
    monkeypatch.setenv("LESSONS_CONCURRENT", concurrent)  # one after the other, or together
    live, make_config = group_live("group", epochs=1)
    first = live.run_blocking(timeout=60)
    assert set(first) == {"small", "large"} and first["small"].label.startswith("small: ")
    assert first["small"].group == first["large"].group
    second = live.run_blocking(lr=0.02, timeout=60)
    opacity = {t["uid"]: t["opacity"] for t in live.traces()}
    assert all(opacity[f"{r.id}:loss"] == 1.0 for r in second.values())
    assert all(opacity[f"{r.id}:loss"] < 1.0 for r in first.values())
    assert "small:" in live.status.value and "large:" in live.status.value
    assert len(live.log_path.read_text().splitlines()) == 4
    # together or not, each run's records are the ones it gives on its own with as many
    # threads: side by side, each run computes with its share of them (train_many), and
    # another thread count sums in another order (2e-7 apart by the fourth step, 2 threads)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2) if concurrent == "1" else threads)
    try:
        alone = train_run(make_config({"lr": 0.02})["small"])
    finally:
        torch.set_num_threads(threads)
    assert [r.loss for r in second["small"].records] == [r.loss for r in alone]


def test_runs_trained_together_grow_together_and_stop_together(monkeypatch):
    monkeypatch.setenv("LESSONS_CONCURRENT", "1")
    live, make_config = group_live("together", epochs=50)
    live.run_button.click()
    wait_until(lambda: len(live.last_group) == 2 and all(r.records for r in live.runs))
    assert "side by side" in live.status.value
    trainers = [t for t in threading.enumerate() if t.name.startswith("train-")]
    assert sorted(t.name for t in trainers) == ["train-large", "train-small"]
    live.stop()
    assert live.wait(30)
    assert {r.status for r in live.last_group.values()} == {"stopped"}
    assert "Stopped 2 runs" in live.status.value
    assert not [t for t in threading.enumerate() if t.name.startswith(("train-", "LiveRun-"))]


def test_cuda_out_of_memory_empties_the_allocator_and_the_next_run_is_fine(monkeypatch):
    import torch

    live = make_live()
    emptied = []

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        yield

    monkeypatch.setattr(request_mod, "train_many", oom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    assert live.run_blocking(timeout=60).status == "error"
    assert "ran out of memory" in live.status.value and "lower the batch size" in live.status.value
    assert emptied == [1]
    monkeypatch.undo()
    assert live.run_blocking(timeout=60).status == "done"


def test_a_slider_storm_leaves_one_thread_training_the_last_setting():
    live = make_live(epochs=50)
    slider = live.controls["lr"]
    values = [0.01 + 0.002 * i for i in range(20)]
    peak = []
    t0 = time.perf_counter()
    for v in values:  # 20 changes in 2 seconds, as a student dragging and releasing
        slider.value = v
        peak.append(len(live_threads()))
        time.sleep(0.1)
    assert time.perf_counter() - t0 < 3
    # the storm's last value trains once the storm has settled
    wait_until(
        lambda: (
            live.last_run is not None
            and live.last_run.settings["lr"] == pytest.approx(values[-1])
            and len(live.last_run.records) > 3
        )
    )
    assert len(live_threads()) == 1 and max(peak) == 1
    assert live.threads_started == 1
    assert live.last_run.settings["lr"] == pytest.approx(values[-1])
    assert live.last_run.status == "running"
    live.stop()
    assert live.wait(30) and not live_threads()
    drawn = [t for t in live.traces() if t["opacity"] == 1.0 and t["uid"].endswith(":loss")]
    assert [t["uid"] for t in drawn] == [f"{live.last_run.id}:loss"]
    assert drawn[0]["points"] > 0
    labels = {r.label for r in live.runs}
    assert len(labels) == len(live.runs)  # no setting drawn twice


def test_a_burst_of_key_presses_leaves_no_stub_runs():
    """Pressing a slider's arrow key again and again while a run trains: the runs each press
    starts and the next one stops within their first steps are dropped, and the presses that
    come within the settle time start one run, so the lesson's earlier run keeps its place."""
    live = make_live(epochs=1)
    first = live.run_blocking(lr=0.05, batch=64, timeout=120)  # the lesson's run, as it was
    make = live.make_config
    live.make_config = lambda v: replace(make(v), epochs=50)  # long runs, stopped by presses
    slider = live.controls["lr"]
    for i in range(15):  # 15 presses, 50 ms apart
        slider.value = 0.01 + 0.001 * i
        time.sleep(0.05)
    wait_until(
        lambda: (
            live.last_run is not None
            and live.last_run.settings["lr"] == pytest.approx(0.024)
            and len(live.last_run.records) > 3
        )
    )
    live.stop()
    assert live.wait(30)
    kept = [r for r in live.runs if r is not first and r is not live.last_run]
    assert kept == [], [(r.label, sum(m.kind == "train" for m in r.records)) for r in kept]
    assert first in live.runs


def test_clear_keeps_the_newest_requests_runs_and_the_figure_agrees():
    """Clear old runs removed every run, the newest too, while the summary still listed it."""
    live = make_live(renderer="plotly", replay=False, summary=lambda lv: str(len(lv.runs)))
    first = live.run_blocking(lr=0.05, timeout=60)
    newest = live.run_blocking(lr=0.02, timeout=60)
    live.clear_button.click()
    assert live.runs == [newest] and first not in live.runs
    assert {t["uid"].split(":")[0] for t in live.traces()} == {str(newest.id)}
    assert live.summary_html.value == "1"


def test_a_run_that_never_learned_says_so_and_printed_status_is_plain_text():
    """At a learning rate where the net learns nothing, the status line says the run stayed
    at chance and what to change, not a plain "Done"; status_text is the same words without
    the status line's HTML, for a notebook cell to print."""
    live = make_live(epochs=2, replay=False)
    live.run_blocking(lr=1e-6, timeout=60)  # the weights barely move
    assert "stayed at chance" in live.status_text and "lower the learning rate" in live.status_text
    assert live.status_text.startswith("Done") and "<" not in live.status_text
    assert "<span" in live.status.value  # the widget's line is coloured HTML
    live.run_blocking(lr=0.05, timeout=60)  # learns (val loss 2.13, 23% on ci): no such note
    assert "stayed at chance" not in live.status_text


def test_a_summary_drawn_while_the_request_trains_says_it_is_partial():
    live = make_live(epochs=50, replay=False, summary=lambda lv: f"{len(lv.runs)} runs")
    live.run_button.click()
    wait_until(lambda: live.last_run is not None and len(live.last_run.records) > 2)
    live.draw()
    assert live.summary_html.value == "1 runs<i>(partial: the request is still training)</i>"
    live.stop()
    assert live.wait(30)
    assert live.summary_html.value == "1 runs"  # the request's last draw: complete


def test_both_renderers_take_a_log_x_axis():
    trace = Trace("v", [8, 64, 512], [3.0, 2.0, 1.5])
    plotly = PlotlyFigure(xlabel="B", ylabel="v", xlog=True)
    plotly.draw([trace])
    assert plotly.fig.layout.xaxis.type == "log"
    mpl = MatplotlibFigure(xlabel="B", ylabel="v", xlog=True)
    mpl.draw([trace])
    assert mpl.ax.get_xscale() == "log"
    assert MatplotlibFigure(xlabel="B", ylabel="v").ax.get_xscale() == "linear"


def test_rerunning_the_cell_stops_the_old_widget():
    old = make_live(epochs=50)
    old.run_button.click()
    wait_until(lambda: old.last_run is not None and old.last_run.records)
    new = make_live()  # the same cell run again: the same name
    assert old.wait(30), "the old widget kept training"
    assert old.last_run.status == "stopped" and not live_threads()
    assert new.run_blocking(timeout=60).status == "done"


def test_an_interrupted_blocking_run_stops(monkeypatch):
    live = make_live(epochs=50)
    monkeypatch.setattr(live, "wait", lambda timeout=None: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        live.run_blocking(timeout=60)
    monkeypatch.undo()
    assert live.wait(30) and not live_threads()
    assert live.last_run is None or live.last_run.status == "stopped"


@pytest.mark.parametrize("renderer", ["plotly", "matplotlib"])
def test_export_saves_png_html_and_csv_of_every_run(tmp_path, renderer):
    import csv

    from PIL import Image

    live = make_live(renderer)
    a = live.run_blocking(lr=0.05, timeout=60)
    b = live.run_blocking(lr=0.02, timeout=60)
    paths = live.export(tmp_path / "out", stem="slide")
    assert {k: p.name for k, p in paths.items()} == {
        "png": "slide.png",
        "html": "slide.html",
        "csv": "slide.csv",
    }
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.width > 800
    page = paths["html"].read_text()
    assert len(page) > 1_000_000  # plotly.js is inlined: it opens offline
    for run in (a, b):
        assert run.label in page
    rows = list(csv.DictReader(paths["csv"].open()))
    for run in (a, b):
        mine = [r for r in rows if r["run"] == str(run.id)]
        assert len(mine) == len(run.records)
        train = [r for r in mine if r["kind"] == "train"]
        want = [r.loss for r in run.records if r.kind == "train"]
        assert [float(r["loss"]) for r in train] == want  # repr round-trips floats exactly
        assert {r["setting_lr"] for r in mine} == {str(run.settings["lr"])}
        evals = [r for r in mine if r["kind"] == "eval"]
        assert float(evals[-1]["val_acc"]) == run.last("eval").val_acc
    assert not list((tmp_path / "out").glob(".tmp-*"))  # written atomically, nothing left over


def test_export_button_says_where_and_a_failure_is_a_message(monkeypatch, tmp_path):
    from lessons import data

    live = make_live()
    live.run_blocking(timeout=60)
    monkeypatch.setattr(data, "data_dir", lambda: tmp_path)
    live.export_button.click()
    assert "Exported" in live.status.value and str(tmp_path / "exports") in live.status.value
    assert len(list((tmp_path / "exports").glob("test-*.csv"))) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(data, "data_dir", lambda: blocker)  # exports/ cannot be made in a file
    live.export_button.click()
    assert "Export failed" in live.status.value
    monkeypatch.undo()
    assert live.run_blocking(timeout=60).status == "done"  # still usable


@pytest.mark.parametrize("renderer", ["plotly", "matplotlib"])
def test_presenter_switch_enlarges_fonts_and_lines(renderer):
    live = make_live(renderer)
    live.run_blocking(timeout=60)
    font = live.figure.font_size()
    widths = [t.width for t in live.scene()[0]]
    live.presenter.value = True
    assert live.figure.font_size() >= 1.5 * font
    assert [t.width for t in live.scene()[0]] == [2 * w for w in widths]
    if renderer == "plotly":
        assert [t.line.width for t in live.figure.fig.data] == [2 * w for w in widths]
    live.presenter.value = False
    assert live.figure.font_size() == font


def test_presenter_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("LESSONS_PRESENTER", "1")
    assert make_live().presenter.value is True
    monkeypatch.setenv("LESSONS_PRESENTER", "0")
    assert make_live().presenter.value is False


def move_in_browser(slider, value):
    """What a slider release in the browser does: the value arrives under ipywidgets'
    property lock (set_state), unlike a value set from Python."""
    with slider._lock_property(value=value):
        slider.value = value


@pytest.mark.parametrize("views", [0, 1])
def test_a_missing_plotly_front_end_falls_back_to_matplotlib(monkeypatch, views):
    monkeypatch.setattr(live_mod, "in_kernel", lambda: True)
    live = make_live("plotly")
    assert live.figure.widget._view_count == 0  # tracked from the start
    plotly_widget = live.figure.widget
    live.figure.widget._view_count = views  # what the browser reported
    live.controls["lr"].value = 0.02  # set from Python: never a reason to switch
    live.wait(60)
    assert live.renderer_name == "plotly"
    move_in_browser(live.controls["lr"], 0.03)
    assert live.wait(60)
    if views:
        assert live.renderer_name == "plotly" and not live.front_end_notice
        return
    assert live.renderer_name == "matplotlib"
    assert live.figure.widget in live.widget.children
    assert isinstance(live.figure.widget, W.Image) and live.figure.widget.value[:4] == b"\x89PNG"
    assert plotly_widget not in live.widget.children
    assert {t["uid"] for t in live.traces()} >= {f"{live.last_run.id}:loss"}
    assert live.last_run.settings["lr"] == pytest.approx(0.03)
    assert live.last_run.status == "done"
    move_in_browser(live.controls["lr"], 0.04)  # and it keeps working
    assert live.wait(60) and live.last_run.settings["lr"] == pytest.approx(0.04)
    assert "matplotlib" in live.front_end_notice


@pytest.mark.usefixtures("private_run_log")
def test_building_a_live_run_does_the_first_runs_lazy_imports_ahead_in_the_background():
    # a fresh process: the first torch optimizer imports torch._dynamo (about 2 s on 2 cores)
    code = """
import sys, threading
import ipywidgets as W
import torch
from lessons.config import TrainConfig
from lessons.optim import build_optimizer
from widgets.live import LiveRun

assert "torch._dynamo" not in sys.modules, "nothing left to warm up"
config = lambda v: TrainConfig.from_profile("ci", lr=v["lr"])
live = LiveRun({"lr": W.FloatSlider(value=0.1)}, config, name="warm", renderer="matplotlib",
               replay=False)
for t in threading.enumerate():
    if t.name == "lessons-warm-up":
        t.join(60)
before = set(sys.modules)
w = torch.zeros(1, requires_grad=True)
w.grad = torch.ones_like(w)
build_optimizer("sgd", [{"params": [w]}], lr=0.1).step()  # what a first run does
print(sorted(set(sys.modules) - before))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_live_run_frees_openmp_threads_before_its_worker_trains(monkeypatch):
    calls = []
    monkeypatch.setattr(live_mod, "free_openmp_threads", lambda: calls.append(1) or True)
    runner = LiveRun(
        {"lr": W.FloatSlider(value=0.05, min=0.01, max=0.1)},
        lambda v: TrainConfig.from_profile("ci", lr=v["lr"], epochs=0.05, device="cpu"),
        name="omp-test",
    )
    runner.run_blocking(timeout=120)
    assert calls == [1]


def test_core_share_note_says_when_other_programs_took_the_threads_cores():
    note = status_mod.core_share_note(1.0, cores=2, threads=2)
    assert "1.0 of the 2 CPU cores" in note and "OMP_NUM_THREADS=1 make lab" in note
    assert "OMP_NUM_THREADS=6" in status_mod.core_share_note(2.0, cores=8, threads=8)
    assert status_mod.core_share_note(1.0, cores=8, threads=8) != ""  # 9 > 8.25
    # one thread has no team to wait for; some load (the browser's redraws), or enough free
    # cores, is fine
    cases = [(1.0, 2, 1), (0.3, 2, 2), (0.6, 2, 2), (1.0, 8, 4), (None, 2, 2)]
    for others, cores, threads in cases:
        assert status_mod.core_share_note(others, cores, threads) == ""


def test_core_share_counts_other_programs_and_not_this_one():
    share = CoreShare()
    assert share.cores >= 1
    assert share.others() is None  # under a second: too short to tell
    # the formula on known counters: 3 s of busy cores, 1 s of it ours, over 2 s of wall time
    t0 = time.perf_counter() - 2.0
    share._start = (t0, 10.0, 1.0)
    share._busy, share._own = (lambda: 13.0), (lambda: 2.0)
    assert share.others(min_wall=0) == pytest.approx(1.0, rel=0.01)
    # and on the machine's own counters: a busy process beside a sleeping test
    hog = subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(999))"])
    try:
        time.sleep(0.3)  # the interpreter has started
        share = CoreShare()
        time.sleep(1.5)
        assert share.others() >= 0.6
    finally:
        hog.kill()
        hog.wait()


def test_a_run_that_shared_its_cores_says_so_in_the_status(monkeypatch):
    import torch

    monkeypatch.setattr(CoreShare, "others", lambda self, min_wall=1.0: 1.0)
    monkeypatch.setattr(CoreShare, "cores", 2, raising=False)
    monkeypatch.setattr(CoreShare, "__init__", lambda self: None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        live = make_live(epochs=0.2)
        run = live.run_blocking(lr=0.05, batch=64)
        assert run.status == "done"
        assert "Done" in live.status.value and "OMP_NUM_THREADS=1" in live.status.value
        assert "#9a6700" in live.status.value  # the warning colour
        torch.set_num_threads(1)  # a single thread: nothing to say
        live.run_blocking(lr=0.04, batch=64)
        assert "Done" in live.status.value and "OMP_NUM_THREADS" not in live.status.value
    finally:
        torch.set_num_threads(before)


def test_a_figure_whose_view_applied_no_update_is_rebuilt_with_its_curves():
    # what anywidget does to a model whose 5 MB ES module loads in over 2 s: it drops every
    # message, the view keeps the empty figure it was made with, and the kernel hears of
    # neither a view nor an applied edit (PlotlyFigure.deaf)
    live = make_live(epochs=0.3)
    run = live.run_blocking(lr=0.05, batch=64)
    old = live.figure
    assert old.widget in live.widget.children
    shown = [(t.meta, len(t.x)) for t in old.fig.data]
    assert shown and all(n > 0 for _, n in shown)
    old.fig._view_count = 0  # tracked, as in a kernel, and no view counted ...
    old.fig._trace_edit_in_process = True  # ... nor any edit acknowledged
    live._shown = True
    assert live._heal_deaf_figures() == 0  # the last draw is too recent to tell
    old.last_draw -= 10
    for acked, views in [(False, 0), (True, 1), (True, None)]:  # applied, viewed, untracked
        old.fig._trace_edit_in_process, old.fig._view_count = acked, views
        assert not old.deaf() and live._heal_deaf_figures() == 0 and live.figure is old
    old.fig._trace_edit_in_process, old.fig._view_count = True, 0
    live._shown = False  # never displayed: no browser to heal
    assert old.deaf() and live._heal_deaf_figures() == 0 and live.figure is old
    live._shown = True
    assert live._heal_deaf_figures() == 1 and live.rebuilds == 1
    new = live.figure
    assert new is not old and new.widget in live.widget.children
    assert old.widget not in live.widget.children
    # the new widget's first state carries every curve, and its views are counted
    assert [(t.meta, len(t.x)) for t in new.fig.data] == shown
    assert [(t["meta"], len(t["x"])) for t in new.fig._widget_data] == shown  # not messages
    assert new.fig._view_count == 0 and new.last_draw == old.last_draw
    # and the widget goes on drawing into it: a second run adds its curves, none twice
    second = live.run_blocking(lr=0.03, batch=64)
    metas = [t.meta for t in new.fig.data]
    assert len(metas) == len(set(metas)) and any(m.startswith(f"{second.id}:") for m in metas)
    assert any(m.startswith(f"{run.id}:") for m in metas)
    # a front end that never shows plotly is not rebuilt for ever
    live.rebuilds = live.MAX_REBUILDS
    new.last_draw -= 10
    new.fig._trace_edit_in_process = True
    assert new.deaf() and live._heal_deaf_figures() == 0


# measured in Chromium on PlotlyFigure's own layout (BENCHMARKS.md, fourteenth session): how far
# below the figure's top edge the title block ends, without and with a subtitle, and how high
# one and two rows of mark labels reach above the plot
TITLE_BOTTOM = {(1.0, False): 24, (1.0, True): 55, (1.6, False): 34, (1.6, True): 82}
LABEL_ROWS = {(1.0, 0): 0, (1.0, 1): 15, (1.0, 2): 29, (1.6, 0): 0, (1.6, 1): 23, (1.6, 2): 45}


@pytest.mark.parametrize("scale", [1.0, 1.6])
def test_the_plotly_title_and_mark_labels_have_room_above_the_plot(scale):
    """The title hangs from the figure's top edge; below it go the mark labels (lesson 1 lifts
    the second one a row, and at the old fixed margin of 50 px it ran into the title). The
    data set's name is plotly's subtitle: at the end of one long title line it ran off the
    figure, and as a second line after <br> the title rose above the figure's top edge."""
    fig = PlotlyFigure("steps", "weight")
    fig.set_scale(scale)
    line = Trace("w", [0, 1, 2], [1.0, 0.5, 0.25])
    tops = {}
    for sub in (False, True):
        for n in (0, 1, 2, 3):
            marks = [Mark(0.5 + 0.1 * i, f"mark {i}") for i in range(n)]
            data = "\ngenerated shapes (Imagenette layout) - GENERATED DATA" if sub else ""
            fig.draw([line], title="Carrying hyperparameters from B to b" + data, marks=marks)
            layout = fig.fig.layout
            assert layout.title.text == "Carrying hyperparameters from B to b"
            assert ("GENERATED DATA" in layout.title.subtitle.text) is sub
            assert ("GENERATED DATA" in fig.title()) is sub
            room = layout.margin.t - TITLE_BOTTOM[scale, sub]
            assert room >= LABEL_ROWS[scale, min(n, 2)], (sub, n, layout.margin.t)
            tops[sub, n] = layout.margin.t
        assert tops[sub, 0] < tops[sub, 1] < tops[sub, 2] == tops[sub, 3]
    if scale == 1.0:
        assert tops[False, 0] == PlotlyFigure.TOP  # a plain figure as before


def test_default_legend_label_names_ticked_boxes_and_leaves_out_unticked_ones():
    """Lesson 4's runs each read "reference=False" in the legend; a box now shows by its name
    when ticked and not at all when not."""
    controls = {
        "lr": W.FloatLogSlider(value=0.05, base=10, min=-3, max=0, continuous_update=False),
        "milestones": W.IntRangeSlider(value=(2, 4), min=1, max=5, continuous_update=False),
        "reference": W.Checkbox(value=False),
    }
    live = LiveRun(controls, lambda v: TrainConfig.from_profile("ci"), name="labels")
    assert live.label(live.values()) == "lr=0.05, milestones=(2, 4)"
    controls["reference"].value = True
    assert live.label(live.values()) == "lr=0.05, milestones=(2, 4), reference"
    assert settings_label({"centered": False}) == "defaults"


def test_a_long_legend_goes_under_the_plot_and_the_figure_grows_for_it():
    """Replayed runs add a legend entry each: nine long ones squeezed plotly's plot to less
    than half its height and ran over the x axis' title, and covered half of matplotlib's
    curves (Colab's renderer). Each legend row now adds height below the plot instead."""
    long = "baseline (B=256): lamb, B=256 -> b=32, lr=0.02 at B, rule=lamb (saved, cuda)"
    assert legend_rows([long] * 9) == 9
    assert legend_rows(["train loss", "val loss", "val accuracy"]) == 1
    assert legend_rows([]) == 0

    def traces(n):
        return [Trace(f"r{i}", [0, 1, 2], [2.0, 1.5 - 0.01 * i, 1.2], name=long) for i in range(n)]

    fig = PlotlyFigure("samples seen", "loss", y2label="val accuracy")
    fig.draw(traces(1), title="t")
    one = fig.fig.layout.height
    assert one == fig.height and fig.fig.layout.legend.yref == "container"
    fig.draw(traces(9), title="t")
    assert fig.fig.layout.height == one + 8 * fig.LEGEND_ROW
    fig.draw(traces(2), title="t")  # fewer runs: the figure shrinks back
    assert fig.fig.layout.height == one + fig.LEGEND_ROW

    mpl = MatplotlibFigure("samples seen", "loss", y2label="val accuracy")
    heights = {}
    for n in (1, 9, 9):  # drawn twice: a redraw replaces the legend, never adds one
        mpl.draw(traces(n), title="t")
        assert len(mpl.fig.legends) == 1 and not mpl.ax.get_legend()
        legend = mpl.fig.legends[0].get_window_extent()
        axes = mpl.ax.get_window_extent()
        assert legend.y1 < axes.y0  # under the plot, not over the curves
        heights[n] = axes.height
    assert heights[9] == pytest.approx(heights[1], rel=0.05)  # the plot kept its height


def test_the_chance_note_names_each_stuck_run_with_its_own_loss():
    """With several runs, the note gave the last run's loss, stuck or not (or failed on a run
    without an evaluation)."""
    from lessons.config import Metrics
    from widgets.runs import RunRecord
    from widgets.status import stayed_at_chance

    def run(label, val_loss, val_acc):
        ev = Metrics(10, 640, 1.0, None, 0.05, 64, val_loss, val_acc, kind="eval")
        return RunRecord(1, {}, label, records=[ev])

    text, level = stayed_at_chance([run("stuck", 2.31, 0.1), run("fine", 1.5, 0.5)], 10)
    assert "stuck (val loss 2.310)" in text and "fine" not in text and "1.500" not in text
    assert stayed_at_chance([run("fine", 1.5, 0.5), RunRecord(2, {}, "none")], 10) is None


# --------------------------------------------------------------------------- the legend
def fake_requests(live, lrs, names=("small", "large")):
    """Requests of ``live`` as if trained, one per lr, each with a finished run per name (a
    few points each): the legend and the title without training."""
    from lessons.config import Metrics

    for lr in lrs:
        live.history.new_request()
        values = {"lr": lr, "batch": 64}
        for k, name in enumerate(names):  # each its own curve: none drawn over another
            run = live.history.add(name, live.label_run(name, None, values), values, {})
            run.records = [
                Metrics(i, 64 * i, i / 10, 2.0 - i / 10 - lr - k / 100, lr, 64, kind="train")
                for i in range(1, 6)
            ]
            run.status = "done"
    live.draw()


def legend_entries(live) -> list[str]:
    """The legend's entries in the order the figure shows them."""
    fig = live.figure
    if live.renderer_name == "plotly":
        shown = [t for t in fig.fig.data if t.showlegend is not False]
        return [t.name for t in sorted(shown, key=lambda t: t.legendrank or 1000)]
    fig.fig.canvas.draw()  # as drawn: row by row, left to right
    renderer = fig.fig.canvas.get_renderer()
    boxes = [(t.get_window_extent(renderer), t.get_text()) for t in fig.fig.legends[0].texts]
    return [text for box, text in sorted(boxes, key=lambda b: (-round(b[0].y0), b[0].x0))]


@pytest.mark.parametrize("renderer", ["plotly", "matplotlib"])
def test_legend_lines_say_what_differs_and_the_title_what_every_run_shares(renderer):
    """Every legend line repeated the whole settings string ("small: lr=0.05, batch=64"): the
    settings every run shares now stand once under the title, and each line names the run and
    what differs, the faded older request's too; the hover text and the run keep it all."""
    live = make_live(renderer=renderer, replay=False, auto_run=False)
    fake_requests(live, [0.05, 0.02])
    title_lines = live.figure.title().split("\n")
    assert title_lines[0] == live.title and title_lines[1] == "all runs: batch=64"
    entries = legend_entries(live)
    assert entries == ["small: lr=0.02", "large: lr=0.02", "small: lr=0.05", "large: lr=0.05"]
    assert not [e for e in entries if "batch" in e]
    old = live.runs[0]
    assert old.label == "small: lr=0.05, batch=64"  # the run log and the CSV keep it all
    if renderer == "plotly":
        hover = {t.meta: t.hovertemplate for t in live.figure.fig.data}
        assert hover[f"{old.id}:loss"].startswith("small: lr=0.05, batch=64<br>")
    # one request alone: every setting is shared, the lines name the runs
    live.clear()
    assert legend_entries(live) == ["small", "large"]
    assert live.figure.title().split("\n")[1] == "all runs: lr=0.02, batch=64"


@pytest.mark.parametrize("renderer", ["plotly", "matplotlib"])
def test_the_newest_requests_runs_lead_the_legend_and_older_ones_fold_away(renderer):
    """With many requests the legend grew into a scrolling box, oldest first, that cut off the
    newest runs: now the newest request's entries come first, the one or two before it follow,
    and the older runs, still drawn faded, share one entry."""
    live = make_live(renderer=renderer, replay=False, auto_run=False)
    lrs = [0.01 * (i + 1) for i in range(9)]
    fake_requests(live, lrs)
    groups = len({r.group for r in live.runs})
    assert groups == live.history.max_history + 1 >= 7  # the history keeps 7 requests
    entries = legend_entries(live)
    assert entries[:2] == ["small: lr=0.09", "large: lr=0.09"]
    assert entries[2:4] == ["small: lr=0.08", "large: lr=0.08"]
    from widgets.legend import SHOWN_ENTRIES

    assert len(entries) <= SHOWN_ENTRIES + 1
    folded = len(live.runs) - (len(entries) - 1)
    assert entries[-1] == f"earlier runs ({folded})" and folded >= 6
    # every run's curve is still drawn
    drawn = {t["uid"].split(":")[0] for t in live.traces() if t["points"]}
    assert {str(r.id) for r in live.runs} <= drawn


def test_label_parts_keep_bracketed_values_whole():
    from widgets.legend import label_parts, shared_settings
    from widgets.runs import RunRecord

    base = RunRecord(1, {}, "baseline (B=256): lamb, lr=0.02, betas=(0.9, 0.99)", name="x")
    base.name = "baseline (B=256)"
    assert label_parts(base) == ["lamb", "lr=0.02", "betas=(0.9, 0.99)"]
    moved = RunRecord(2, {}, "lamb (b=32): lamb, lr=0.0025, betas=(0.987, 0.999)")
    moved.name = "lamb (b=32)"
    assert shared_settings([base, moved]) == ["lamb"]
    alone = RunRecord(3, {}, "lr=0.1, milestones=(2, 4), reference")
    assert label_parts(alone) == ["lr=0.1", "milestones=(2, 4)", "reference"]


def test_runs_a_figure_does_not_draw_take_no_room_in_its_legend():
    """Lesson 5's first panel draws one family of a request's runs: only the drawn runs count
    towards the entries that fold older requests away."""
    from widgets.scene import RAW_LOSS, Series, smoothed_loss

    def only_small(run, view):
        return smoothed_loss(run, view) if run.name == "small" else ([], [])

    series = (RAW_LOSS, Series("loss", "train loss", compute=only_small))
    live = make_live(renderer="plotly", replay=False, auto_run=False, series=series)
    names = ("small", "b", "c", "d", "e")
    fake_requests(live, [0.01, 0.02, 0.03, 0.04], names)
    entries = legend_entries(live)
    assert entries == ["small: lr=0.04", "small: lr=0.03", "small: lr=0.02", "earlier runs (1)"]
