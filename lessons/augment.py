"""On-device preprocessing of a uint8 batch: normalisation and random crop-and-flip.

Both run on the batch's device, a whole batch at a time, so training never leaves the GPU for
its data.
"""

from __future__ import annotations

import torch

MEAN = (0.485, 0.456, 0.406)  # ImageNet's channel statistics
STD = (0.229, 0.224, 0.225)

_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> normalised float. The mean and std live on the device once: building
    them per call would copy from the host, and so synchronise a GPU, every step."""
    key = (x.device, dtype)
    if key not in _STATS:
        mean = torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1) * 255
        std = torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1) * 255
        _STATS[key] = (mean.to(x.device), std.to(x.device))
    mean, std = _STATS[key]
    return (x.to(dtype) - mean) / std


def augment(
    x: torch.Tensor, generator: torch.Generator, min_scale: float = 0.35, flip: bool = True
) -> torch.Tensor:
    """Random resized crop (area fraction in [min_scale, 1]) and horizontal flip of a whole
    normalised float batch, in one affine resampling on the batch's device."""
    n = x.shape[0]
    dev = x.device
    u = torch.rand(n, 4, generator=generator, device=dev)
    scale = torch.sqrt(min_scale + (1 - min_scale) * u[:, 0])  # side fraction
    tx = (2 * u[:, 1] - 1) * (1 - scale)
    ty = (2 * u[:, 2] - 1) * (1 - scale)
    sign = torch.where(u[:, 3] < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    grid = crop_grid(scale * sign, tx, scale, ty, x.shape[2], x.shape[3]).to(x.dtype)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def crop_grid(
    sx: torch.Tensor, tx: torch.Tensor, sy: torch.Tensor, ty: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """grid_sample's (n, h, w, 2) grid for the per-image maps x -> sx x + tx, y -> sy y + ty
    (no rotation): what ``affine_grid`` gives for theta [[sx, 0, tx], [0, sy, ty]] with
    align_corners=False, built axis by axis because that is cheaper than affine_grid's
    batched matrix product."""
    dev = sx.device
    xs = (torch.arange(w, device=dev, dtype=sx.dtype) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, device=dev, dtype=sx.dtype) * 2 + 1) / h - 1
    gx = sx[:, None] * xs + tx[:, None]  # (n, w)
    gy = sy[:, None] * ys + ty[:, None]  # (n, h)
    n = sx.shape[0]
    return torch.stack((gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)), dim=-1)
