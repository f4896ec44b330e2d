"""Named presets for data set, resolution, model and run length.

"gpu": Imagenette at 64 px, a few epochs (CUDA). "cpu": Imagenette at 32 px, a lesson run well
under a minute on a laptop. "ci": the generated shapes data set, a run in seconds on 2 cores.
LESSONS_PROFILE picks one; otherwise "gpu" where CUDA is present, else "cpu".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Profile:
    name: str
    dataset: str  # "imagenette" | "shapes"
    size: int  # images are cached and trained at size x size pixels
    epochs: int
    batch: int
    lr: float
    width: int
    depth: int
    # the generated data set's size: where Imagenette cannot be had, gpu and cpu fall back to
    # it at Imagenette's size, so every lesson's batch sizes and run lengths stay as designed
    n_train: int = 9_469
    n_val: int = 3_925
    description: str = ""
    # train under bfloat16 autocast on a CPU that computes bf16 natively (AVX512-BF16, AMX),
    # where it is faster than float32 (lessons.compute.use_bf16)
    cpu_bf16: bool = False
    stem_stride: int = 1  # 2: the model's stem downsamples (models.ResNet)


PROFILES = {
    "gpu": Profile(
        "gpu",
        "imagenette",
        size=64,
        epochs=8,
        batch=256,
        lr=0.1,
        width=64,
        depth=1,
        description="Imagenette 64 px, ResNet width 64 (a GPU)",
    ),
    "cpu": Profile(
        "cpu",
        "imagenette",
        size=32,
        epochs=3,
        batch=64,
        lr=0.05,
        width=16,
        depth=1,
        description="Imagenette 32 px, ResNet width 16 (a laptop CPU)",
        cpu_bf16=True,
    ),
    "ci": Profile(
        "ci",
        "shapes",
        size=32,
        epochs=2,
        batch=64,
        lr=0.05,
        width=16,
        depth=0,
        n_train=2000,
        n_val=500,
        # a strided stem: the full-resolution layers were most of this net's step, and the
        # tests and the bench's data-path ratio want a cheap model (figures in BENCHMARKS.md)
        stem_stride=2,
        description="generated shapes 32 px, 2,000 images, strided stem (tests, seconds, 2 cores)",
    ),
}


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU; LESSONS_DEVICE overrides."""
    forced = os.environ.get("LESSONS_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The named profile, else $LESSONS_PROFILE, else by device; fields can be overridden."""
    name = (
        name
        or os.environ.get("LESSONS_PROFILE")
        or ("gpu" if pick_device().type == "cuda" else "cpu")
    )
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} "
            "(or unset LESSONS_PROFILE)"
        )
    return replace(PROFILES[name], **overrides)
