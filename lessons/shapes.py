"""The generated stand-in data set: ten shape classes in Imagenette's folder layout.

It lets the course run, and the tests exercise the real archive path, without a download;
every image is deterministic from a seed.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES_CLASSES = {
    "circle": "circle",
    "square": "square",
    "triangle": "triangle",
    "cross": "cross",
    "ring": "ring",
    "star": "star",
    "hbars": "horizontal bars",
    "vbars": "vertical bars",
    "diamond": "diamond",
    "discs": "overlapping discs",
}
SHAPES_ROOT = "imagenette-shapes"  # the archive's top-level folder


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx, cy, r, angle, color, rng) -> None:
    def rot(points):
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "ring":
        w = max(2, int(r * 0.35))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=w)
    elif kind == "square":
        draw.polygon(rot([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=color)
    elif kind == "diamond":
        draw.polygon(rot([(0, -1.3 * r), (0.8 * r, 0), (0, 1.3 * r), (-0.8 * r, 0)]), fill=color)
    elif kind == "triangle":
        draw.polygon(rot([(0, -r), (0.87 * r, 0.5 * r), (-0.87 * r, 0.5 * r)]), fill=color)
    elif kind == "cross":
        t = r * 0.3
        for pts in ([(-r, -t), (r, -t), (r, t), (-r, t)], [(-t, -r), (t, -r), (t, r), (-t, r)]):
            draw.polygon(rot(pts), fill=color)
    elif kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = i * np.pi / 5
            pts.append((rad * np.sin(a), -rad * np.cos(a)))
        draw.polygon(rot(pts), fill=color)
    elif kind in ("hbars", "vbars"):
        t = r * 0.22
        for k in (-1, 0, 1):
            off = k * r * 0.7
            if kind == "hbars":
                pts = [(-r, off - t), (r, off - t), (r, off + t), (-r, off + t)]
            else:
                pts = [(off - t, -r), (off + t, -r), (off + t, r), (off - t, r)]
            draw.polygon([(cx + x, cy + y) for x, y in pts], fill=color)  # not rotated
    elif kind == "discs":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        dx, dy = 0.55 * r * np.cos(angle), 0.55 * r * np.sin(angle)
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=bg)
    else:  # pragma: no cover - the class list is fixed
        raise ValueError(kind)


def make_shapes_image(kind: str, rng: np.random.Generator, short: int = 160) -> Image.Image:
    """One generated image: a noisy textured background, distractor blobs and one shape.

    The class is the shape; colour, size, position, rotation and clutter are random, so a
    small CNN needs a few hundred steps to learn it."""
    long = int(short * rng.uniform(1.0, 1.4))
    w, h = (long, short) if rng.random() < 0.7 else (short, long)
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 25, (h // 8 + 1, w // 8 + 1, 3))
    bg = np.clip(base + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(bg).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 4))):  # clutter: small ellipses and lines
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        rr = rng.uniform(3, short * 0.08)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - rr, y - rr * 0.6, x + rr, y + rr * 0.6], fill=col)
        else:
            draw.line(
                [x, y, x + rng.uniform(-40, 40), y + rng.uniform(-40, 40)],
                fill=col,
                width=int(rng.integers(1, 4)),
            )
    r = short * rng.uniform(0.2, 0.34)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    # a colour that stands out from the background: the complement, jittered
    color = tuple(int(v) for v in np.clip(255 - base + rng.integers(-50, 51, 3), 0, 255))
    _draw_shape(draw, kind, cx, cy, r, rng.uniform(0, 2 * np.pi), color, rng)
    return im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.2))))


def make_shapes_archive(
    path: Path,
    n_train: int = 1000,
    n_val: int = 300,
    seed: int = 0,
    short: int = 160,
    root_name: str = SHAPES_ROOT,
    class_dirs: list[str] | None = None,
) -> Path:
    """Write a generated data set as a .tgz with Imagenette's layout:
    ``<root_name>/{train,val}/<class>/*.JPEG``. Deterministic from ``seed``. ``class_dirs``
    renames the ten class folders (tests use Imagenette's wnids)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds = list(SHAPES_CLASSES)
    dirs = dict(zip(kinds, class_dirs or kinds, strict=True))
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        root = Path(tmp) / root_name
        for split, n, offset in (("train", n_train, 0), ("val", n_val, 1)):
            rng = np.random.default_rng([seed, offset])
            for kind in kinds:
                (root / split / dirs[kind]).mkdir(parents=True)
            for i in range(n):
                kind = kinds[i % len(kinds)]
                im = make_shapes_image(kind, rng, short)
                im.save(root / split / dirs[kind] / f"{split}_{i:06d}.JPEG", quality=90)
        tmp_tgz = Path(tmp) / "out.tgz"
        with tarfile.open(tmp_tgz, "w:gz", compresslevel=1) as tar:
            tar.add(root, arcname=root_name)
        os.replace(tmp_tgz, path)
    return path


def shapes_archive(n_train: int, n_val: int, seed: int, root: Path) -> Path:
    """The generated archive in ``root``, written on first use."""
    path = Path(root) / f"shapes-{seed}-{n_train}-{n_val}.tgz"
    if not path.exists():
        make_shapes_archive(path, n_train, n_val, seed)
    return path
