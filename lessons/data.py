"""Data sets as one uint8 tensor on the device, built once from an archive and cached.

The path is the same for Imagenette and the generated stand-in: archive (.tgz) -> extracted
folders ``<root>/{train,val}/<class>/*.JPEG`` -> decoded once, resized and centre-cropped to
``size`` (``lessons.imagenette``) -> cached here as uint8 ``.npy`` arrays plus a manifest
(written atomically, verified on load) -> one tensor on the device. Normalisation and
augmentation run on the device (``lessons.augment``).

``python -m lessons.data --prepare`` fetches and caches the data set of the active profile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lessons import imagenette, shapes

CACHE_VERSION = 1


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
        imagenette.safe_extract(archive, extracted)
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
        x, y, cls = imagenette.decode_split(folder, split, size, progress=progress)
        if classes is not None and cls != classes:
            raise DataError(f"{folder}: train and val have different class folders.")
        classes = cls
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    write_cache(cache, arrays, {**meta, "size": size, "class_dirs": classes})
    found = read_cache(cache)
    if found is None:
        raise DataError(f"The cache at {cache} did not verify right after writing; disk full?")
    return found


def prepare_arrays(
    name: str,
    size: int,
    *,
    root: Path | None = None,
    n_train: int = 1000,
    n_val: int = 300,
    seed: int = 0,
    fallback: bool = True,
    source: imagenette.ArchiveSpec | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict, str | None]:
    """Numpy arrays of a data set (built and cached on first use) and a fallback notice.

    "imagenette" downloads ``source`` (Imagenette unless a test says otherwise); where that is
    impossible it falls back to the generated data set with a notice, or raises if
    ``fallback`` is False."""
    root = Path(root) if root else data_dir()
    notice = None
    if name == "imagenette":
        try:
            arrays, manifest = _prepare_imagenette(
                source or imagenette.IMAGENETTE, size, root, progress
            )
            return arrays, manifest, None
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
    archive = shapes.shapes_archive(n_train, n_val, seed, root)
    cache = root / f"cache-shapes-{seed}-{n_train}-{n_val}-{size}px"
    meta = {"dataset": "shapes", "seed": seed}
    arrays, manifest = build_cache(archive, shapes.SHAPES_ROOT, size, cache, meta, progress)
    return arrays, _with_paths(manifest, cache, archive, shapes.SHAPES_ROOT), notice


def _prepare_imagenette(
    source: imagenette.ArchiveSpec, size: int, root: Path, progress: bool
) -> tuple[dict[str, np.ndarray], dict]:
    archive = imagenette.download(
        source.url, root / source.filename, source.md5, source.bytes, progress=progress
    )
    cache = root / f"cache-{source.filename.removesuffix('.tgz')}-{size}px"
    meta = {"dataset": "imagenette"}
    arrays, manifest = build_cache(archive, source.root, size, cache, meta, progress)
    return arrays, _with_paths(manifest, cache, archive, source.root)


def _with_paths(manifest: dict, cache: Path, archive: Path, root_name: str) -> dict:
    return {**manifest, "cache": str(cache), "archive": str(archive), "root_name": root_name}


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
    source: imagenette.ArchiveSpec | None = None,
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
        is_imagenette = manifest["dataset"] == "imagenette"
        table = imagenette.IMAGENETTE_CLASSES if is_imagenette else shapes.SHAPES_CLASSES
        classes = [table.get(c, c) for c in manifest["class_dirs"]]

        def to_device(x):
            return torch.from_numpy(x).to(device).permute(0, 3, 1, 2).contiguous()

        ds = Dataset(
            name="Imagenette (160 px archive)"
            if is_imagenette
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
    # Run the imported lessons.data, not this __main__ copy: lessons.imagenette raises
    # lessons.data's errors, which this copy's classes would not catch.
    from lessons import data

    raise SystemExit(data.main())
