"""The training loop: ``train(config, stop)`` yields Metrics records as it goes.

``setup`` resolves everything a run needs once (data, device and precision, model, optimizer,
plan); then every step indexes a batch of the split that lives on the device as uint8,
normalises and augments it there, and takes an optimizer step. Losses stay on the device and
are fetched in groups (at most every ``flush_s`` seconds, and at the first step so a plot gets
its first point at once). The x axis of every record is ``samples`` seen, so runs at different
batch sizes line up. What a lesson measures besides the loss comes from its callbacks.

A stop event ends the run within one step. A NaN or infinite loss ends it with a "diverged"
record, and so does a smoothed loss that climbs well above where it started
(``TrainConfig.diverge_factor``); the generator never raises for that, so a widget thread can
show it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lessons import data as data_mod
from lessons.augment import augment, normalize
from lessons.compute import (
    Compute,
    autocast,
    backward_accumulate,
    backward_step,
    forward_loss,
    resolve,
)
from lessons.config import Metrics, TrainConfig
from lessons.models import INIT_LOCK
from lessons.optim import InvariantAdamW, build_optimizer, param_groups
from lessons.plan import Plan, make_plan
from lessons.profiles import pick_device
from lessons.tuning import keep_freed_memory


@dataclass
class Run:
    """A run as ``setup`` made it: what the loop and the callbacks read."""

    config: TrainConfig
    dataset: data_mod.Dataset
    compute: Compute
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    plan: Plan
    param_names: list[str]  # in the order of the optimizer's parameters
    scaler: torch.amp.GradScaler | None = None
    micro_grads: Callable | None = None  # every micro-batch's gradient in one torch.func pass
    info: dict = field(default_factory=dict)  # carried by the first and the closing records


def load_data(c: TrainConfig, device: torch.device, progress: bool = False) -> data_mod.Dataset:
    return data_mod.load(
        c.dataset, c.size, device, n_train=c.n_train, n_val=c.n_val, progress=progress
    )


def build_model_and_optimizer(
    c: TrainConfig, compute: Compute, num_classes: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Run ``c``'s model, seeded and on the device in the run's memory format, and its
    optimizer over the parameter groups (weight decay on weights only)."""
    with INIT_LOCK:  # the global RNG: runs started side by side must not interleave here
        torch.manual_seed(c.seed)
        model = c.model(num_classes).to(compute.device)
    model = compute.memory(model)
    hyper = dict(lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, betas=c.betas, eps=c.eps)
    hyper |= c.opt_options  # a LAMB variant's own betas and eps win
    opt = build_optimizer(
        c.optimizer, param_groups(model, c.weight_decay), fused=compute.fused, **hyper
    )
    return model, opt


def setup(c: TrainConfig, dataset: data_mod.Dataset | None = None) -> Run:
    """Everything run ``c`` needs, resolved once; ValueError for a setting that cannot run."""
    c.check()
    ds = dataset if dataset is not None else load_data(c, torch.device(c.device or pick_device()))
    c.check(ds.n_train)
    compute = resolve(c, ds.device)
    if ds.device.type == "cpu":
        keep_freed_memory()  # else every CPU step page-faults its activations in afresh
    model, opt = build_model_and_optimizer(c, compute, len(ds.classes))
    names = {id(p): n for n, p in model.named_parameters()}
    run = Run(
        config=c,
        dataset=ds,
        compute=compute,
        model=model,
        opt=opt,
        plan=make_plan(c, ds.n_train),
        param_names=[names[id(p)] for g in opt.param_groups for p in g["params"]],
        scaler=compute.scaler(),
    )
    if run.scaler is not None and isinstance(opt, InvariantAdamW):
        opt.skip_nonfinite = True  # a micro-batch's overflow skips the step
    run.micro_grads = _micro_grads(run)
    run.info = {
        "total_steps": run.plan.total,
        "steps_per_epoch": run.plan.epochs[0].steps_per_epoch,
        "device": str(ds.device),
        "dataset": ds.name,
        "notice": ds.notice,
        "precision": compute.precision,
    }
    if run.plan.notice:
        run.info["batch_notice"] = run.plan.notice
    return run


def _micro_grads(run: Run) -> Callable | None:
    """For an optimizer that keeps every micro-batch's gradient, the torch.func function that
    gives them all in one pass, where it applies: by default on CUDA only, not under float16
    loss scaling (each micro-batch is unscaled on its own), and not with BatchNorm (it mixes a
    micro-batch's samples with running statistics)."""
    c, model = run.config, run.model
    use = c.micro_vmap if c.micro_vmap is not None else run.compute.device.type == "cuda"
    micro = c.micro_batch
    if not (hasattr(run.opt, "accumulate_many") and micro and use and micro < c.batch):
        return None
    if run.scaler is not None or c.norm == "batch":
        return None
    from torch.func import functional_call, grad_and_value, vmap

    buffers = dict(model.named_buffers())

    def micro_loss(params, xb, yb):
        out = functional_call(model, (params, buffers), (xb,))
        return F.cross_entropy(out.float(), yb, label_smoothing=c.label_smoothing)

    return vmap(grad_and_value(micro_loss), in_dims=(None, 0, 0))


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on batch (x, y); its mean loss, on the device. An optimizer with
    ``accumulate()`` gets a backward pass per micro-batch (or the whole batch as one)."""
    c, opt, dtype = run.config, run.opt, run.compute.dtype
    opt.zero_grad(set_to_none=True)
    if run.micro_grads is not None:
        micro = c.micro_batch
        shape = (x.shape[0] // micro, micro)
        with autocast(x.device, dtype):
            grads, parts = run.micro_grads(
                {k: p.detach() for k, p in run.model.named_parameters()},
                x.reshape(*shape, *x.shape[1:]),
                y.reshape(shape),
            )
        opt.accumulate_many([grads[name] for name in run.param_names])
        opt.step()
        return parts.mean()
    if hasattr(opt, "accumulate"):
        parts, chunk = [], c.micro_batch or x.shape[0]
        for j in range(0, x.shape[0], chunk):
            part = forward_loss(
                run.model, x[j : j + chunk], y[j : j + chunk], dtype, c.label_smoothing
            )
            backward_accumulate(part, opt, run.scaler)
            parts.append(part.detach())
        opt.step()
        return torch.stack(parts).mean()
    loss = forward_loss(run.model, x, y, dtype, c.label_smoothing)
    backward_step(loss, opt, run.scaler)
    return loss


def evaluate(
    model: torch.nn.Module, ds: data_mod.Dataset, compute: Compute | None = None, batch: int = 1000
) -> tuple[float, float]:
    """Validation loss and accuracy over the whole validation split (one host sync), computed
    as the run computes (``compute``; None: float32, default memory format)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=ds.device)
    correct = torch.zeros((), device=ds.device, dtype=torch.long)
    dtype = compute.dtype if compute is not None else None
    with torch.no_grad(), autocast(ds.device, dtype):
        for i in range(0, ds.val_x.shape[0], batch):
            x = normalize(ds.val_x[i : i + batch])
            if compute is not None:
                x = compute.memory(x)
            y = ds.val_y[i : i + batch]
            out = model(x).float()
            total_loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = ds.val_x.shape[0]
    loss, right = torch.stack([total_loss, correct.to(total_loss.dtype)]).tolist()
    return loss / n, right / n


class _Diverged(Exception):
    pass


class _Recorder:
    """Turns steps into train records: each step's loss (and its callbacks' tensors) stays on
    the device until ``flush`` fetches the pending ones in one transfer; a non-finite loss, or
    a smoothed loss far above the first, yields a "diverged" record and raises _Diverged."""

    def __init__(self, run: Run):
        self.run = run
        self.pending: list[Metrics] = []  # loss and extras still on the device
        self.last_flush = 0.0
        self.ema = self.weight = 0.0  # the smoothed loss (EMA 0.9) and its weight
        self.first: float | None = None

    def add(self, m: Metrics) -> None:
        self.pending.append(m)

    def due(self, step: int) -> bool:
        return step == 1 or time.perf_counter() - self.last_flush >= self.run.config.flush_s

    def flush(self) -> Iterator[Metrics]:
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        losses = torch.stack([m.loss for m in rows]).float().tolist()
        tensor_keys = {k for m in rows for k, v in m.extras.items() if torch.is_tensor(v)}
        for key in tensor_keys:  # one transfer per measurement
            for m, v in zip(rows, torch.stack([m.extras[key] for m in rows]).tolist()):
                m.extras[key] = v
        self.last_flush = time.perf_counter()
        for m, loss in zip(rows, losses):
            m.loss = loss
            yield from self._checked(m)

    def _checked(self, m: Metrics) -> Iterator[Metrics]:
        if not math.isfinite(m.loss):
            yield self._diverged(m, f"loss became {m.loss} at step {m.step}")
            raise _Diverged
        self.ema, self.weight = 0.9 * self.ema + 0.1 * m.loss, 0.9 * self.weight + 0.1
        self.first = m.loss if self.first is None else self.first
        yield m
        factor, smoothed = self.run.config.diverge_factor, self.ema / self.weight
        if factor and m.step >= 20 and smoothed > factor * self.first:
            reason = f"smoothed loss rose to {smoothed:.3g}, above {factor:g}x its first"
            yield self._diverged(m, f"{reason} {self.first:.3g}")
            raise _Diverged

    def _diverged(self, m: Metrics, reason: str) -> Metrics:
        extras = {**self.run.info, "reason": reason}
        return Metrics(
            m.step, m.samples, m.epoch, m.loss, m.lr, m.batch, kind="diverged", extras=extras
        )


def train(
    config: TrainConfig,
    stop: threading.Event | None = None,
    dataset: data_mod.Dataset | None = None,
) -> Iterator[Metrics]:
    """Train one model, yielding Metrics. See the module docstring for the guarantees."""
    run = setup(config, dataset)
    try:
        yield from _loop(run, stop)
    except _Diverged:
        return


def _loop(run: Run, stop: threading.Event | None) -> Iterator[Metrics]:
    c, ds, plan = run.config, run.dataset, run.plan
    t_start = time.perf_counter()
    gen = torch.Generator(device=ds.device).manual_seed(c.seed)
    rec = _Recorder(run)
    step = samples = 0
    epoch_f, lr, batch = 0.0, c.lr, plan.epochs[0].batch
    run.model.train()
    for ep in plan.epochs:
        if step >= plan.total:
            break
        batch = ep.batch
        perm = torch.randperm(ds.n_train, generator=gen, device=ds.device)
        for i in range(min(ep.steps, plan.total - step)):
            if stop is not None and stop.is_set():
                yield from rec.flush()
                yield _closing(run, "stopped", step, samples, epoch_f, batch)
                return
            x, y = prepare_batch(run, perm[i * batch : (i + 1) * batch], gen)
            lr = plan.lr(c, ep.epoch, step)
            for g in run.opt.param_groups:
                g["lr"] = lr
            loss = train_step(run, x, y)
            step, samples = step + 1, samples + batch
            epoch_f = ep.epoch + (i + 1) / ep.steps_per_epoch
            extras = _step_extras(run, step, lr, batch)
            rec.add(Metrics(step, samples, epoch_f, loss.detach(), lr, batch, extras=extras))
            if rec.due(step):
                yield from rec.flush()
        yield from rec.flush()
        if c.evaluate:
            yield from _evaluated(run, ep.epoch, step, samples, epoch_f, lr, batch)
    done = {"seconds": time.perf_counter() - t_start}
    if run.scaler is not None:  # where the loss scale ended: how far it had to back off
        done["loss_scale"] = run.scaler.get_scale()
    yield _closing(run, "done", step, samples, epoch_f, batch, **done)


def prepare_batch(run: Run, idx: torch.Tensor, gen: torch.Generator):
    """The training images at ``idx``, normalised, augmented and in the run's memory format,
    and their labels."""
    ds = run.dataset
    x = normalize(ds.train_x[idx])
    if run.config.augment:
        x = augment(x, gen)
    return run.compute.memory(x), ds.train_y[idx]


def _step_extras(run: Run, step: int, lr: float, batch: int) -> dict:
    extras = {}
    if step == 1:  # what the run resolved, for whoever shows it (a widget's status line)
        extras.update(run.info, batch_notice=run.info.get("batch_notice"))
        for cb in run.config.callbacks:
            extras.update(cb.start(run))
    for cb in run.config.callbacks:
        extras.update(cb.step(run, lr, batch))
    return extras


def _evaluated(run: Run, epoch: int, step, samples, epoch_f, lr, batch) -> Iterator[Metrics]:
    """The end-of-epoch validation record, with the callbacks' epoch measurements."""
    vl, va = evaluate(run.model, run.dataset, run.compute)
    found = {}
    for cb in run.config.callbacks:
        found.update(cb.epoch(run, epoch))
    yield Metrics(step, samples, epoch_f, None, lr, batch, vl, va, kind="eval", extras=found)
    if not math.isfinite(vl):
        yield Metrics(
            step,
            samples,
            epoch_f,
            vl,
            lr,
            batch,
            kind="diverged",
            extras={**run.info, "reason": "validation loss is not finite"},
        )
        raise _Diverged


def _closing(run: Run, kind: str, step, samples, epoch_f, batch, **extras) -> Metrics:
    """A record that ends the run ("stopped", "done"), carrying the run's info."""
    return Metrics(
        step, samples, epoch_f, None, 0.0, batch, kind=kind, extras={**run.info, **extras}
    )


def run(config: TrainConfig, **kwargs) -> list[Metrics]:
    """Train to the end and return every record (for scripts and tests)."""
    return list(train(config, **kwargs))
