"""Controls shared by the lessons' widgets."""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as W

STYLE = {"description_width": "initial"}  # long slider labels stay readable

# the controls that select one of their options
ONE_OF = (W.Dropdown, W.RadioButtons, W.Select, W.SelectionSlider, W.ToggleButtons)


def log_slider(
    value: float, description: str, lo: float, hi: float, step: float = 0.1
) -> W.FloatLogSlider:
    """A slider on a log10 scale from 10**lo to 10**hi (learning rates), committing on
    release so that each move starts one run."""
    return W.FloatLogSlider(
        value=value,
        base=10,
        min=lo,
        max=hi,
        step=step,
        description=description,
        continuous_update=False,
        readout_format=".3g",
        style=STYLE,
    )


def check_controls(controls: dict[str, W.ValueWidget]) -> None:
    """Refuse a selection control that offers the value None: ipywidgets reads that value as
    "nothing selected", so picking the option would blank the control in the browser."""
    for key, control in controls.items():
        if isinstance(control, ONE_OF) and None in control._options_values:
            raise ValueError(
                f"control {key!r} offers the value None, which ipywidgets shows as no "
                "selection: give that option another value (a string such as 'off')"
            )


def x_axis_toggle(
    x_toggle: bool | Sequence[tuple[str, str]], xlabel: str
) -> tuple[W.ToggleButtons | None, dict[str, str]]:
    """A view control that switches the x axis between samples seen and parameter updates
    (True), or between the given (label, Metrics field) options (None for False); and the
    axis title of each field."""
    if isinstance(x_toggle, bool):
        options = [(xlabel, "samples"), ("parameter updates", "step")] if x_toggle else []
    else:
        options = list(x_toggle)
    xlabels = {"samples": xlabel, **{v: k for k, v in options}}
    if not options:
        return None, xlabels
    # its own width, never shrunk: in a wrapping row of controls the label and its buttons
    # move to the next line together instead of the buttons wrapping under the label
    toggle = W.ToggleButtons(
        options=options,
        value=options[0][1],
        description="x axis",
        style=STYLE,
        layout=W.Layout(flex="0 0 auto", width="max-content"),
    )
    return toggle, xlabels
