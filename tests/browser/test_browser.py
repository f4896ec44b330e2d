"""Every notebook run top to bottom in JupyterLab in a real browser, and the widgets driven
with the keyboard and the mouse as a student would (see conftest.py for the set-up)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.browser.conftest import ARTIFACTS

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"

PANEL_JS = """name => Array.from(window.jupyterapp.shell.widgets('main'))
  .find(w => w.context && w.context.path === name && w.content && w.sessionContext)"""

STATE_JS = (
    """name => {
  const w = ("""
    + PANEL_JS
    + """)(name);
  if (!w || !w.content.model) return null;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = Array.from(w.content.model.cells).filter(c => c.type === 'code');
  const errors = [];
  cells.forEach((c, i) => c.outputs.toJSON().forEach(o => {
    if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
  }));
  return {
    kernel: kernel ? kernel.status : 'none',
    total: cells.length,
    executed: cells.filter(c => c.executionCount !== null).length,
    running: cells.filter(c => c.executionState === 'running').length,
    errors,
  };
}"""
)

RUN_ALL_JS = (
    """async name => {
  const w = ("""
    + PANEL_JS
    + """)(name);
  window.jupyterapp.shell.activateById(w.id);
  await window.jupyterapp.commands.execute('notebook:run-all-cells');
}"""
)


RUN_UNTIL_JS = (
    """async ([name, text]) => {
  const w = ("""
    + PANEL_JS
    + """)(name);
  window.jupyterapp.shell.activateById(w.id);
  const cells = Array.from(w.content.model.cells);
  const at = cells.findIndex(c => c.type === 'code' && c.sharedModel.getSource().includes(text));
  if (at < 0) throw new Error(`no code cell contains ${text}`);
  w.content.activeCellIndex = at + 1;
  await window.jupyterapp.commands.execute('notebook:run-all-above');
  return cells.slice(0, at + 1).filter(c => c.type === 'code').length;
}"""
)


def state(page) -> dict | None:
    return page.evaluate(STATE_JS, page.notebook)


def wait_for(page, cond, timeout: float, what: str):
    s = wait_until(lambda: state(page), lambda s: s is not None and cond(s), timeout)
    if s is None or not cond(s):
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {s}")
    return s


def wait_until(get, ok, timeout: float):
    """Poll ``get()`` until ``ok`` holds of its value or ``timeout`` seconds pass: the last
    value."""
    t0 = time.time()
    while True:
        value = get()
        if ok(value) or time.time() - t0 > timeout:
            return value
        time.sleep(0.25)


def open_notebook(page, lab, name: str):
    # a workspace of its own: JupyterLab restores no tab from an earlier test
    page.goto(lab.url(f"lab/workspaces/{lab.workspace()}/tree/{name}"))
    page.notebook = name
    page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=120_000)
    wait_for(page, lambda s: s["kernel"] == "idle", 120, "the kernel to start")


def run_all(page, timeout: float = 600) -> dict:
    page.evaluate(RUN_ALL_JS, page.notebook)
    return wait_for(
        page,
        lambda s: (
            s["kernel"] == "idle"
            and s["running"] == 0
            and (s["executed"] == s["total"] or s["errors"])
        ),
        timeout,
        "every cell to run",
    )


def run_until(page, text: str, timeout: float = 600) -> dict:
    """Run every cell up to and including the first code cell containing ``text``."""
    code_cells = page.evaluate(RUN_UNTIL_JS, [page.notebook, text])
    return wait_for(
        page,
        lambda s: (
            s["kernel"] == "idle"
            and s["running"] == 0
            and (s["executed"] >= code_cells or s["errors"])
        ),
        timeout,
        f"the cells up to {text!r} to run",
    )


def live_widget(page, label: str):
    """The LiveRun whose controls include ``label``: the innermost box holding the control,
    the Run button and the figure."""
    return (
        page.locator(f"{PANEL} .widget-vbox")
        .filter(has=page.locator(".widget-label", has_text=label))
        .filter(has=page.locator("button", has_text="Stop"))
        .filter(has=page.locator(".js-plotly-plot"))
        .last
    )


def plotted_in(figure) -> list[int]:
    return figure.evaluate("el => (el.data || []).map(t => (t.x || []).length)")


def curves(widget) -> dict[str, int]:
    """Trace id -> points of each curve with a legend entry in the widget's plotly figure (a
    run's legend name changes as newer runs come: what differs from them)."""
    return dict(
        widget.locator(".js-plotly-plot").first.evaluate(
            "el => (el.data || []).filter(t => t.showlegend !== false && t.meta !== 'earlier')"
            ".map(t => [t.meta, (t.x || []).length])"
        )
    )


def named(widget) -> dict[str, int]:
    """Legend name -> points of each curve with a legend entry."""
    return dict(
        widget.locator(".js-plotly-plot").first.evaluate(
            "el => (el.data || []).filter(t => t.showlegend !== false)"
            ".map(t => [t.name, (t.x || []).length])"
        )
    )


def status(widget) -> str:
    return widget.locator(".widget-html-content").first.inner_text()


def record_timing(name: str, seconds: float, page) -> None:
    """Add how long run-all took, and each widget's "Done ... in N s" line, to
    artifacts/browser/timings.json: what a student's browser costs the training on this
    machine (BENCHMARKS.md compares it with the same notebook under nbval)."""
    path = ARTIFACTS / "timings.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    done = page.locator(f"{PANEL} .widget-html-content").all_inner_texts()
    found[name] = {
        "run_all_s": round(seconds, 1),
        "widgets": [t.split(":")[0] for t in done if t.startswith("Done")],
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=1))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_all_cells_without_an_error(page, lab, name):
    open_notebook(page, lab, name)
    t0 = time.perf_counter()
    s = run_all(page)
    record_timing(name, time.perf_counter() - t0, page)
    assert not s["errors"], s["errors"]
    assert s["executed"] == s["total"] > 0
    # the widgets rendered: a live figure with its curves (not "Plotly is not defined")
    figures = page.locator(f"{PANEL} .js-plotly-plot")
    assert figures.count() > 0
    # the browser applies the figure's updates asynchronously, so wait for the curves. A figure
    # that stays empty ([[]] below) is a known failure, reproduced by slowing Chromium 40x for
    # the first 8 s of run-all: anywidget gives a model 2 s to load its ES module (plotly's
    # is 5 MB, inline) and drops every message to that model once the 2 s have passed
    shown = wait_until(
        lambda: [plotted_in(f) for f in figures.all()], lambda p: any(map(any, p)), 60
    )
    assert any(map(any, shown)), (
        f"no figure drew a point 60 s after the last cell ended: points per trace {shown}, "
        f"status lines {page.locator(f'{PANEL} .widget-html-content').all_inner_texts()}"
    )


@pytest.mark.parametrize(
    "name, upto, label, key, stop",
    [
        # batch 16: the longest run (3 - 4 s on the ci profile): its curve grows, then Stop
        ("00_start_here.ipynb", "start_here()", "batch size", "Home", 1),
        # a ci-profile run of lesson 1 takes 0.7 - 1 s, over before a click can stop it (tried:
        # a Stop as soon as the status said Running came after the end 2 times in 3): it runs out
        ("01_discounting_half_life_ema.ipynb", "live_ema()", "beta1 / momentum", "ArrowLeft", 0),
    ],
)
def test_keyboard_moves_a_slider_the_run_grows_and_stop_stops_it(
    page, lab, name, upto, label, key, stop
):
    open_notebook(page, lab, name)
    s = run_until(page, upto)  # the widget on screen; the notebook's own runs are not needed
    assert not s["errors"], s["errors"]
    widget = live_widget(page, label)
    widget.scroll_into_view_if_needed()
    # a Stop click can reach a 4-s run after its end (Playwright's checks, a loaded machine):
    # then a new learning rate starts a new run and Stop is tried again, at most twice more
    moves = [(label, key)] + [("learning rate", "ArrowLeft")] * (2 if stop else 0)
    for control, press in moves:
        before = curves(widget)
        slider = widget.locator(
            ".widget-slider", has=page.locator(".widget-label", has_text=control)
        )
        slider.locator(".noUi-handle").first.focus()
        page.keyboard.press(press)
        t0 = time.time()
        while not status(widget).startswith("Running"):
            assert time.time() - t0 < 30, f"no run started: {status(widget)!r}"
            time.sleep(0.02)
        while stop and not any(n > 0 for k, n in curves(widget).items() if k not in before):
            assert time.time() - t0 < 30, f"the new run drew no point: {status(widget)!r}"
            assert status(widget).startswith("Running"), status(widget)  # it must still run
            time.sleep(0.02)
        if stop:
            widget.locator("button", has_text="Stop").click()
        t0 = time.time()
        while not status(widget).startswith(("Stopped", "Done")):
            assert time.time() - t0 < 30, f"the run did not end: {status(widget)!r}"
            time.sleep(0.05)
        if status(widget).startswith("Stopped") or not stop:
            break
    assert status(widget).startswith("Stopped" if stop else "Done"), status(widget)
    after = wait_until(
        lambda: curves(widget),
        lambda c: any(n > 0 for k, n in c.items() if k not in before),
        10,
    )
    new = {name: n for name, n in after.items() if name not in before}
    assert len(new) == 1, (before, after)  # the new run's curve...
    assert next(iter(new.values())) > 0, after  # ...with the points it trained


def test_matplotlib_renderer_in_the_browser(page, lab_matplotlib):
    open_notebook(page, lab_matplotlib, "00_start_here.ipynb")
    s = run_all(page)
    assert not s["errors"] and s["executed"] == s["total"]
    assert page.locator(f"{PANEL} .js-plotly-plot").count() == 0
    images = page.locator(f"{PANEL} .widget-image")
    assert images.count() > 0
    sizes = [img.evaluate("el => [el.naturalWidth, el.naturalHeight]") for img in images.all()]
    assert all(w > 300 and h > 200 for w, h in sizes), sizes


def test_lesson_4s_reference_box_adds_a_run_whose_curve_is_drawn(page, lab):
    open_notebook(page, lab, "04_noise_scale.ipynb")
    s = run_until(page, "schedules_live()")
    assert not s["errors"], s["errors"]
    widget = live_widget(page, "factor k")
    widget.scroll_into_view_if_needed()
    box = widget.locator(".widget-checkbox", has_text="also: no decay, no growth")
    tick = box.locator("input[type=checkbox]")
    assert tick.is_checked()  # the null run is on by default: the lesson's claim needs it
    tick.uncheck()
    tick.check()
    t0 = time.time()
    schedules = ("decay lr", "grow batch", "hybrid", "no decay")

    def trained(names: dict) -> set:  # the schedules drawn from this session's runs, not the log's
        return {
            s
            for s in schedules
            for k, n in names.items()
            if k.startswith(s) and n > 0 and "(saved" not in k
        }

    # the three schedules, then the reference, one after the other on a CPU (each with its seeds)
    while trained(named(widget)) != set(schedules):
        assert time.time() - t0 < 180, f"not every curve: {status(widget)!r} {named(widget)}"
        time.sleep(0.1)
    widget.locator("button", has_text="Stop").click()
    t0 = time.time()
    while not status(widget).startswith(("Stopped", "Done")):
        assert time.time() - t0 < 30, f"the run did not stop: {status(widget)!r}"
        time.sleep(0.05)


FIGURE_JS = """el => ({
  traces: (el.data || []).map(t => ({
    name: t.name || '', color: (t.line || {}).color, opacity: t.opacity,
    legend: t.showlegend !== false, points: (t.x || []).length,
  })),
  legend: Array.from(el.querySelectorAll('.legend .traces')).map(g => {
    const r = g.getBoundingClientRect();
    return {text: g.textContent, top: Math.round(r.top), left: r.left, bottom: r.bottom,
            right: r.right};
  }),
  subtitle: ((el.layout.title || {}).subtitle || {}).text || '',
  box: (() => { const r = el.getBoundingClientRect();
    return {top: r.top, left: r.left, bottom: r.bottom, right: r.right}; })(),
})"""


def figure_state(figure) -> dict:
    return figure.evaluate(FIGURE_JS)


def newest_first(fig: dict) -> bool:
    """The newest request's runs (drawn at full opacity) lead the legend, as it reads."""
    active = {t["name"] for t in fig["traces"] if t["legend"] and t["opacity"] == 1}
    shown = [e["text"] for e in sorted(fig["legend"], key=lambda e: (e["top"], e["left"]))]
    return bool(active) and set(shown[: len(active)]) == active


def settings(text: str) -> list[str]:
    """ "lr=0.02, betas=(0.9, 0.99)" -> its settings, split at the commas outside brackets."""
    return re.split(r", (?![^(]*\))", text)


def by_batch(name: str) -> str:
    found = re.search(r"B=\d+", name)
    return found.group(0) if found else name


@pytest.mark.parametrize(
    "name, slider, role_in_panel",
    [
        # lesson 2: baseline, naive, lr only and the rule's run; no panel of runs
        ("02_deriving_beta_one_over_b.ipynb", "lr at B", None),
        # lesson 4: the schedules, their noise scale in the panel under the loss
        ("04_noise_scale.ipynb", "base lr", lambda n: n.split(":")[0]),
        # lesson 5: standard Adam's sweep, the invariant runs in the panel: a colour per batch
        ("05_micro_batch_variance.ipynb", "lr at the smallest batch", by_batch),
    ],
)
def test_after_a_slider_move_the_legend_leads_with_the_newest_runs_and_roles_keep_colours(
    page, lab, name, slider, role_in_panel
):
    """Lessons 2, 4 and 5: a run's colour changed with every request and between panels, and
    the legend repeated every setting in a box whose newest entries were cut off."""
    open_notebook(page, lab, name)
    s = run_until(page, "runs = live.run_blocking(")  # the widget and its first request
    assert not s["errors"], s["errors"]
    widget = live_widget(page, slider)
    widget.scroll_into_view_if_needed()
    figure = widget.locator(".js-plotly-plot").first
    control = widget.locator(".widget-slider", has=page.locator(".widget-label", has_text=slider))
    control.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowLeft")
    t0 = time.time()
    while not status(widget).startswith("Running"):
        assert time.time() - t0 < 30, f"no run started: {status(widget)!r}"
        time.sleep(0.05)
    while not status(widget).startswith("Done"):
        assert time.time() - t0 < 300, f"the request did not finish: {status(widget)!r}"
        time.sleep(0.2)
    fig = wait_until(lambda: figure_state(figure), newest_first, 20)
    active = [t for t in fig["traces"] if t["legend"] and t["opacity"] == 1]
    earlier = [t for t in fig["traces"] if t["legend"] and t["name"].startswith("earlier runs")]
    faded = [t for t in fig["traces"] if t["legend"] and t["opacity"] < 1 and t not in earlier]
    assert newest_first(fig), (active, fig["legend"])
    if earlier:  # older requests (here the runs other tests saved) share the last entry
        last = max(fig["legend"], key=lambda e: (e["top"], e["left"]))
        assert last["text"] == earlier[0]["name"], fig["legend"]
    box = fig["box"]
    for entry in fig["legend"][: len(active)]:  # inside the figure, not scrolled away
        assert box["top"] <= entry["top"] and entry["bottom"] <= box["bottom"] + 1, entry
    # each line names its run and what differs: the shared settings stand once in the title
    (shared,) = [line for line in fig["subtitle"].split("<br>") if line.startswith("all runs: ")]
    shared = set(settings(shared.removeprefix("all runs: ")))
    for t in active + faded:
        assert ": " in t["name"] and not shared & set(settings(t["name"].split(": ", 1)[1])), t
    # a role keeps its colour across the two requests; two roles never share one
    role = {t["name"].split(":")[0]: t["color"] for t in faded}
    assert any(t["name"].split(":")[0] in role for t in active), (active, faded)
    for t in active:
        assert role.get(t["name"].split(":")[0], t["color"]) == t["color"], (t, role)
    assert len({t["color"] for t in active}) == len(active), active
    if role_in_panel is None:
        return
    # ... and the same colour in the panel under the figure
    main = {role_in_panel(t["name"]): t["color"] for t in active}
    panel = figure_state(widget.locator(".js-plotly-plot").nth(1))["traces"]
    pairs = [(t, main[role_in_panel(t["name"])]) for t in panel if role_in_panel(t["name"]) in main]
    assert pairs, (panel, main)
    assert all(t["color"] == color for t, color in pairs), pairs
