"""Small ResNet-style classifiers with a choice of normalisation."""

from __future__ import annotations

import threading

from torch import nn

NORMS = ("batch", "layer", "none")

# held while a model is seeded and initialised from torch's global RNG: runs started side by
# side (lessons.sweep) must not interleave there
INIT_LOCK = threading.Lock()


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W), per sample
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=norm == "none"),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        )


class Residual(nn.Module):
    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels, norm), ConvBlock(channels, channels, norm)
        )

    def forward(self, x):
        return x + self.body(x)


class ResNet(nn.Module):
    """Stem, then three stages (width, 2 width, 4 width), each a strided conv block followed
    by ``depth`` residual blocks; global average pooling and a linear head. ``stem_stride`` 2
    makes the stem downsample, as ResNet's own stem does: the layers at full resolution, most
    of a small net's step on a CPU, then run at a quarter of the pixels."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 32,
        depth: int = 1,
        norm: str = "batch",
        stem_stride: int = 1,
    ):
        super().__init__()
        if width < 1 or depth < 0:
            raise ValueError(f"width must be >= 1 and depth >= 0, got {width}, {depth}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        layers = [ConvBlock(3, width, norm, stride=stem_stride)]
        cin = width
        for i in range(3):
            cout = width * 2**i
            layers.append(ConvBlock(cin, cout, norm, stride=2))
            layers.extend(Residual(cout, norm) for _ in range(depth))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))  # global average pooling (vmap-friendly)


def make_model(
    num_classes: int = 10,
    width: int = 32,
    depth: int = 1,
    norm: str = "batch",
    stem_stride: int = 1,
) -> ResNet:
    return ResNet(num_classes, width, depth, norm, stem_stride)
