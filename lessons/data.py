"""Imagenette and a generated stand-in, from archive to one uint8 tensor on the device.

The path is the same for both data sets: archive (.tgz) -> extracted folders
``<root>/{train,val}/<class>/*.JPEG`` -> decoded once with Pillow (draft mode), resized and
centre-cropped to ``size`` -> cached as uint8 ``.npy`` arrays plus a manifest (written
atomically, verified on load) -> one tensor on the device. Augmentation (random crop and
flip) runs on the device, a whole batch at a time.

``python -m lessons.data --prepare`` fetches and caches the data set of the active profile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

# --- Imagenette facts, in one place (fastai/imagenette README; torchvision's Imagenette) ---
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
IMAGENETTE_ARCHIVE = "imagenette2-160.tgz"
IMAGENETTE_BYTES = 99_003_388
IMAGENETTE_MD5 = "e793b78cc4c9e9a4ccc0c1155377a412"
IMAGENETTE_ROOT = "imagenette2-160"
IMAGENETTE_COUNTS = {"train": 9_469, "val": 3_925}


@dataclass(frozen=True)
class ArchiveSpec:
    """Where an archive comes from and how to check it."""

    url: str
    filename: str
    bytes: int | None
    md5: str | None
    root: str  # the top-level folder inside the archive


IMAGENETTE = ArchiveSpec(
    IMAGENETTE_URL, IMAGENETTE_ARCHIVE, IMAGENETTE_BYTES, IMAGENETTE_MD5, IMAGENETTE_ROOT
)
IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

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

CACHE_VERSION = 1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A data set could not be prepared; the message says what to do."""


class DatasetUnavailable(DataError):
    """The archive could not be downloaded (offline, refused, blocked)."""


def data_dir() -> Path:
    """Where archives and caches live: $LESSONS_DATA, else ~/.cache/batch-size-lessons."""
    root = os.environ.get("LESSONS_DATA") or Path.home() / ".cache" / "batch-size-lessons"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def offline_message(url: str, dest: Path, reason: str, size: int | None, md5: str | None) -> str:
    facts = f" It is {size:,} bytes" if size else ""
    facts += f" with md5 {md5}." if md5 else ("." if facts else "")
    return (
        f"Could not download {url} ({reason}). Download it on a machine with internet access "
        f"and place the file at {dest} (or set LESSONS_DATA to the folder that holds "
        f"{dest.name}).{facts}"
    )


# --------------------------------------------------------------------------- download
def download(
    url: str,
    dest: Path,
    md5: str | None = None,
    size: int | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file.

    A partial file is resumed with an HTTP Range request; a server that ignores the range
    (answers 200) restarts the transfer cleanly. The finished file is checked against
    ``size`` and ``md5``; a mismatch removes it and raises DataError. Network failures raise
    DatasetUnavailable with instructions for placing the file by hand.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": "batch-size-lessons"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and size is not None and have == size:
            response = None  # the .part is already complete
        else:
            raise DatasetUnavailable(offline_message(url, dest, f"HTTP {e.code}", size, md5)) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DatasetUnavailable(offline_message(url, dest, str(reason), size, md5)) from e
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0
            total = size
            if total is None and response.headers.get("Content-Length"):
                total = have + int(response.headers["Content-Length"])
            try:
                with (
                    open(part, "ab" if resumed else "wb") as f,
                    tqdm(
                        total=total,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        desc=dest.name,
                        disable=not progress,
                    ) as bar,
                ):
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
            except (urllib.error.URLError, OSError) as e:
                got = part.stat().st_size if part.exists() else 0
                raise DatasetUnavailable(
                    f"The download of {url} was interrupted after {got:,} bytes ({e}). "
                    f"Run it again to resume from {part}."
                ) from e
    got = part.stat().st_size
    if size is not None and got != size:
        if got < size:
            raise DatasetUnavailable(
                f"The download of {url} stopped after {got:,} of {size:,} bytes. "
                f"Run it again to resume from {part}."
            )
        part.unlink()
        raise DataError(f"{url} gave {got:,} bytes, expected {size:,}; the file was removed.")
    if md5 is not None:
        digest = md5sum(part)
        if digest != md5:
            part.unlink()
            raise DataError(
                f"{url} downloaded with md5 {digest}, expected {md5}: the file is corrupt or "
                "not the expected archive, so it was removed. Run again to download it afresh."
            )
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------- extract
def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tgz into ``dest`` without trusting member paths.

    Absolute paths, ``..`` components, links and device files are rejected with DataError;
    extraction goes to a temporary folder first and is moved into place when complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive} is not a readable tar archive ({e}); delete it, retry.") from e
    with tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
                raise DataError(f"{archive} holds an unsafe path {m.name!r}; not extracting.")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{archive} holds a link or device {m.name!r}; not extracting.")
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
        try:
            tar.extractall(tmp, members=members, filter="data")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- decode
def load_image(path: Path, size: int) -> np.ndarray:
    """Decode one image (shrunk on decode with JPEG draft mode), short side to ``size``,
    centre-cropped to size x size, as HWC uint8."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= size
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


def list_split(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of one split; classes are the sorted folder names."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing: the archive does not have the expected layout.")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((split_dir / name).iterdir()):
            if f.suffix.lower() in (".jpeg", ".jpg", ".png"):
                files.append(f)
                labels.append(label)
    return files, labels, classes


def decode_split(root: Path, split: str, size: int, progress: bool = True):
    files, labels, classes = list_split(root, split)
    if not files:
        raise DataError(f"{Path(root) / split} holds no images.")
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)

    def work(i):
        images[i] = load_image(files[i], size)

    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        list(
            tqdm(
                pool.map(work, range(len(files))),
                total=len(files),
                desc=f"decode {split}",
                disable=not progress,
            )
        )
    return images, np.asarray(labels, dtype=np.int64), classes


# --------------------------------------------------------------------------- cache
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write, binary: bool = True) -> None:
    """Write a file through a temporary file in the same folder, fsync it and rename it into
    place: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_cache(cache: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays then the manifest (the commit point), each atomically."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "manifest.json").unlink(missing_ok=True)
    files = {}
    for key, array in arrays.items():
        path = cache / f"{key}.npy"
        atomic_write(path, lambda f, a=array: np.save(f, a))
        files[key] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    manifest = {"version": CACHE_VERSION, "files": files, **meta}
    text = json.dumps(manifest, indent=1)
    atomic_write(cache / "manifest.json", lambda f: f.write(text), binary=False)


def read_cache(cache: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """Arrays and manifest if the cache is complete and every checksum matches, else None."""
    try:
        manifest = json.loads((cache / "manifest.json").read_text())
        if manifest.get("version") != CACHE_VERSION:
            return None
        arrays = {}
        for key, info in manifest["files"].items():
            path = cache / f"{key}.npy"
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                return None
            array = np.load(path, allow_pickle=False)
            if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
                return None
            arrays[key] = array
        return arrays, manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- shapes
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
    root_name: str = "imagenette-shapes",
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


# --------------------------------------------------------------------------- data sets
@dataclass
class Dataset:
    """A data set held as uint8 NCHW tensors on one device."""

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    size: int
    cache: Path
    notice: str | None = None  # set when a fallback was used: shown in widgets and plots
    extras: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def describe(self) -> str:
        text = (
            f"{self.name}: {self.n_train:,} train / {self.val_x.shape[0]:,} val images, "
            f"{self.size}x{self.size} px, {len(self.classes)} classes, on {self.device}; "
            f"cache {self.cache}"
        )
        return text + (f"\nNOTICE: {self.notice}" if self.notice else "")


def ensure_extracted(archive: Path, root_name: str) -> Path:
    """The folder ``root_name`` extracted from ``archive`` beside it (extracting once)."""
    extracted = archive.parent / (archive.name.removesuffix(".tgz") + "-extracted")
    folder = extracted / root_name
    if not folder.is_dir():  # safe_extract moves a complete tree into place, or nothing
        safe_extract(archive, extracted)
        if not folder.is_dir():
            raise DataError(f"{archive} does not hold a top-level folder {root_name}/.")
    return folder


def build_cache(
    archive: Path, root_name: str, size: int, cache: Path, meta: dict, progress: bool = True
) -> tuple[dict[str, np.ndarray], dict]:
    """archive -> extracted folders -> decoded arrays -> verified cache."""
    found = read_cache(cache)
    if found is not None:
        return found
    folder = ensure_extracted(archive, root_name)
    arrays, classes = {}, None
    for split in ("train", "val"):
        x, y, cls = decode_split(folder, split, size, progress=progress)
        if classes is not None and cls != classes:
            raise DataError(f"{folder}: train and val have different class folders.")
        classes = cls
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    write_cache(cache, arrays, {**meta, "size": size, "class_dirs": classes})
    found = read_cache(cache)
    if found is None:
        raise DataError(f"The cache at {cache} did not verify right after writing; disk full?")
    return found


def shapes_archive(n_train: int, n_val: int, seed: int = 0, root: Path | None = None) -> Path:
    root = Path(root) if root else data_dir()
    path = root / f"shapes-{seed}-{n_train}-{n_val}.tgz"
    if not path.exists():
        make_shapes_archive(path, n_train, n_val, seed)
    return path


def prepare_arrays(
    name: str,
    size: int,
    *,
    root: Path | None = None,
    n_train: int = 1000,
    n_val: int = 300,
    seed: int = 0,
    fallback: bool = True,
    source: ArchiveSpec | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict, str | None]:
    """Numpy arrays of a data set (built and cached on first use) and a fallback notice.

    "imagenette" downloads ``source`` (Imagenette unless a test says otherwise); where that is
    impossible it falls back to the generated data set with a notice, or raises if
    ``fallback`` is False."""
    root = Path(root) if root else data_dir()
    source = source or IMAGENETTE
    notice = None
    if name == "imagenette":
        try:
            archive = download(
                source.url, root / source.filename, source.md5, source.bytes, progress=progress
            )
            cache = root / f"cache-{source.filename.removesuffix('.tgz')}-{size}px"
            arrays, manifest = build_cache(
                archive, source.root, size, cache, {"dataset": "imagenette"}, progress
            )
            return (
                arrays,
                {
                    **manifest,
                    "cache": str(cache),
                    "archive": str(archive),
                    "root_name": source.root,
                },
                None,
            )
        except DatasetUnavailable as e:
            if not fallback:
                raise
            notice = (
                "Imagenette is not available, so this run uses the GENERATED shapes data set "
                f"instead; results are not Imagenette results. {e}"
            )
            name = "shapes"
    if name != "shapes":
        raise ValueError(f"unknown data set {name!r}: use 'imagenette' or 'shapes'")
    archive = shapes_archive(n_train, n_val, seed, root)
    cache = root / f"cache-shapes-{seed}-{n_train}-{n_val}-{size}px"
    arrays, manifest = build_cache(
        archive, "imagenette-shapes", size, cache, {"dataset": "shapes", "seed": seed}, progress
    )
    return (
        arrays,
        {
            **manifest,
            "cache": str(cache),
            "archive": str(archive),
            "root_name": "imagenette-shapes",
        },
        notice,
    )


_loaded: dict[tuple, Dataset] = {}
_load_lock = threading.Lock()


def load(
    name: str,
    size: int,
    device: torch.device | str = "cpu",
    *,
    n_train: int = 1000,
    n_val: int = 300,
    seed: int = 0,
    fallback: bool = True,
    source: ArchiveSpec | None = None,
    progress: bool = True,
) -> Dataset:
    """The data set as tensors on ``device``; kept in memory so later runs start at once."""
    device = torch.device(device)
    key = (name, size, str(device), n_train, n_val, seed, str(data_dir()), source)
    with _load_lock:
        if key in _loaded:
            return _loaded[key]
        arrays, manifest, notice = prepare_arrays(
            name,
            size,
            n_train=n_train,
            n_val=n_val,
            seed=seed,
            fallback=fallback,
            source=source,
            progress=progress,
        )
        table = IMAGENETTE_CLASSES if manifest["dataset"] == "imagenette" else SHAPES_CLASSES
        classes = [table.get(c, c) for c in manifest["class_dirs"]]

        def to_device(x):
            return torch.from_numpy(x).to(device).permute(0, 3, 1, 2).contiguous()

        ds = Dataset(
            name="Imagenette (160 px archive)"
            if manifest["dataset"] == "imagenette"
            else "generated shapes (Imagenette layout)",
            classes=classes,
            train_x=to_device(arrays["train_x"]),
            train_y=torch.from_numpy(arrays["train_y"]).to(device),
            val_x=to_device(arrays["val_x"]),
            val_y=torch.from_numpy(arrays["val_y"]).to(device),
            size=size,
            cache=Path(manifest["cache"]),
            notice=notice,
            extras={k: manifest[k] for k in ("dataset", "archive", "root_name")},
        )
        _loaded[key] = ds
        return ds


# --------------------------------------------------------------------------- augmentation
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
    align_corners=False. Built axis by axis: affine_grid's batched matrix product cost 0.7 ms
    a step of the ci-profile model on 2 cores (6% of the step), this a few microseconds."""
    dev = sx.device
    xs = (torch.arange(w, device=dev, dtype=sx.dtype) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, device=dev, dtype=sx.dtype) * 2 + 1) / h - 1
    gx = sx[:, None] * xs + tx[:, None]  # (n, w)
    gy = sy[:, None] * ys + ty[:, None]  # (n, h)
    n = sx.shape[0]
    return torch.stack((gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)), dim=-1)


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    from lessons.profiles import get_profile

    parser = argparse.ArgumentParser(description="Download and cache the profile's data set.")
    parser.add_argument("--prepare", action="store_true", help="fetch, decode and cache")
    parser.add_argument("--profile", default=None, help="gpu | cpu | ci (default: auto)")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    _, manifest, notice = prepare_arrays(
        profile.dataset, profile.size, n_train=profile.n_train, n_val=profile.n_val
    )
    print(
        f"profile {profile.name}: {manifest['dataset']} at {profile.size}px cached in "
        f"{manifest['cache']}"
    )
    if notice:
        print("NOTICE:", notice)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
