"""Checks of the Colab test environment itself, run by `make test-colab` in .venv-colab beside
the notebooks (its name keeps it out of the main run, where ipywidgets 8 is installed): the
environment holds tests/colab-requirements.txt's versions, the course is installed from this
checkout, and the widgets draw with matplotlib, as on Colab."""

import importlib.metadata
import re
from pathlib import Path

import ipywidgets

ROOT = Path(__file__).resolve().parent.parent


def colab_pins() -> dict[str, str]:
    text = (ROOT / "tests" / "colab-requirements.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))


def test_the_environment_holds_the_colab_pins():
    pins = colab_pins()
    assert pins["ipywidgets"].startswith("7.") and pins["plotly"].startswith("5.")
    installed = {name: importlib.metadata.version(name).split("+")[0] for name in pins}
    assert installed == pins


def test_the_widgets_run_on_ipywidgets_7():
    from widgets import live

    assert ipywidgets.__version__.startswith("7."), ipywidgets.__version__
    assert live.W is ipywidgets


def test_the_course_is_installed_from_this_checkout():
    import lessons
    import widgets

    assert importlib.metadata.version("batch-size-lessons")
    for package in (lessons, widgets):
        assert Path(package.__file__).resolve().parent.parent == ROOT


def test_the_live_runs_draw_with_matplotlib():
    from widgets.figure import choose_renderer, make_figure

    assert choose_renderer() == "matplotlib"
    assert type(make_figure(xlabel="step", ylabel="loss")).__name__ == "MatplotlibFigure"
