"""03 LAMB internals: a one-step inspector, and LAMB against AdamW with live trust ratios."""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
import torch
import torch.nn.functional as F

from lessons import data as data_mod
from lessons.augment import normalize
from lessons.callbacks import TrustRatios
from lessons.config import TrainConfig
from lessons.models import make_model
from lessons.optim import LAMB_VARIANTS, Lamb, param_groups
from lessons.profiles import get_profile
from widgets.controls import STYLE, log_slider
from widgets.figure import COLORS, Trace
from widgets.lamb_steps import (
    StepSizes,
    cap_binding,
    relative_steps,
    trust_series,
)
from widgets.legend import identical_runs
from widgets.live import LiveRun

# "off" is a string, not None: ipywidgets reads a selection's value None as "nothing
# selected", so choosing an option whose value is None blanked the dropdown (index None)
CAPS = (("off", "off"), ("1", 1.0), ("3", 3.0), ("10", 10.0), ("100", 100.0))


def trust_clip(cap) -> float | None:
    """The trust-cap dropdown's value as Lamb's ``trust_clip``: None (no cap) for "off" (and
    for None, as runs logged before this change stored it)."""
    return None if cap in (None, "off") else float(cap)


class StepInspector:
    """A tiny net on one fixed batch: take ``steps`` LAMB steps, then show the last one as a
    table per tensor. Every control re-runs the steps from the same start."""

    COLUMNS = (
        ("grad", "||g||"),
        ("m_hat", "||m_hat||"),
        ("r", "||r||"),
        ("s", "||s||"),
        ("w", "||w||"),
        ("trust", "trust ratio"),
        ("update", "||update||"),
    )

    def __init__(self, profile: str | None = None, batch: int = 32, seed: int = 0):
        p = get_profile(profile)
        ds = data_mod.load(
            p.dataset, p.size, "cpu", n_train=p.n_train, n_val=p.n_val, progress=False
        )
        self.x = normalize(ds.train_x[:batch])
        self.y = ds.train_y[:batch]
        self.classes = len(ds.classes)
        self.seed = seed
        self.steps = W.IntSlider(
            value=1, min=1, max=50, description="inspect step", continuous_update=False, style=STYLE
        )
        self.lr = log_slider(0.01, "lr", -4, 0, step=0.25)
        self.wd = W.FloatSlider(
            value=0.01,
            min=0,
            max=0.5,
            step=0.01,
            description="weight decay",
            continuous_update=False,
            style=STYLE,
        )
        self.cap = W.Dropdown(options=CAPS, value=10.0, description="trust cap")
        self.centered = W.Checkbox(value=False, description="centered")
        self.eps_inside = W.Checkbox(value=False, description="eps inside sqrt")
        self.table = W.HTML()
        for w in (self.steps, self.lr, self.wd, self.cap, self.centered, self.eps_inside):
            w.observe(lambda _: self.update(), names="value")
        self.widget = W.VBox(
            [
                W.HBox([self.steps, self.lr, self.wd], layout=W.Layout(flex_flow="row wrap")),
                W.HBox([self.cap, self.centered, self.eps_inside]),
                self.table,
            ]
        )
        self.rows: list[dict] = []
        self.update()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def run(self) -> list[dict]:
        """Rows (one per tensor) describing the last of ``steps`` LAMB steps."""
        torch.manual_seed(self.seed)
        model = make_model(self.classes, width=8, depth=0)
        groups = param_groups(model, float(self.wd.value))
        opt = Lamb(
            groups,
            lr=float(self.lr.value),
            trust_clip=trust_clip(self.cap.value),
            centered=self.centered.value,
            eps_inside_sqrt=self.eps_inside.value,
        )
        opt.keep_norms = True
        for _ in range(int(self.steps.value)):
            opt.zero_grad()
            F.cross_entropy(model(self.x), self.y).backward()
            opt.step()
        names = {id(p): n for n, p in model.named_parameters()}
        tensors = [(p, g) for g in opt.param_groups for p in g["params"]]
        rows = []
        for (p, g), norms in zip(tensors, opt.norms(), strict=True):
            row = dict(norms, name=names[id(p)], decay=g["weight_decay"])
            row["relative"] = row["update"] / row["w"] if row["w"] else float("inf")
            rows.append(row)
        return rows

    def update(self) -> None:
        self.rows = self.run()
        head = "".join(
            f"<th>{h}</th>"
            for h in ("tensor", "decay", *(c[1] for c in self.COLUMNS), "update/||w||")
        )
        body = []
        for r in self.rows:
            cells = [html.escape(r["name"]), f"{r['decay']:g}"]
            cells += [f"{r[k]:.3g}" for k, _ in self.COLUMNS]
            cells.append(f"{r['relative']:.3g}" if r["w"] else "w = 0")
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        self.table.value = (
            f"<b>LAMB step {self.steps.value}</b> (lr {self.lr.value:.3g}): the update of a "
            "tensor is lr x trust x s, so its size relative to ||w|| is about lr wherever "
            "the cap does not bite."
            f"<table class='lamb-table'><tr>{head}</tr>{''.join(body)}</table>"
        )


def trust_panel(live: LiveRun) -> tuple[list[Trace], str]:
    """Per-tensor trust ratios over training, for the newest run that recorded them; the cap
    as a black line and the points that sit on it as black dots."""
    run = next(
        (r for r in reversed(live.runs) if any("trust" in m.extras for m in r.records)), None
    )
    if run is None:
        return [], "Trust ratio per tensor (train a LAMB run)"
    pts, trust, names, cap = trust_series(run)
    xs = [m.samples for m in pts]
    bound = {b["name"]: b for b in cap_binding(run)}
    traces = []
    for i, name in enumerate(names):
        # conv kernels and the head's matrix solid; biases and norm scales dotted
        kernel = name.endswith(".0.weight") or name == "head.weight"
        b = bound.get(name)
        label = f"{name}: capped {b['steps']}/{b['of']} steps from {b['first']}" if b else name
        traces.append(
            Trace(
                f"trust:{name}",
                xs,
                np.nan_to_num(trust[:, i], nan=1.0).tolist(),
                name=label,
                color=COLORS[i % len(COLORS)],
                dash="solid" if kernel else "dot",
                width=1.8 if kernel else 1.0,
            )
        )
    if cap is not None and xs:
        traces.append(
            Trace(
                "trust:cap",
                [xs[0], xs[-1]],
                [cap, cap],
                name=f"cap = {cap:g}",
                color="#000000",
                dash="dash",
                width=1.2,
            )
        )
        hit = np.argwhere(trust >= cap * (1 - 1e-4))
        traces.append(
            Trace(
                "trust:at cap",
                [xs[k] for k, _ in hit],
                [cap] * len(hit),
                name="at the cap",
                mode="markers",
                color="#000000",
            )
        )
    where = f"cap {cap:g} bound on {len(bound)} of {len(names)} tensors" if cap else "no cap"
    return traces, f"Trust ratio per tensor ({where})\n{run.label}"


def summary(live: LiveRun) -> str:
    """Under the figure: where the newest LAMB run's cap bound and what it did to those
    tensors' steps, AdamW's step per tensor, and runs that drew identical curves."""
    group = live.last_group
    lines = []
    for name, run in group.items():
        if run.name.startswith("LAMB") and any("trust" in m.extras for m in run.records):
            bound = cap_binding(run)
            cap = trust_series(run)[3]
            if cap is None:
                top = np.nanmax(trust_series(run)[1])
                lines.append(f"<b>{html.escape(name)}</b>: no cap (largest ratio {top:.3g}).")
            elif not bound:
                lines.append(
                    f"<b>{html.escape(name)}</b>: the cap of {cap:g} never bound: "
                    "every tensor moved lr x ||w|| a step."
                )
            else:
                where = "; ".join(
                    f"{html.escape(b['name'])} {b['steps']}/{b['of']} steps from step "
                    f"{b['first']}, moving {b['moved']:.2f} lr"
                    for b in bound
                )
                lines.append(
                    f"<b>{html.escape(name)}</b>: the cap of {cap:g} bound on "
                    f"{where} (uncapped: 1 lr)."
                )
        elif run.name == "AdamW" and (rel := relative_steps(run)):
            lo, hi = min(rel, key=rel.get), max(rel, key=rel.get)
            lines.append(
                f"<b>AdamW</b>: a step moved a tensor {rel[lo]:.2g} lr ({lo}) to "
                f"{rel[hi]:.2g} lr ({hi}) of its norm."
            )
    for same in identical_runs(group.values()):
        names = " = ".join(html.escape(r.name) for r in same)
        lines.append(
            f"<b>{names}</b>: identical on this run (the later drawn dash-dotted over the first)."
        )
    return "<br>".join(lines)


def _lamb_controls(batches: list[int], batch: int) -> dict[str, W.ValueWidget]:
    """LAMB against AdamW's controls: batch, both lrs, weight decay and the LAMB variant."""
    return {
        "batch": W.SelectionSlider(
            options=batches,
            value=batch,
            description="batch",
            continuous_update=False,
        ),
        "lr": log_slider(0.02, "LAMB lr", -3, 0),
        "adamw_lr": log_slider(2e-3, "AdamW lr", -4, -1),
        "wd": W.FloatSlider(
            value=0.01,
            min=0,
            max=0.3,
            step=0.01,
            description="weight decay",
            continuous_update=False,
            style=STYLE,
        ),
        "cap": W.Dropdown(options=CAPS, value=10.0, description="trust cap"),
        "centered": W.Checkbox(value=False, description="centered"),
        "variant": W.Dropdown(
            options=["as set here", *LAMB_VARIANTS, "all variants"],
            value="as set here",
            description="LAMB variant",
            style=STYLE,
        ),
    }


def run_label(name: str, c: TrainConfig, values: dict) -> str:
    """A run's legend label from what it trained with: a LAMB run names its trust cap, AdamW,
    which has none, does not."""
    parts = [f"lr={c.lr:.3g}", f"wd={c.weight_decay:g}", f"batch={c.batch}"]
    if c.optimizer == "lamb":
        clip = c.opt_options.get("trust_clip", Lamb.DEFAULT_TRUST_CLIP)
        parts.append(f"cap={'off' if clip is None else f'{clip:g}'}")
        if c.opt_options.get("centered"):
            parts.append("centered")
    return f"{name}: " + ", ".join(parts)


def lamb_vs_adamw(profile: str | None = None, **kwargs) -> LiveRun:
    """LAMB (a chosen variant, or all of them) against AdamW at a large batch."""
    p = get_profile(profile)
    n_train = p.n_train  # Imagenette's count, or the generated set's
    batches = [b for b in (64, 128, 256, 512, 1024, 2048) if b <= n_train // 4]
    epochs = max(p.epochs, 4)
    controls = _lamb_controls(batches, batches[-1] if p.name != "ci" else 256)

    def make_config(v: dict) -> dict[str, TrainConfig]:
        base = dict(
            batch=int(v["batch"]), weight_decay=float(v["wd"]), epochs=epochs, betas=(0.9, 0.999)
        )
        lamb = dict(optimizer="lamb", lr=float(v["lr"]), eps=1e-6, **base)
        if v["variant"] == "as set here":
            lambs = {"LAMB": dict(trust_clip=trust_clip(v["cap"]), centered=bool(v["centered"]))}
        elif v["variant"] == "all variants":
            lambs = {f"LAMB {k}": dict(o) for k, o in LAMB_VARIANTS.items()}
        else:
            lambs = {f"LAMB {v['variant']}": dict(LAMB_VARIANTS[v["variant"]])}
        configs = {
            name: TrainConfig.from_profile(
                p.name, opt_options=o, callbacks=[TrustRatios(), StepSizes()], **lamb
            )
            for name, o in lambs.items()
        }
        configs["AdamW"] = TrainConfig.from_profile(
            p.name,
            optimizer="adamw",
            lr=float(v["adamw_lr"]),
            callbacks=[TrustRatios(), StepSizes()],
            **base,
        )
        return configs

    def label(v: dict) -> str:
        clip = trust_clip(v["cap"])
        cap = "off" if clip is None else f"{clip:g}"
        return f"batch={v['batch']}, lr={v['lr']:.3g}/{v['adamw_lr']:.3g}, wd={v['wd']:g}, " + (
            f"cap={cap}{', centered' if v['centered'] else ''}"
            if v["variant"] == "as set here"
            else f"variant={v['variant']}"
        )

    return LiveRun(
        controls,
        make_config,
        name="03_lamb",
        label=label,
        run_label=run_label,
        color_roles=lambda name: name,  # LAMB (or a variant) and AdamW keep their colours
        panel=trust_panel,
        summary=summary,
        panel_axes=dict(xlabel="samples seen", ylabel="trust ratio", ylog=True, height=360),
        title=f"LAMB against AdamW ({p.name} profile)",
        **kwargs,
    )
