"""00 start here: learning rate and batch size against the loss curve."""

from __future__ import annotations

import ipywidgets as W

from lessons.config import TrainConfig
from lessons.profiles import get_profile
from widgets.controls import STYLE, log_slider
from widgets.live import LiveRun

BATCHES = (16, 32, 64, 128, 256, 512, 1024)


def start_here(profile: str | None = None, **kwargs) -> LiveRun:
    """A LiveRun with sliders for the learning rate (log scale) and the batch size."""
    p = get_profile(profile)
    controls = {
        "lr": log_slider(p.lr, "learning rate", -3, 0.5),
        "batch": W.SelectionSlider(
            options=[b for b in BATCHES if b <= p.n_train],
            value=p.batch,
            description="batch size",
            continuous_update=False,
            style=STYLE,
        ),
    }

    def make_config(v: dict) -> TrainConfig:
        return TrainConfig.from_profile(p.name, lr=float(v["lr"]), batch=int(v["batch"]))

    return LiveRun(
        controls,
        make_config,
        name="00_start_here",
        title=f"SGD with momentum 0.9 ({p.name} profile)",
        **kwargs,
    )
