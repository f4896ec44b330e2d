"""Imagenette's facts and the archive path it shares with the generated data set:
download -> safe extraction -> decoding to uint8 arrays.

The download shows a progress bar, resumes a partial file, and checks size and md5; when the
network is out of reach its error says where to place the archive by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lessons import data  # DataError, DatasetUnavailable (data imports this module too)

# --- Imagenette's facts, in one place (fastai/imagenette README; torchvision's Imagenette) ---
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
    response = _open(url, dest, have, timeout, size, md5)
    if response is not None:
        with response:
            _receive(response, url, part, have, size, progress)
    _check(url, part, size, md5)
    os.replace(part, dest)
    return dest


def _open(url: str, dest: Path, have: int, timeout: float, size: int | None, md5: str | None):
    """The HTTP response, asking for the bytes after ``have``; None if the .part is complete."""
    request = urllib.request.Request(url, headers={"User-Agent": "batch-size-lessons"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and size is not None and have == size:
            return None
        raise data.DatasetUnavailable(
            offline_message(url, dest, f"HTTP {e.code}", size, md5)
        ) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise data.DatasetUnavailable(offline_message(url, dest, str(reason), size, md5)) from e


def _receive(response, url: str, part: Path, have: int, size: int | None, progress: bool):
    """Append the response to ``part`` (or rewrite it when the server sent the whole file)."""
    resumed = response.status == 206
    if not resumed:
        have = 0
    total = size
    if total is None and response.headers.get("Content-Length"):
        total = have + int(response.headers["Content-Length"])
    name = part.name.removesuffix(".part")
    try:
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=name,
                disable=not progress,
            ) as bar,
        ):
            while block := response.read(1 << 20):
                f.write(block)
                bar.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        got = part.stat().st_size if part.exists() else 0
        raise data.DatasetUnavailable(
            f"The download of {url} was interrupted after {got:,} bytes ({e}). "
            f"Run it again to resume from {part}."
        ) from e


def _check(url: str, part: Path, size: int | None, md5: str | None) -> None:
    """Size and md5 of the finished ``part``: too short can resume, wrong is removed."""
    got = part.stat().st_size
    if size is not None and got != size:
        if got < size:
            raise data.DatasetUnavailable(
                f"The download of {url} stopped after {got:,} of {size:,} bytes. "
                f"Run it again to resume from {part}."
            )
        part.unlink()
        raise data.DataError(f"{url} gave {got:,} bytes, expected {size:,}; the file was removed.")
    if md5 is not None:
        digest = md5sum(part)
        if digest != md5:
            part.unlink()
            raise data.DataError(
                f"{url} downloaded with md5 {digest}, expected {md5}: the file is corrupt or "
                "not the expected archive, so it was removed. Run again to download it afresh."
            )


# --------------------------------------------------------------------------- extract, decode
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
        raise data.DataError(
            f"{archive} is not a readable tar archive ({e}); delete it, retry."
        ) from e
    with tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
                raise data.DataError(f"{archive} holds an unsafe path {m.name!r}; not extracting.")
            if not (m.isfile() or m.isdir()):
                raise data.DataError(
                    f"{archive} holds a link or device {m.name!r}; not extracting."
                )
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
        try:
            tar.extractall(tmp, members=members, filter="data")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


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
        raise data.DataError(
            f"{split_dir} is missing: the archive does not have the expected layout."
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((split_dir / name).iterdir()):
            if f.suffix.lower() in (".jpeg", ".jpg", ".png"):
                files.append(f)
                labels.append(label)
    return files, labels, classes


def decode_split(root: Path, split: str, size: int, progress: bool = True):
    """One split decoded in threads: uint8 images (n, size, size, 3), labels, class folders."""
    files, labels, classes = list_split(root, split)
    if not files:
        raise data.DataError(f"{Path(root) / split} holds no images.")
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
