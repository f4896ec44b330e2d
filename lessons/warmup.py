"""Ahead-of-time work that a process's first run would otherwise do before its first point."""

from __future__ import annotations

import functools

import torch

from lessons.compute import FUSED_DEVICE_TYPES, forward_loss, fused_runs, resolve
from lessons.config import TrainConfig
from lessons.models import INIT_LOCK
from lessons.profiles import get_profile, pick_device


@functools.cache
def warm_up() -> None:
    """Once per process: build a torch optimizer (the first one imports torch._dynamo, which
    takes seconds) by trying a fused step on the device (compute.fused_runs); on a GPU, also
    warm_device. A widget calls this in a background thread while the student reads, so the
    first slider move answers at once."""
    device = pick_device()
    fused_runs(torch.optim.SGD, device.type if device.type in FUSED_DEVICE_TYPES else "cpu")
    if device.type == "cuda":
        try:
            warm_device(device)
        except Exception:  # a head start only: the run itself reports any real failure
            pass


def warm_device(device: torch.device, profile: str | None = None) -> float:
    """One forward and backward pass of the profile's model (``profile``, else the active one)
    on a random batch of its size and resolution, computed as a run would; its loss. On a GPU
    this starts the CUDA context and loads cuDNN and the kernels a first run needs. The model
    is made under the lock that keeps runs' seeding apart; the batch has a generator of its
    own."""
    c = TrainConfig.from_profile(get_profile(profile).name)
    compute = resolve(c, device)
    gen = torch.Generator().manual_seed(0)
    with INIT_LOCK:  # the global RNG initialises the model
        model = compute.memory(c.model(10).to(device))
    x = torch.randn(c.batch, 3, c.size, c.size, generator=gen).to(device)
    y = torch.randint(0, 10, (c.batch,), generator=gen).to(device)
    loss = forward_loss(model, compute.memory(x), y, compute.dtype)
    loss.backward()
    return loss.item()
