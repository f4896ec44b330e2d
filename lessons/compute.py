"""How a run computes on its device, decided once per run: the autocast dtype (bf16, fp16 with
loss scaling, or float32), torch's fused optimizer steps, and channels_last memory.

``resolve(config, device)`` gives a plain ``Compute`` that the training loop, the bench and a
widget's status line all read, so what is shown is what ran. The rules, each overridable by the
config and then by an environment setting:

- bf16 autocast on a GPU with bf16 hardware (compute capability 8.0+), and on a CPU with bf16
  instructions where the run's profile allows it; elsewhere bf16 is only emulated.
- fp16 autocast with dynamic loss scaling on a GPU with float16 tensor cores but no bf16
  (compute capability 7.x: Colab's T4, a V100).
- fused SGD / Adam / AdamW steps wherever torch has the kernel, but never SGD under loss
  scaling: torch's fused SGD leaves a skipped first step's momentum buffer uninitialised.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lessons.config import TrainConfig
from lessons.optim import FUSABLE, OPTIMIZERS
from lessons.profiles import get_profile

# the device types whose runs try torch's fused optimizer steps (use_fused)
FUSED_DEVICE_TYPES = ("cuda", "cpu")

PRECISIONS = {
    torch.bfloat16: "bf16 autocast",
    torch.float16: "fp16 autocast, loss scaling",
    None: "float32",
}


@dataclass(frozen=True)
class Compute:
    """A run's compute settings, resolved once (see ``resolve``)."""

    device: torch.device
    dtype: torch.dtype | None  # the forward pass's autocast dtype; None: float32
    fused: bool  # the run's torch optimizer takes fused steps
    channels_last: bool  # models and batches in channels_last memory

    @property
    def loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    @property
    def precision(self) -> str:
        """How the run computes, in words."""
        return PRECISIONS[self.dtype]

    def autocast(self):
        return autocast(self.device, self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A new loss scaler where the run is float16, else None."""
        return grad_scaler(self.device) if self.loss_scaling else None

    def memory(self, t):
        """A model or a batch in this run's memory format."""
        if not self.channels_last:
            return t
        if isinstance(t, torch.nn.Module):
            return t.to(memory_format=torch.channels_last)
        return t.contiguous(memory_format=torch.channels_last)


def resolve(c: TrainConfig, device: torch.device) -> Compute:
    """How run ``c`` computes on ``device``."""
    return Compute(
        device=device,
        dtype=autocast_dtype(c, device),
        fused=use_fused(c, OPTIMIZERS[c.optimizer], device),
        channels_last=channels_last_on(device),
    )


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A float16 run's loss scaler (torch's defaults: 2**16 to start, halved on an overflow,
    doubled after 2,000 steps without one)."""
    return torch.amp.GradScaler(device.type)


def _env_flag(name: str) -> bool | None:
    env = os.environ.get(name, "")
    return env not in ("0", "false", "no") if env else None


# torch.cpu's ISA checks, by the names different torch releases give them
_NATIVE_BF16_CHECKS = (
    "_is_avx512_bf16_supported",
    "_is_amx_tile_supported",
    "_is_cpu_support_amx_tile",
)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), which oneDNN's bf16
    convolutions use; elsewhere it emulates bf16 and gains nothing. (oneDNN's own check says
    yes to any AVX-512 CPU.)"""
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
    """Whether a CUDA GPU has bf16 arithmetic in hardware: compute capability 8.0 or later.
    (torch.cuda.is_bf16_supported() also says yes to GPUs that only emulate it.)"""
    cap = cuda_capability(device)
    return cap is not None and cap >= (8, 0)


def cuda_fp16_only(device: torch.device) -> bool:
    """Whether a CUDA GPU has float16 tensor cores but no bf16 hardware: compute capability
    7.x (V100, T4, RTX 20xx), where float16 autocast runs the convolutions on the tensor
    cores that float32 leaves idle."""
    cap = cuda_capability(device)
    return cap is not None and (7, 0) <= cap < (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 faster than float32."""
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def use_bf16(c: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: ``c.bf16`` where set, else not where ``c.fp16`` is, else LESSONS_BF16,
    else on native bf16 hardware: any such GPU, and a CPU where the run's profile allows it
    (the ci profile keeps float32 so that tests see the same numbers on every CPU)."""
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
    """fp16 autocast with dynamic loss scaling: ``c.fp16`` where set, else not where bf16 is
    used, else LESSONS_FP16, else on a GPU with float16 tensor cores and no bf16. Float16's
    small gradients round to zero, so the loss is scaled up before the backward pass and the
    gradients back down; a step whose gradients overflowed is skipped and the scale halved."""
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


@functools.cache
def fused_runs(cls: type, device_type: str) -> bool:
    """Whether torch optimizer ``cls`` takes a fused step on this kind of device with this
    torch: one tried step on a one-element tensor (the kernels came to CUDA and the CPU in
    different torch releases)."""
    try:
        w = torch.zeros(1, device=device_type, requires_grad=True)
        w.grad = torch.ones_like(w)
        cls([w], lr=0.1, fused=True).step()
    # AssertionError: torch without CUDA, asked for a CUDA tensor
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError):
        return False
    return True


def use_fused(c: TrainConfig, cls: type, device: torch.device) -> bool:
    """Fused optimizer steps (one kernel a step per group): ``c.fused`` where set, else
    LESSONS_FUSED, else on a GPU or CPU where the kernel runs. Only for torch's SGD, Adam and
    AdamW, and never SGD under float16 loss scaling (its fused kernel leaves a skipped first
    step's momentum buffer uninitialised, and the run turns to NaN)."""
    if not issubclass(cls, FUSABLE):
        return False
    if issubclass(cls, torch.optim.SGD) and use_fp16(c, device):
        return False
    if c.fused is not None:
        return c.fused
    env = _env_flag("LESSONS_FUSED")
    if env is not None:
        return env
    return device.type in FUSED_DEVICE_TYPES and fused_runs(cls, device.type)


def channels_last_on(device: torch.device) -> bool:
    """Whether models and batches go channels_last on this device: faster convolutions on
    CUDA and on a CPU (oneDNN); left alone elsewhere (MPS)."""
    return device.type in ("cuda", "cpu")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to ``dtype`` on the device; off where dtype is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


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
    """``loss.backward()`` and ``opt.step()``; with a scaler, the scaled backward pass, then
    the scaler's step (gradients unscaled, the step skipped if any overflowed) and update."""
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
    unscaled before it is summed and squared; the optimizer skips a step whose sums are not
    finite (``InvariantAdamW.skip_nonfinite``)."""
    if scaler is None:
        part.backward()
        opt.accumulate()
        return
    scaler.scale(part).backward()
    scaler.unscale_(opt)
    opt.accumulate()
    scaler.update()
