"""The training engine: ``train(config, stop)`` yields Metrics records as it goes.

The whole split lives on the device as uint8; each step indexes a batch, normalises and
augments it on the device, and takes an optimizer step. Losses stay on the device and are
fetched in groups (at most every ``flush_s`` seconds, and on the first step so a plot gets its
first point at once), so a GPU is not stalled by a host sync per step. The x axis of every
record is ``samples`` seen, so runs at different batch sizes line up.

A stop event ends the run within one step. A NaN or infinite loss ends it with a "diverged"
record, and so does a smoothed loss that climbs well above where it started (see
``TrainConfig.diverge_factor``); the generator never raises for that, so a widget thread can
show it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from lessons import data as data_mod
from lessons.augment import augment, normalize
from lessons.models import NORMS, make_model
from lessons.noise import noise_scale
from lessons.optim import InvariantAdamW, Lamb
from lessons.profiles import get_profile, pick_device

KINDS = ("train", "eval", "diverged", "stopped", "done")


@dataclass
class Metrics:
    """One record of a run. ``kind`` is "train" (a step's loss), "eval" (validation at the end
    of an epoch), "diverged", "stopped" or "done" (the last record of a run)."""

    step: int
    samples: int
    epoch: float
    loss: float | None
    lr: float
    batch: int
    val_loss: float | None = None
    val_acc: float | None = None
    kind: str = "train"
    extras: dict = field(default_factory=dict)

    @property
    def epoch_index(self) -> int:
        """The epoch this record belongs to, from 0: a step that ends exactly at epoch 1.0
        is the last of epoch 0."""
        return int(self.epoch - 1e-9)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Metrics:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    """Everything a run needs. ``TrainConfig.from_profile()`` fills data set, size, model and
    run length from a profile; the optimizer settings are the lesson's to choose."""

    lr: float = 0.1
    batch: int = 64
    epochs: float = 2
    optimizer: str = "sgd"  # a key of OPTIMIZERS
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "constant"  # "constant" | "onecycle" (linear warm-up, cosine decay)
    warmup: float = 0.0  # fraction of the run spent warming up (onecycle)
    seed: int = 0
    dataset: str = "shapes"  # "imagenette" | "shapes"
    size: int = 32
    n_train: int = 1000
    n_val: int = 300
    width: int = 16
    depth: int = 1
    norm: str = "batch"
    stem_stride: int = 1  # 2: the stem downsamples (the ci profile)
    augment: bool = True
    label_smoothing: float = 0.0
    max_steps: int | None = None
    opt_options: dict = field(default_factory=dict)  # extra optimizer options (Lamb variants)
    lr_at: Callable[[int], float] | None = None  # learning rate of each epoch (a schedule)
    batch_at: Callable[[int], int] | None = None  # batch size of each epoch (a schedule)
    on_epoch: Callable | None = None  # (model, dataset, epoch) -> dict for the eval record
    micro_batch: int | None = None  # kappa: micro-batches for an optimizer with accumulate()
    # all micro-batch gradients in one torch.func pass (no BatchNorm); None: on CUDA only,
    # where it measured 2.2x faster than the loop (on 2 CPU cores it was 0.6x)
    micro_vmap: bool | None = None
    record_trust: bool = False  # keep the per-tensor trust ratios of a LAMB-like optimizer
    # bfloat16 autocast for the forward pass (weights, gradients and optimizer state stay
    # float32). None: see use_bf16 (on CUDA; on a CPU with native bf16 where the profile
    # allows it); LESSONS_BF16=1|0 overrides None
    bf16: bool | None = None
    # float16 autocast with dynamic loss scaling (torch.amp.GradScaler; weights, gradients and
    # optimizer state stay float32). None: see use_fp16 (on a GPU with float16 tensor cores
    # and no bf16 hardware: Colab's T4, a V100); LESSONS_FP16=1|0 overrides None
    fp16: bool | None = None
    # torch's fused kernels for SGD, Adam and AdamW (one kernel a step per group where the
    # default loops or issues a few per tensor; under loss scaling they unscale and skip an
    # overflowed step on the device, without the host sync of GradScaler's other path).
    # None: wherever they run (use_fused); LESSONS_FUSED=1|0 overrides None
    fused: bool | None = None
    evaluate: bool = True
    # With BatchNorm a far too large learning rate seldom gives NaN: it throws the net to
    # worse than chance and keeps it there. So a run also counts as diverged when, after
    # 20 steps, its smoothed loss (EMA 0.9) is above this many times its first loss.
    diverge_factor: float | None = 1.5
    device: str | None = None  # None: CUDA, then MPS, then CPU
    flush_s: float = 0.1  # fetch losses from the device at most this often
    profile: str | None = None

    @classmethod
    def from_profile(cls, profile: str | None = None, **overrides) -> TrainConfig:
        p = get_profile(profile)
        base = dict(
            profile=p.name,
            dataset=p.dataset,
            size=p.size,
            epochs=p.epochs,
            batch=p.batch,
            lr=p.lr,
            width=p.width,
            depth=p.depth,
            stem_stride=p.stem_stride,
            n_train=p.n_train,
            n_val=p.n_val,
        )
        base.update(overrides)
        return cls(**base)

    def model(self, num_classes: int) -> torch.nn.Module:
        """A new model of this config's architecture (width, depth, norm, stem), on the CPU
        in the default memory format, initialised from torch's global RNG as it stands."""
        return make_model(num_classes, self.width, self.depth, self.norm, self.stem_stride)

    def check(self, n_train: int | None = None) -> None:
        """Raise ValueError, saying what to change, for a setting that cannot run."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if int(self.batch) != self.batch or self.batch < 1:
            raise ValueError(f"batch size must be a whole number >= 1, got {self.batch}")
        if n_train is not None and self.batch > n_train:
            raise ValueError(
                f"batch size {self.batch} is larger than the {n_train:,} training "
                "images: choose a smaller batch"
            )
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in ("constant", "onecycle"):
            raise ValueError(f"schedule must be 'constant' or 'onecycle', got {self.schedule!r}")
        if self.micro_batch is not None and (
            self.micro_batch < 1 or self.batch % self.micro_batch or self.batch_at is not None
        ):
            raise ValueError(
                f"the batch ({self.batch}) must be a whole multiple of the "
                f"micro-batch ({self.micro_batch}), without a batch schedule"
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.bf16 and self.fp16:
            raise ValueError("choose one of bf16 and fp16 autocast, not both")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only, not on biases and norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# the device types whose runs try torch's fused optimizer steps (use_fused)
FUSED_DEVICE_TYPES = ("cuda", "cpu")


@functools.cache
def fused_runs(cls: type, device_type: str) -> bool:
    """Whether torch optimizer ``cls`` (SGD, Adam, AdamW) takes a fused step on this kind of
    device with this torch: one tried step on a one-element tensor (the fused kernels came
    to CUDA and the CPU in different torch releases; elsewhere none may exist)."""
    try:
        w = torch.zeros(1, device=device_type, requires_grad=True)
        w.grad = torch.ones_like(w)
        cls([w], lr=0.1, fused=True).step()
    # AssertionError: torch without CUDA, asked for a CUDA tensor
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError):
        return False
    return True


def use_fused(c: TrainConfig, cls: type, device: torch.device) -> bool:
    """Whether a run's torch optimizer takes fused steps: ``c.fused`` where set, else
    LESSONS_FUSED=1|0, else on a GPU or CPU where the kernel runs (fused_runs; MPS keeps
    torch's default, untested here). On 2 CPU cores an AdamW step of the cpu profile's model
    took 0.34 ms fused against 1.55 ms by default, SGD's 0.15 against 0.37, and of the gpu
    profile's model 1.0 against 5.8 ms; whole runs gained 0 - 7% there (BENCHMARKS.md). On
    a GPU it is one kernel per group where the default issues several.

    Never SGD under float16 loss scaling, whatever is asked: torch's fused SGD kernel leaves
    an overflowed first step's momentum buffer uninitialised (``torch.empty``) where it
    should skip the step, and the run turns to NaN some steps later (found by this
    package's tests; also LibreYOLO PR 771 on CUDA). Fused Adam and AdamW skip such a step
    exactly as the unfused ones do."""
    if cls is torch.optim.SGD and use_fp16(c, device):
        return False
    if c.fused is not None:
        return c.fused
    env = _env_flag("LESSONS_FUSED")
    if env is not None:
        return env
    return device.type in FUSED_DEVICE_TYPES and fused_runs(cls, device.type)


def _torch_optimizer(cls: type, c: TrainConfig, groups, **options):
    """A torch optimizer over ``groups``, fused where use_fused says so."""
    device = next(p.device for g in groups for p in g["params"])
    if use_fused(c, cls, device):
        options["fused"] = True
    return cls(groups, lr=c.lr, **options)


def _sgd(c: TrainConfig, groups):
    return _torch_optimizer(torch.optim.SGD, c, groups, momentum=c.momentum, nesterov=c.nesterov)


def _adam(c: TrainConfig, groups):
    return _torch_optimizer(torch.optim.Adam, c, groups, betas=tuple(c.betas), eps=c.eps)


def _adamw(c: TrainConfig, groups):
    return _torch_optimizer(torch.optim.AdamW, c, groups, betas=tuple(c.betas), eps=c.eps)


def _lamb(c: TrainConfig, groups):
    options = dict(lr=c.lr, betas=tuple(c.betas), eps=c.eps) | c.opt_options  # a variant's win
    return Lamb(groups, **options)


def _invariant_adamw(c: TrainConfig, groups):
    return InvariantAdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps)


# name -> factory(config, param_groups); lessons register their optimizers here
OPTIMIZERS: dict[str, Callable] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "lamb": _lamb,
    "invariant-adamw": _invariant_adamw,
}


# torch.cpu's ISA checks, by the names different torch releases give them
_NATIVE_BF16_CHECKS = (
    "_is_avx512_bf16_supported",
    "_is_amx_tile_supported",
    "_is_cpu_support_amx_tile",
)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX: recent Xeons, AMD Zen 4),
    which oneDNN's bf16 convolutions use; elsewhere it emulates bf16 with float32 arithmetic
    and gains nothing (oneDNN's own check, ``torch.ops.mkldnn._is_mkldnn_bf16_supported``,
    says yes to any AVX-512 CPU)."""
    for name in _NATIVE_BF16_CHECKS:
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """A CUDA GPU's compute capability, (major, minor); None for another device, or without
    a driver."""
    if device.type != "cuda":
        return None
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except (RuntimeError, AssertionError, ValueError):  # no driver, no such device
        return None


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether a CUDA GPU has bf16 arithmetic in hardware: compute capability 8.0 or later
    (A100, H100, L4, RTX 30xx and newer). Colab's free T4 (7.5), a V100 (7.0) or a P100 only
    emulate it, which is no faster than float32 (torch.cuda.is_bf16_supported() says yes to
    them: it counts emulation)."""
    cap = cuda_capability(device)
    return cap is not None and cap >= (8, 0)


def cuda_fp16_only(device: torch.device) -> bool:
    """Whether a CUDA GPU has float16 tensor cores but no bf16 hardware: compute capability
    7.x (V100, Colab's free T4, RTX 20xx). There float16 autocast runs the convolutions on
    the tensor cores, which float32 and emulated bf16 leave idle (a T4: 65 TFLOPS in
    float16 against 8 in float32, by NVIDIA's figures)."""
    cap = cuda_capability(device)
    return cap is not None and (7, 0) <= cap < (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 faster than float32: a CUDA GPU with bf16 hardware
    (cuda_has_native_bf16), or a CPU with bf16 instructions (cpu_has_native_bf16)."""
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def _env_flag(name: str) -> bool | None:
    env = os.environ.get(name, "")
    return env not in ("0", "false", "no") if env else None


def use_bf16(c: TrainConfig, device: torch.device) -> bool:
    """Whether a run trains under bfloat16 autocast: ``c.bf16`` where set, else not where
    ``c.fp16`` is, else LESSONS_BF16=1|0, else on a GPU with bf16 hardware (native_bf16),
    and on a CPU with it where the run's profile allows it (``Profile.cpu_bf16``: the cpu
    profile does; the ci profile keeps float32, so that the tests see the same numbers on
    every CPU). Never on other devices (MPS)."""
    if c.bf16 is not None:
        return c.bf16
    if c.fp16:
        return False
    env = _env_flag("LESSONS_BF16")
    if env is not None:
        return env
    if not native_bf16(device):
        return False
    return device.type == "cuda" or (bool(c.profile) and get_profile(c.profile).cpu_bf16)


def use_fp16(c: TrainConfig, device: torch.device) -> bool:
    """Whether a run trains under float16 autocast with dynamic loss scaling: ``c.fp16``
    where set, else not where the run uses bf16 (use_bf16), else LESSONS_FP16=1|0, else on
    a GPU with float16 tensor cores and no bf16 hardware (cuda_fp16_only). Float16's range
    ends at 65,504 and its small gradients round to zero, so the loss is scaled up before
    the backward pass and the gradients back down (torch.amp.GradScaler); a step whose
    gradients overflowed is skipped and the scale halved."""
    if c.fp16 is not None:
        return c.fp16
    if use_bf16(c, device):
        return False
    env = _env_flag("LESSONS_FP16")
    if env is not None:
        return env
    return cuda_fp16_only(device)


def autocast_dtype(c: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype a run's forward pass is autocast to: bfloat16, float16 or None (float32)."""
    if use_bf16(c, device):
        return torch.bfloat16
    return torch.float16 if use_fp16(c, device) else None


def precision(c: TrainConfig, device: torch.device) -> str:
    """How a run computes, in words (see use_bf16 and use_fp16)."""
    return {
        torch.bfloat16: "bf16 autocast",
        torch.float16: "fp16 autocast, loss scaling",
        None: "float32",
    }[autocast_dtype(c, device)]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to ``dtype`` on the device; off where dtype is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of a float16 run (torch's defaults: 2**16 to start, halved on an
    overflow, doubled after 2,000 steps without one)."""
    return torch.amp.GradScaler(device.type)


def autocast_and_scaler(
    c: TrainConfig, device: torch.device
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """A run's autocast dtype (autocast_dtype) and, where it is float16, its loss scaler."""
    dtype = autocast_dtype(c, device)
    return dtype, grad_scaler(device) if dtype == torch.float16 else None


def forward_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype | None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The batch's mean cross-entropy, the forward pass autocast to ``dtype``, the loss
    itself in float32."""
    with autocast(x.device, dtype):
        out = model(x)
    return F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)


def backward_step(loss: torch.Tensor, opt, scaler: torch.amp.GradScaler | None = None) -> None:
    """``loss.backward()`` and ``opt.step()``; with a scaler, the backward pass of the scaled
    loss, then the scaler's step (gradients unscaled, the step skipped if any overflowed;
    one host sync) and update."""
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def backward_accumulate(
    part: torch.Tensor, opt, scaler: torch.amp.GradScaler | None = None
) -> None:
    """``part.backward()`` and ``opt.accumulate()`` for one micro-batch of an optimizer that
    keeps every micro-batch's gradient (InvariantAdamW). With a scaler each micro-batch is
    one round of it: the scaled backward, the gradients unscaled before they are summed and
    squared, the scale updated (no host sync); the optimizer skips a step whose sums are not
    finite (``InvariantAdamW.skip_nonfinite``)."""
    if scaler is None:
        part.backward()
        opt.accumulate()
        return
    scaler.scale(part).backward()
    scaler.unscale_(opt)
    opt.accumulate()
    scaler.update()


def lr_multiplier(c: TrainConfig, step: int, total: int) -> float:
    if c.schedule == "constant":
        return 1.0
    warm = max(1, int(c.warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def channels_last_on(device: torch.device) -> bool:
    """Whether models and batches go channels_last on this device: faster convolutions on
    CUDA and on a CPU (oneDNN); left alone elsewhere (MPS)."""
    return device.type in ("cuda", "cpu")


def evaluate(
    model: torch.nn.Module,
    ds: data_mod.Dataset,
    batch: int = 1000,
    dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Validation loss and accuracy over the whole validation split (one host sync), the
    forward pass autocast to ``dtype`` (None: float32)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=ds.device)
    correct = torch.zeros((), device=ds.device, dtype=torch.long)
    with torch.no_grad(), autocast(ds.device, dtype):
        for i in range(0, ds.val_x.shape[0], batch):
            x = normalize(ds.val_x[i : i + batch])
            if channels_last_on(ds.device):
                x = x.contiguous(memory_format=torch.channels_last)
            y = ds.val_y[i : i + batch]
            out = model(x).float()
            total_loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = ds.val_x.shape[0]
    loss, right = torch.stack([total_loss, correct.to(total_loss.dtype)]).tolist()
    return loss / n, right / n


def load_data(c: TrainConfig, device: torch.device, progress: bool = False) -> data_mod.Dataset:
    return data_mod.load(
        c.dataset, c.size, device, n_train=c.n_train, n_val=c.n_val, progress=progress
    )


def train(
    config: TrainConfig,
    stop: threading.Event | None = None,
    dataset: data_mod.Dataset | None = None,
) -> Iterator[Metrics]:
    """Train one model, yielding Metrics. See the module docstring for the guarantees."""
    c = config
    c.check()
    device = torch.device(c.device) if c.device else pick_device()
    ds = dataset if dataset is not None else load_data(c, device)
    device = ds.device
    c.check(ds.n_train)
    cuda = device.type == "cuda"
    dtype, scaler = autocast_and_scaler(c, device)
    if device.type == "cpu":
        keep_freed_memory()  # else every CPU step page-faults its activations in afresh
    channels_last = channels_last_on(device)
    t_start = time.perf_counter()

    with _INIT_LOCK:  # the global RNG: runs started side by side must not interleave here
        torch.manual_seed(c.seed)
        model = c.model(len(ds.classes)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = _param_groups(model, c.weight_decay)
    opt = OPTIMIZERS[c.optimizer](c, groups)
    record_trust = c.record_trust and hasattr(opt, "trust_ratios")
    accumulates = hasattr(opt, "accumulate")  # keeps every micro-batch's gradient
    if scaler is not None and isinstance(opt, InvariantAdamW):
        opt.skip_nonfinite = True  # a micro-batch's overflow skips the step
    gen = torch.Generator(device=device).manual_seed(c.seed)

    n = ds.n_train
    plan = _plan(c, n)  # (epoch, batch, steps per epoch, steps to take) for every epoch
    total = sum(p[3] for p in plan)
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    info = {
        "total_steps": total,
        "steps_per_epoch": plan[0][2],
        "device": str(device),
        "dataset": ds.name,
        "notice": ds.notice,
        "precision": precision(c, device),
    }
    capped = [e for e, b, _, _ in plan if b < _scheduled_batch(c, e)]
    if capped:
        info["batch_notice"] = (
            f"the batch schedule asked for more than the {n:,} training "
            f"images in epoch(s) {capped}: capped at {n:,}"
        )
    momentum = c.momentum if c.optimizer == "sgd" else 0.0
    micro = c.micro_batch if c.micro_batch and accumulates else None
    vmapped = None
    use_vmap = c.micro_vmap if c.micro_vmap is not None else cuda
    # with fp16 the micro-batches loop: each is unscaled on its own (backward_accumulate)
    if micro and use_vmap and scaler is None and c.norm != "batch" and micro < c.batch:
        # BatchNorm mixes the samples of a micro-batch with running statistics: loop instead
        from torch.func import functional_call, grad_and_value, vmap

        buffers = dict(model.named_buffers())

        def micro_loss(params, xb, yb):
            out = functional_call(model, (params, buffers), (xb,))
            return F.cross_entropy(out.float(), yb, label_smoothing=c.label_smoothing)

        vmapped = vmap(grad_and_value(micro_loss), in_dims=(None, 0, 0))
        by_id = {id(p): name for name, p in model.named_parameters()}
        names_in_order = [by_id[id(p)] for g in groups for p in g["params"]]

    step = 0
    samples = 0
    epoch_f = 0.0
    batch, lr = plan[0][1], c.lr
    if record_trust:  # the parameters' names, in the order trust_ratios() reports them
        names = {id(p): n for n, p in model.named_parameters()}
        info["trust_names"] = [names[id(p)] for g in groups for p in g["params"]]
    pending: list[tuple] = []  # (step, samples, epoch, lr, batch, loss on device, trust)
    last_flush = 0.0
    smooth = [0.0, 0.0, None]  # EMA of the loss, its weight, the first loss

    def flush() -> Iterator[Metrics]:
        """Fetch the pending losses in one transfer; a non-finite one ends the run."""
        nonlocal last_flush
        if not pending:
            return
        values = torch.stack([p[5] for p in pending]).float().tolist()
        trusts = (
            torch.stack([p[6] for p in pending]).tolist() if record_trust else [None] * len(pending)
        )
        rows = [(*p[:5], v, q) for p, v, q in zip(pending, values, trusts)]
        pending.clear()
        last_flush = time.perf_counter()
        for s, seen, ep, r_lr, b, v, q in rows:
            if not math.isfinite(v):
                yield Metrics(
                    s,
                    seen,
                    ep,
                    v,
                    r_lr,
                    b,
                    kind="diverged",
                    extras={**info, "reason": f"loss became {v} at step {s}"},
                )
                raise _Diverged
            smooth[0] = 0.9 * smooth[0] + 0.1 * v
            smooth[1] = 0.9 * smooth[1] + 0.1
            if smooth[2] is None:
                smooth[2] = v
            ema = smooth[0] / smooth[1]
            extras = {"noise": noise_scale(r_lr, n, b, momentum)}
            if s == 1:
                extras.update(total_steps=total, batch_notice=info.get("batch_notice"))
            if q is not None:
                extras["trust"] = q
                if s == 1:
                    extras["trust_names"] = info["trust_names"]
            yield Metrics(s, seen, ep, v, r_lr, b, extras=extras)
            if c.diverge_factor and s >= 20 and ema > c.diverge_factor * smooth[2]:
                yield Metrics(
                    s,
                    seen,
                    ep,
                    v,
                    r_lr,
                    b,
                    kind="diverged",
                    extras={
                        **info,
                        "reason": f"smoothed loss rose to {ema:.3g}, above "
                        f"{c.diverge_factor:g}x its first {smooth[2]:.3g}",
                    },
                )
                raise _Diverged

    def marker(kind: str, **extras) -> Metrics:
        """A record that ends the run ("stopped", "done"), carrying the run's info."""
        return Metrics(
            step, samples, epoch_f, None, 0.0, batch, kind=kind, extras={**info, **extras}
        )

    model.train()
    try:
        for epoch, batch, steps_per_epoch, steps in plan:
            if step >= total:
                break
            base_lr = c.lr_at(epoch) if c.lr_at is not None else c.lr
            perm = torch.randperm(n, generator=gen, device=device)
            for i in range(steps):
                if step >= total:
                    break
                if stop is not None and stop.is_set():
                    yield from flush()
                    yield marker("stopped")
                    return
                idx = perm[i * batch : (i + 1) * batch]
                x = normalize(ds.train_x[idx])
                if c.augment:
                    x = augment(x, gen)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = ds.train_y[idx]
                lr = base_lr * lr_multiplier(c, step, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                if vmapped is not None:  # every micro-batch gradient in one pass
                    shape = (batch // micro, micro)
                    with autocast(device, dtype):
                        grads, parts = vmapped(
                            {k: p.detach() for k, p in model.named_parameters()},
                            x.reshape(*shape, *x.shape[1:]),
                            y.reshape(shape),
                        )
                    opt.accumulate_many([grads[names_in_order[i]] for i in range(len(grads))])
                    loss = parts.mean()
                    opt.step()
                elif accumulates:  # a backward per micro-batch (else the whole batch as one)
                    parts, chunk = [], micro or batch
                    for j in range(0, batch, chunk):
                        xj, yj = x[j : j + chunk], y[j : j + chunk]
                        part = forward_loss(model, xj, yj, dtype, c.label_smoothing)
                        backward_accumulate(part, opt, scaler)
                        parts.append(part.detach())
                    loss = torch.stack(parts).mean()
                    opt.step()
                else:
                    loss = forward_loss(model, x, y, dtype, c.label_smoothing)
                    backward_step(loss, opt, scaler)
                step += 1
                samples += batch
                epoch_f = epoch + (i + 1) / steps_per_epoch
                trust = opt.trust_ratios() if record_trust else None
                pending.append((step, samples, epoch_f, lr, batch, loss.detach(), trust))
                if step == 1 or time.perf_counter() - last_flush >= c.flush_s:
                    yield from flush()
            yield from flush()
            if c.evaluate:
                vl, va = evaluate(model, ds, dtype=dtype)
                found = c.on_epoch(model, ds, epoch) if c.on_epoch is not None else {}
                yield Metrics(
                    step, samples, epoch_f, None, lr, batch, vl, va, kind="eval", extras=found
                )
                if not math.isfinite(vl):
                    yield Metrics(
                        step,
                        samples,
                        epoch_f,
                        vl,
                        lr,
                        batch,
                        kind="diverged",
                        extras={**info, "reason": "validation loss is not finite"},
                    )
                    return
    except _Diverged:
        return
    done = {"seconds": time.perf_counter() - t_start}
    if scaler is not None:  # where the loss scale ended: how far it had to back off
        done["loss_scale"] = scaler.get_scale()
    yield marker("done", **done)


def _scheduled_batch(c: TrainConfig, epoch: int) -> int:
    return int(c.batch_at(epoch)) if c.batch_at is not None else int(c.batch)


def _plan(c: TrainConfig, n: int) -> list[tuple[int, int, int, int]]:
    """(epoch, batch, steps per epoch, steps taken) for each epoch of the run; a scheduled
    batch larger than the data set is capped at its size. A fractional last epoch takes that
    fraction of its steps."""
    plan, epoch, left = [], 0, float(c.epochs)
    while left > 1e-12:
        batch = min(_scheduled_batch(c, epoch), n)
        if batch < 1:
            raise ValueError(f"the batch schedule gave {batch} for epoch {epoch}: need >= 1")
        per_epoch = n // batch
        plan.append((epoch, batch, per_epoch, math.ceil(min(1.0, left) * per_epoch)))
        epoch, left = epoch + 1, left - 1
    return plan


class _Diverged(Exception):
    pass


_INIT_LOCK = threading.Lock()


def free_openmp_threads() -> bool:
    """Free the main thread's idle OpenMP worker threads (libgomp's ``omp_pause_resource_all``,
    OpenMP 5.0, which frees the calling thread's). Call it before training in another thread
    on a CPU, as a widget does; called from any other thread it does nothing.

    Why: PyTorch parallelises CPU ops with OpenMP, and each thread that runs them gets a team
    of its own. Once the main thread has a team (any torch work in a notebook cell), a
    training thread's team makes libgomp manage more threads than there are cores, and it
    then stops spin-waiting between parallel regions - every small op pays a sleep and a
    wake-up. Measured on 2 cores (ci-profile model, batch 64): 37 ms a step in a thread
    against 20-22 ms in the main thread or after this call. True where it freed them; False
    off the main thread, where the OpenMP runtime is not libgomp (then nothing is done), or
    where the call failed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    # a list, not any() over a generator: every libgomp is paused, not just the first
    return any([lib.omp_pause_resource_all(1) == 0 for lib in _libgomps()])  # omp_pause_soft


@functools.cache
def _libgomps() -> tuple:
    """Every libgomp loaded in this process that has omp_pause_resource_all (Linux, from
    /proc/self/maps, looked up once), torch's own first: another library may bring its own."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libgomp" in ln and "/" in ln}
    except OSError:
        return ()
    torch_dir = os.path.dirname(torch.__file__)
    libs = []
    for path in sorted(paths, key=lambda q: (not q.startswith(torch_dir), q)):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.restype = ctypes.c_int  # absent before OpenMP 5.0
        except (OSError, AttributeError):
            continue
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        libs.append(lib)
    return tuple(libs)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# blocks up to this size come from the heap, not a fresh mmap; the heap's free top is given
# back to the system only above the trim threshold
MALLOC_MMAP_THRESHOLD = 256 << 20
MALLOC_TRIM_THRESHOLD = 512 << 20
# set before a process starts (make lab, test and bench do): every thread allocates from the
# main arena, which keeps what it frees; see keep_freed_memory
MALLOC_TUNABLES = "glibc.malloc.arena_max=1"


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse the memory a training step frees instead of handing it back to
    the system and faulting it in again at the next step (``mallopt``; once per process).

    Why: a CPU step allocates and frees activations and gradients of a few MB each. With its
    default, self-adjusting thresholds, glibc may serve blocks that large with mmap, or trim
    the heap's top once it is free; whether it does depends on what the process allocated
    before (a large array freed raises the thresholds), and in a worker thread's arena it
    often does. Then every step maps fresh pages and zero-fills them: 2,300 - 5,800 page
    faults a step on the ci-profile model, up to 15 ms of system time, steps up to 1.5x slower
    (2 cores; PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason,
    which a running notebook kernel cannot). After this, freed blocks stay in the heap and the
    process keeps its peak use (at most MALLOC_TRIM_THRESHOLD of it unused) until it exits.

    A worker thread, as a widget's, allocates from an arena of its own, and such an arena
    still maps blocks over 64 MB afresh each time and gives back every heap it empties,
    whatever the thresholds: on the cpu profile at batch 1024, 85,000 faults a step. Only one
    arena for all threads avoids that, and glibc reads that setting only when a process
    starts: GLIBC_TUNABLES=glibc.malloc.arena_max=1 (MALLOC_TUNABLES), which make lab, test
    and bench set. With both, that widget run took 13-14 s instead of 19-20 s.

    True where it was set; False where malloc is not glibc's (macOS, musl), or
    LESSONS_KEEP_MEMORY=0."""
    if os.environ.get("LESSONS_KEEP_MEMORY", "") in ("0", "false", "no"):
        return False
    if platform.libc_ver()[0] != "glibc":  # another C library's mallopt means other things
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # both: either alone turns off glibc's own adjustment of the other, and faults get worse
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


@functools.cache
def warm_up() -> None:
    """Do once, ahead of time, what a process's first run would do before its first point:
    the first torch optimizer built imports torch._dynamo (1.8 - 2.2 s on 2 cores; the first
    run's first loss point came after 2.0 s, the second run's after 0.03 s); on a GPU,
    warm_device. LiveRun calls this in a background thread when it is built, so the first
    slider move answers at once. The first optimizer is built in fused_runs, which also
    tries SGD's fused step on the device."""
    device = pick_device()
    fused_runs(torch.optim.SGD, device.type if device.type in FUSED_DEVICE_TYPES else "cpu")
    if device.type == "cuda":
        try:
            warm_device(device)
        except Exception:  # a head start only: the run itself reports any real failure
            pass


def warm_device(device: torch.device, profile: str | None = None) -> float:
    """One training step of the profile's model (``profile``, else the active one) on a
    random batch of its size and resolution, in the precision a run would use; its loss. On
    a GPU this starts the CUDA context and loads cuDNN and the kernels a first run needs: a
    cold process's first run gave its first point after 5.1 s on an H100, a warm one after
    0.02 s. The model is made under the lock that keeps runs' seeding apart; the batch draws
    from a generator of its own."""
    c = TrainConfig.from_profile(get_profile(profile).name)
    gen = torch.Generator().manual_seed(0)
    with _INIT_LOCK:  # the global RNG initialises the model
        model = c.model(10).to(device)
    if channels_last_on(device):
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(c.batch, 3, c.size, c.size, generator=gen).to(device)
    y = torch.randint(0, 10, (c.batch,), generator=gen).to(device)
    loss = forward_loss(model, x, y, autocast_dtype(c, device))
    loss.backward()
    return loss.item()


def concurrent_by_default(device: torch.device) -> bool:
    """Whether several runs should train side by side: on CUDA, where one small model leaves
    most of the GPU idle, unless LESSONS_CONCURRENT=0; elsewhere only with LESSONS_CONCURRENT=1
    (on a CPU the runs would only share the same cores)."""
    env = os.environ.get("LESSONS_CONCURRENT", "")
    if env:
        return env not in ("0", "false", "no")
    return device.type == "cuda"


def train_many(
    configs: dict[str, TrainConfig],
    stop: threading.Event | None = None,
    datasets: dict[str, data_mod.Dataset] | None = None,
    concurrent: bool | None = None,
) -> Iterator[tuple[str, Metrics]]:
    """Train several configs, yielding (name, record) as each arrives.

    Concurrently (``concurrent``; None: see concurrent_by_default): a thread per run, on CUDA
    each on a stream of its own so that their kernels overlap; the records of different runs
    interleave; on a CPU each run's thread computes with its share of the caller's OpenMP
    threads. Otherwise one run after the other. Each run's records are the ones ``train``
    gives on its own (with as many threads). ``stop`` ends every run within a step; closing
    the generator too."""
    stop = stop or threading.Event()
    datasets = datasets or {}
    if not configs:
        return
    if concurrent is None:
        first = next(iter(configs.values()))
        device = first.device or (datasets and next(iter(datasets.values())).device)
        concurrent = concurrent_by_default(torch.device(device) if device else pick_device())
    if not concurrent or len(configs) == 1:
        for name, c in configs.items():
            for rec in train(c, stop, dataset=datasets.get(name)):
                yield name, rec
            if stop.is_set():
                return
        return
    out: queue.Queue = queue.Queue()
    done = object()
    free_openmp_threads()  # see there: CPU steps in threads are slower otherwise

    # on a CPU each run's thread gets its share of the cores' OpenMP threads (torch's thread
    # count is the calling thread's own): teams of two for each of four runs on two cores made
    # a bf16 sweep 5 - 14x slower than one run after the other
    share = max(1, torch.get_num_threads() // len(configs))

    def worker(name: str, c: TrainConfig) -> None:
        try:
            ds = datasets.get(name)
            cuda = (ds.device.type if ds else torch.device(c.device or "cpu").type) == "cuda"
            if not cuda:
                torch.set_num_threads(share)
            ctx = torch.cuda.stream(torch.cuda.Stream()) if cuda else contextlib.nullcontext()
            with ctx:
                for rec in train(c, stop, dataset=ds):
                    out.put((name, rec))
        except BaseException as e:  # handed to the consumer, raised there
            out.put((name, e))
        finally:
            out.put((name, done))

    threads = [
        threading.Thread(target=worker, args=(name, c), daemon=True, name=f"train-{name}")
        for name, c in configs.items()
    ]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            name, item = out.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield name, item
    finally:
        if running:  # closed early, or a run failed: the others stop too
            stop.set()
        for t in threads:
            t.join()


def run(config: TrainConfig, **kwargs) -> list[Metrics]:
    """Train to the end and return every record (for scripts and tests)."""
    return list(train(config, **kwargs))


def epoch_train_loss(records) -> list[float]:
    """The mean training loss of each epoch of a run, per sample: each step's loss (already a
    mean over its batch) weighted by its batch, so an epoch whose batch grows counts every
    sample once. A step belongs to the epoch it ends in (Metrics.epoch_index). This is the
    curve Smith et al. plot against epochs; it averages a whole epoch of samples, where one
    validation pass after a large-lr epoch swings with the BatchNorm running statistics."""
    sums: dict[int, list[float]] = {}
    for m in records:
        if m.kind == "train":
            s = sums.setdefault(m.epoch_index, [0.0, 0])
            s[0] += m.loss * m.batch
            s[1] += m.batch
    return [total / n for _, (total, n) in sorted(sums.items())]
