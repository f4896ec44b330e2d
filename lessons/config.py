"""A run's settings (TrainConfig) and records (Metrics): what the engine reads and yields."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from lessons.models import NORMS, make_model
from lessons.optim import OPTIMIZERS
from lessons.profiles import get_profile

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
    optimizer: str = "sgd"  # a key of lessons.optim.OPTIMIZERS
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
    # measurements a lesson adds to the records (lessons.callbacks)
    callbacks: Sequence = ()
    micro_batch: int | None = None  # samples per micro-batch, for an optimizer with accumulate()
    # all micro-batch gradients in one torch.func pass (no BatchNorm); None: on CUDA only
    micro_vmap: bool | None = None
    # how the run computes (lessons.compute): None lets the device, the profile and the
    # LESSONS_BF16 / LESSONS_FP16 / LESSONS_FUSED settings decide
    bf16: bool | None = None  # bfloat16 autocast of the forward pass
    fp16: bool | None = None  # float16 autocast with dynamic loss scaling
    fused: bool | None = None  # torch's fused optimizer steps (SGD, Adam, AdamW)
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

    def fingerprint(self) -> str | None:
        """What this config trains, as text: equal for two configs that train the same run
        (schedules compared by their value at each epoch); None when a callback holds code
        whose effect cannot be compared."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("lr_at", "batch_at") and value is not None:
                value = [value(e) for e in range(math.ceil(self.epochs) + 1)]
            elif f.name == "callbacks":
                value = [_callback_fingerprint(cb) for cb in value]
                if None in value:
                    return None
            parts.append(f"{f.name}={value!r}")
        return ";".join(parts)

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


def _callback_fingerprint(callback) -> str | None:
    """A callback's class and plain settings; None if it holds anything else (code)."""
    plain = (int, float, str, bool, tuple, type(None))
    settings = vars(callback)
    if not all(isinstance(v, plain) for v in settings.values()):
        return None
    return f"{type(callback).__name__}{sorted(settings.items())!r}"


def epoch_train_loss(records: Sequence[Metrics]) -> list[float]:
    """The mean training loss of each epoch of a run, per sample: each step's loss (a mean over
    its batch) weighted by its batch, so an epoch whose batch grows counts every sample once.
    A step belongs to the epoch it ends in (Metrics.epoch_index). This is the curve Smith et
    al. plot against epochs."""
    sums: dict[int, list[float]] = {}
    for m in records:
        if m.kind == "train":
            s = sums.setdefault(m.epoch_index, [0.0, 0])
            s[0] += m.loss * m.batch
            s[1] += m.batch
    return [total / n for _, (total, n) in sorted(sums.items())]
