"""05 micro-batch variance: a batch-size sweep for standard Adam (square-root rule) and for
batch-size-invariant Adam (linear rule), each in its own panel, with the spread measured."""

from __future__ import annotations

import html

import ipywidgets as W

from lessons import scaling as S
from lessons.profiles import get_profile
from lessons.train import TrainConfig, epoch_train_loss
from widgets.live import STYLE, LiveRun, Series, Trace, log_slider

SIZES = (16, 32, 64, 128, 256, 512)
ADAM, INVARIANT = "Adam, sqrt rule", "invariant Adam, linear rule"


def spreads(live: LiveRun) -> dict[str, float]:
    """The sweep spread (lessons.scaling.sweep_spread of per-epoch train loss) of each
    optimizer in the newest request, once all its runs are done."""
    out = {}
    for family in (ADAM, INVARIANT):
        runs = [r for r in live.last_group.values() if r.name.startswith(family)]
        if len(runs) >= 2 and all(r.status == "done" for r in runs):
            curves = [epoch_train_loss(r.records) for r in runs]
            width = min(map(len, curves))
            out[family] = S.sweep_spread([c[:width] for c in curves])
    return out


def summary(live: LiveRun) -> str:
    found = spreads(live)
    if not found:
        return ""
    rows = "".join(f"<li>{html.escape(k)}: <b>{v:.3f}</b></li>" for k, v in found.items())
    return (
        "Spread across batch sizes (largest minus smallest per-epoch train loss, averaged "
        f"over the second half):<ul>{rows}</ul>"
    )


def _only(family: str):
    """A Series.compute that draws a run's train loss only if it belongs to ``family``."""

    def compute(run, view):
        if not run.name.startswith(family):
            return [], []
        return run.series("epoch")["loss"]

    return compute


def invariant_panel(live: LiveRun) -> tuple[list[Trace], str]:
    traces = []
    for run in live.last_group.values():
        if run.name.startswith(INVARIANT):
            pts = [m for m in run.records if m.kind == "train"]
            traces.append(
                Trace(
                    f"inv:{run.name}",
                    [m.epoch for m in pts],
                    [m.loss for m in pts],
                    name=run.name,
                    color=run.color,
                    width=1.5,
                )
            )
    return traces, f"{INVARIANT} (lr proportional to B, betas^(B/B0))"


def sweep_live(profile: str | None = None, **kwargs) -> LiveRun:
    """Train a sweep of batch sizes with both optimizers."""
    p = get_profile(profile)
    epochs = max(p.epochs, 6)
    n_train = p.n_train  # Imagenette's count, or the generated set's
    sizes = [b for b in SIZES if b <= n_train // 4]
    controls = {
        "lr": log_slider(5e-4, "lr at the smallest batch", -4, -1.5),
        "sizes": W.SelectionRangeSlider(
            options=sizes,
            index=(1, min(4, len(sizes) - 1)),
            description="batch sizes",
            continuous_update=False,
            style=STYLE,
        ),
        "kappa": W.SelectionSlider(
            options=[8, 16, 32],
            value=32,
            description="micro-batch kappa",
            continuous_update=False,
            style=STYLE,
        ),
        "norm": W.Dropdown(options=["batch", "layer"], value="batch", description="norm"),
    }

    def make_config(v: dict) -> dict[str, TrainConfig]:
        lo, hi = v["sizes"]
        batches = [b for b in sizes if lo <= b <= hi]
        if len(batches) < 2:
            raise ValueError("choose a range with at least two batch sizes")
        kappa = int(v["kappa"])
        if lo % kappa:
            raise ValueError(
                f"the micro-batch kappa={kappa} must divide the smallest batch "
                f"({lo}): choose a smaller kappa or larger batches"
            )
        base = dict(lr=float(v["lr"]), betas=(0.9, 0.999), eps=1e-8)
        common = dict(epochs=epochs, weight_decay=0.0, norm=v["norm"])
        configs = {}
        for b in batches:
            hp = S.transfer(base, lo, b, "adam-sqrt")
            configs[f"{ADAM} B={b}"] = TrainConfig.from_profile(
                p.name, optimizer="adam", batch=b, **common, **hp
            )
        for b in batches:
            hp = S.transfer(base, lo, b, "invariant-adam")
            configs[f"{INVARIANT} B={b}"] = TrainConfig.from_profile(
                p.name, optimizer="invariant-adamw", batch=b, micro_batch=kappa, **common, **hp
            )
        return configs

    series = (
        Series("loss", "train loss", compute=_only(ADAM)),
        Series(
            "val_loss",
            "val loss",
            mode="lines+markers",
            dash="dash",
            compute=lambda run, view: (
                run.series("epoch")["val_loss"] if run.name.startswith(ADAM) else ([], [])
            ),
        ),
    )
    return LiveRun(
        controls,
        make_config,
        name="05_micro_batch",
        series=series,
        summary=summary,
        xlabel="epochs",
        panel=invariant_panel,
        panel_axes=dict(xlabel="epochs", ylabel="loss", height=380),
        title=f"{ADAM} (lr proportional to sqrt B) - {p.name} profile",
        y2label=None,
        max_history=1,
        **kwargs,
    )
