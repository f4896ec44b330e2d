"""00 start here: learning rate and batch size against the loss curve."""

from __future__ import annotations

import math

import ipywidgets as W

from lessons.config import TrainConfig
from lessons.profiles import get_profile
from widgets.controls import STYLE, log_slider
from widgets.live import LiveRun

BATCHES = (16, 32, 64, 128, 256, 512, 1024)
# the lesson compares the profile's batch with four times it: that run needs this many steps
# to move off chance, or it reads as broken rather than as "fewer steps"
STEPS_AT_4X = 25


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

    epochs = max(p.epochs, math.ceil(STEPS_AT_4X * 4 * p.batch / p.n_train))

    def make_config(v: dict) -> TrainConfig:
        return TrainConfig.from_profile(
            p.name, lr=float(v["lr"]), batch=int(v["batch"]), epochs=epochs
        )

    return LiveRun(
        controls,
        make_config,
        name="00_start_here",
        title=f"SGD with momentum 0.9 ({p.name} profile)",
        **kwargs,
    )
