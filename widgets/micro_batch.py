"""05 micro-batch variance: a batch-size sweep for standard Adam (square-root rule) and for
batch-size-invariant Adam (linear rule), each in its own panel, with the spread measured."""

from __future__ import annotations

import html

import ipywidgets as W

from lessons import scaling as S
from lessons.config import TrainConfig, epoch_train_loss
from lessons.profiles import get_profile
from widgets.controls import STYLE, log_slider
from widgets.figure import Trace
from widgets.live import LiveRun
from widgets.scene import Series, epoch_mean_loss, raw_loss

SIZES = (16, 32, 64, 128, 256, 512)
ADAM, INVARIANT = "Adam, sqrt rule", "invariant Adam, linear rule"
# Wang & Aitchison's reference: standard Adam at batch = micro-batch, what invariant Adam at
# every batch should match (trained apart only where the micro-batch is below the sweep)
MICRO_ADAM = "micro Adam"


SEED_SPREAD = "two seeds of one setting"  # spreads()'s entry for the seed noise


def spreads(live: LiveRun) -> dict[str, float]:
    """The sweep spread (lessons.scaling.sweep_spread of per-epoch train loss) of each
    optimizer in the newest request, once all its runs are done; and as SEED_SPREAD the same
    measure between two seeds of one setting (the sweep's seeded run): what noise alone
    gives."""
    out = {}
    for family in (ADAM, INVARIANT):
        runs = [r for r in live.last_group.values() if r.name.startswith(family)]
        if len(runs) >= 2 and all(r.status == "done" for r in runs):
            out[family] = _sweep_spread(runs)
    seeded = next((r for r in live.last_group.values() if r.seed_runs), None)
    if seeded is not None and all(r.status == "done" for r in (seeded, *seeded.seed_runs)):
        out[SEED_SPREAD] = _sweep_spread([seeded, *seeded.seed_runs])
    return out


def _sweep_spread(runs) -> float:
    curves = [epoch_train_loss(r.records) for r in runs]
    width = min(map(len, curves))
    return S.sweep_spread([c[:width] for c in curves])


def summary(live: LiveRun) -> str:
    found = spreads(live)
    if not found:
        return ""
    rows = "".join(f"<li>{html.escape(k)}: <b>{v:.3f}</b></li>" for k, v in found.items())
    return (
        "Spread across batch sizes (largest minus smallest per-epoch train loss, averaged "
        f"over the second half), and the same between two seeds of the smallest batch's Adam "
        f"run: a sweep spread near it is noise, not the batch size.<ul>{rows}</ul>"
    )


EPOCHS = {"x": "epoch"}  # the view both panels draw: against epochs


def _only(family: str, curve):
    """A Series.compute that draws ``curve`` of a run against epochs, only if the run belongs
    to ``family``."""

    def compute(run, view):
        return curve(run, EPOCHS) if run.name.startswith(family) else ([], [])

    return compute


def invariant_panel(live: LiveRun) -> tuple[list[Trace], str]:
    """The invariant runs (and micro Adam, dashed) as the main figure draws Adam's: each
    epoch's mean loss over the faint per-step loss."""
    traces = []
    for run in live.last_group.values():
        reference = run.name.startswith(MICRO_ADAM)
        if run.name.startswith(INVARIANT) or reference:
            color = "#222222" if reference else run.color
            traces.append(
                Trace(
                    f"inv-raw:{run.name}",
                    *raw_loss(run, EPOCHS),
                    color=color,
                    opacity=0.25,
                    width=0.5,
                    showlegend=False,
                )
            )
            traces.append(
                Trace(
                    f"inv:{run.name}",
                    *epoch_mean_loss(run, EPOCHS),
                    name=run.name,
                    mode="lines+markers",
                    color=color,
                    dash="dash" if reference else "solid",
                    width=1.5,
                )
            )
    return traces, f"{INVARIANT} (lr proportional to B, betas^(B/B0)), {MICRO_ADAM} dashed"


def _sweep_controls(sizes: list[int]) -> dict[str, W.ValueWidget]:
    """The sweep's controls: the lr, the range of batch sizes, the micro-batch, the norm."""
    return {
        # Wang & Aitchison's figures stay invariant up to lr = 1e-3 at the largest batch: the
        # default sweep (32 - 128) ends at half that, 5e-4 (notebook 05 says what 256 does)
        "lr": log_slider(1.25e-4, "lr at the smallest batch", -4.5, -1.5),
        "sizes": W.SelectionRangeSlider(
            options=sizes,
            index=(1, min(3, len(sizes) - 1)),
            description="batch sizes",
            continuous_update=False,
            style=STYLE,
        ),
        "micro_batch": W.SelectionSlider(
            options=[8, 16, 32],
            value=32,
            description="micro-batch size",
            continuous_update=False,
            style=STYLE,
        ),
        # LayerNorm: with BatchNorm the micro-batch would also be BatchNorm's batch
        "norm": W.Dropdown(options=["layer", "batch"], value="layer", description="norm"),
    }


def sweep_live(profile: str | None = None, **kwargs) -> LiveRun:
    """Train a sweep of batch sizes with both optimizers."""
    p = get_profile(profile)
    epochs = max(p.epochs, 6)
    n_train = p.n_train  # Imagenette's count, or the generated set's
    sizes = [b for b in SIZES if b <= n_train // 4]
    controls = _sweep_controls(sizes)

    seeded = {}  # the run that trains a second seed: Adam at the smallest batch

    def make_config(v: dict) -> dict[str, TrainConfig]:
        lo, hi = v["sizes"]
        batches = [b for b in sizes if lo <= b <= hi]
        if len(batches) < 2:
            raise ValueError("choose a range with at least two batch sizes")
        micro = int(v["micro_batch"])
        if lo % micro:
            raise ValueError(
                f"the micro-batch size {micro} must divide the smallest batch "
                f"({lo}): choose a smaller micro-batch or larger batches"
            )
        base = dict(lr=float(v["lr"]), betas=(0.9, 0.999), eps=1e-8)
        common = dict(epochs=epochs, weight_decay=0.0, norm=v["norm"])
        configs = {}
        seeded["name"] = f"{ADAM} B={batches[0]}"
        for b in batches:
            hp = S.transfer(base, lo, b, "adam-sqrt")
            configs[f"{ADAM} B={b}"] = TrainConfig.from_profile(
                p.name, optimizer="adam", batch=b, **common, **hp
            )
        # kappa = B / micro micro-batches a step; at B = micro this is micro Adam itself
        for b in ([micro] if micro < lo else []) + batches:
            hp = S.transfer(base, lo, b, "invariant-adam")
            name = f"{MICRO_ADAM} B={b}" if b < lo else f"{INVARIANT} B={b}"
            configs[name] = TrainConfig.from_profile(
                p.name, optimizer="invariant-adamw", batch=b, micro_batch=micro, **common, **hp
            )
        return configs

    series = (
        Series("loss_raw", "raw loss", compute=_only(ADAM, raw_loss), opacity=0.25, width=0.5),
        Series(
            "loss",
            "train loss, epoch mean",
            mode="lines+markers",
            compute=_only(ADAM, epoch_mean_loss),
        ),
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
        shared_y=True,
        color_roles=lambda name: name.rsplit(" ", 1)[-1],  # one colour per batch size
        panel_axes=dict(xlabel="epochs", ylabel="loss", height=380),
        title=f"{ADAM} (lr proportional to sqrt B) - {p.name} profile",
        y2label=None,
        max_history=1,
        seeds=lambda name: 2 if name == seeded.get("name") else 1,
        **kwargs,
    )
