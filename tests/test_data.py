"""The data pipeline end to end: a generated archive in Imagenette's layout, served from a
loopback HTTP server, through download, extraction, decoding and the verified cache."""

import hashlib
import http.server
import io
import runpy
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lessons import augment, data, imagenette, profiles, shapes


class ArchiveServer:
    """Serves one file on 127.0.0.1. mode: "range" (honours Range), "no-range" (always the
    whole file with 200), "cut-once" (the first response stops after ``cut`` bytes)."""

    def __init__(self, payload: bytes, mode: str = "range", cut: int = 0):
        self.payload, self.mode, self.cut = payload, mode, cut
        self.requests: list[str | None] = []  # the Range header of each request
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                body, status = server.payload, 200
                if rng and server.mode != "no-range":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    body, status = server.payload[start:], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.mode == "cut-once" and len(server.requests) == 1:
                    self.wfile.write(body[: server.cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/imagenette2-160.tgz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake_imagenette(tmp_path_factory):
    """A small archive with Imagenette's exact layout: imagenette2-160/{train,val}/<wnid>/."""
    path = tmp_path_factory.mktemp("archive") / "imagenette2-160.tgz"
    shapes.make_shapes_archive(
        path,
        n_train=40,
        n_val=20,
        seed=3,
        root_name="imagenette2-160",
        class_dirs=list(imagenette.IMAGENETTE_CLASSES),
    )
    payload = path.read_bytes()
    return payload, hashlib.md5(payload).hexdigest()


def spec_for(server: ArchiveServer, payload: bytes, md5: str) -> imagenette.ArchiveSpec:
    return imagenette.ArchiveSpec(
        server.url, "imagenette2-160.tgz", len(payload), md5, "imagenette2-160"
    )


@pytest.fixture
def serve():
    servers = []

    def start(payload, mode="range", cut=0):
        servers.append(ArchiveServer(payload, mode, cut))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_imagenette_facts_in_one_place():
    assert imagenette.IMAGENETTE.url.endswith("/imagenette2-160.tgz")
    assert imagenette.IMAGENETTE.bytes == 99_003_388
    assert imagenette.IMAGENETTE.md5 == "e793b78cc4c9e9a4ccc0c1155377a412"
    assert list(imagenette.IMAGENETTE_CLASSES.values())[0] == "tench"
    assert len(imagenette.IMAGENETTE_CLASSES) == 10


def test_good_archive_downloads_extracts_decodes_and_caches(fake_imagenette, serve, data_root):
    payload, md5 = fake_imagenette
    server = serve(payload)
    spec = spec_for(server, payload, md5)
    arrays, manifest, notice = data.prepare_arrays("imagenette", 24, source=spec, progress=False)
    assert notice is None
    assert (data_root / "imagenette2-160.tgz").read_bytes() == payload
    assert not (data_root / "imagenette2-160.tgz.part").exists()
    assert arrays["train_x"].shape == (40, 24, 24, 3) and arrays["train_x"].dtype == np.uint8
    assert arrays["val_x"].shape == (20, 24, 24, 3)
    assert manifest["class_dirs"] == sorted(imagenette.IMAGENETTE_CLASSES)
    # labels follow the folders: four of each class in train
    assert np.bincount(arrays["train_y"]).tolist() == [4] * 10
    # decoding matches an independent decode of the same file
    folder = data_root / "imagenette2-160-extracted" / "imagenette2-160" / "train"
    first = sorted((folder / manifest["class_dirs"][0]).iterdir())[0]
    assert np.array_equal(arrays["train_x"][0], imagenette.load_image(first, 24))
    # a second call uses the cache and does not download again
    data.prepare_arrays("imagenette", 24, source=spec, progress=False)
    assert len(server.requests) == 1


def test_loaded_dataset_names_imagenette_classes(fake_imagenette, serve, data_root):
    payload, md5 = fake_imagenette
    spec = spec_for(serve(payload), payload, md5)
    ds = data.load("imagenette", 16, "cpu", source=spec, progress=False)
    assert ds.notice is None
    assert ds.classes[0] == "tench" and ds.classes[-1] == "parachute"
    assert ds.train_x.shape == (40, 3, 16, 16) and ds.train_x.dtype == torch.uint8
    assert data.load("imagenette", 16, "cpu", source=spec, progress=False) is ds  # in memory


def test_wrong_md5_is_a_clear_error_and_leaves_nothing(fake_imagenette, serve, data_root):
    payload, _ = fake_imagenette
    spec = spec_for(serve(payload), payload, "0" * 32)
    with pytest.raises(data.DataError, match="md5"):
        data.prepare_arrays("imagenette", 24, source=spec, progress=False)
    assert sorted(p.name for p in data_root.iterdir()) == []  # no archive, no part, no cache


def test_interrupted_transfer_resumes_with_a_range_request(fake_imagenette, serve, data_root):
    payload, md5 = fake_imagenette
    server = serve(payload, "cut-once", cut=len(payload) // 3)
    spec = spec_for(server, payload, md5)
    with pytest.raises(data.DatasetUnavailable, match="resume"):
        data.prepare_arrays("imagenette", 24, source=spec, fallback=False, progress=False)
    part = data_root / "imagenette2-160.tgz.part"
    assert part.stat().st_size == len(payload) // 3
    arrays, _, notice = data.prepare_arrays("imagenette", 24, source=spec, progress=False)
    assert notice is None and arrays["train_x"].shape[0] == 40
    assert server.requests == [None, f"bytes={len(payload) // 3}-"]
    assert (data_root / "imagenette2-160.tgz").read_bytes() == payload


def test_server_without_range_support_restarts_cleanly(fake_imagenette, serve, data_root):
    payload, md5 = fake_imagenette
    server = serve(payload, "no-range")
    (data_root / "imagenette2-160.tgz.part").write_bytes(payload[:1000])
    spec = spec_for(server, payload, md5)
    data.prepare_arrays("imagenette", 24, source=spec, progress=False)
    assert server.requests == ["bytes=1000-"]
    assert (data_root / "imagenette2-160.tgz").read_bytes() == payload


def test_refused_connection_says_how_to_place_the_archive(data_root):
    with socket_closed_port() as port:
        spec = imagenette.ArchiveSpec(
            f"http://127.0.0.1:{port}/imagenette2-160.tgz",
            "imagenette2-160.tgz",
            123,
            "ab" * 16,
            "imagenette2-160",
        )
        with pytest.raises(data.DatasetUnavailable) as err:
            data.prepare_arrays("imagenette", 24, source=spec, fallback=False, progress=False)
        text = str(err.value)
        assert str(data_root / "imagenette2-160.tgz") in text and "LESSONS_DATA" in text
        # with the fallback: the generated data set, and a notice that says so
        arrays, manifest, notice = data.prepare_arrays(
            "imagenette", 24, source=spec, n_train=20, n_val=10, progress=False
        )
    assert manifest["dataset"] == "shapes" and "GENERATED" in notice
    assert arrays["train_x"].shape == (20, 24, 24, 3)


def test_prepare_command_falls_back_when_offline(data_root, monkeypatch, capsys):
    """`python -m lessons.data --prepare` runs data.py a second time, as __main__; its
    offline fallback must still catch the error that lessons.imagenette raises."""
    with socket_closed_port() as port:
        spec = imagenette.ArchiveSpec(f"http://127.0.0.1:{port}/x.tgz", "x.tgz", 10, None, "x")
    ci = profiles.get_profile("ci", dataset="imagenette", n_train=20, n_val=10)
    monkeypatch.setattr(imagenette, "IMAGENETTE", spec)
    monkeypatch.setattr(profiles, "get_profile", lambda name=None: ci)
    monkeypatch.setattr(sys, "argv", ["lessons.data", "--prepare"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as done:
        warnings.simplefilter("ignore", RuntimeWarning)  # lessons.data is already imported
        runpy.run_module("lessons.data", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "profile ci: shapes" in out and "GENERATED" in out


class socket_closed_port:
    """A loopback port with nothing listening (bound, then closed)."""

    def __enter__(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc):
        return False


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, content: bytes = b"x") -> Path:
    path = tmp_path / "evil.tgz"
    with tarfile.open(path, "w:gz") as tar:
        member.size = len(content) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(content) if member.isfile() else None)
    return path


@pytest.mark.parametrize("name", ["../escape.txt", "/abs/path.txt", "ok/../../escape.txt"])
def test_extract_rejects_unsafe_paths(tmp_path, name):
    archive = _tar_with(tmp_path, tarfile.TarInfo(name))
    with pytest.raises(data.DataError, match="unsafe path"):
        imagenette.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_extract_rejects_links(tmp_path):
    link = tarfile.TarInfo("root/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(data.DataError, match="link"):
        imagenette.safe_extract(_tar_with(tmp_path, link), tmp_path / "out")


def test_corrupt_or_partial_cache_is_rebuilt_never_used(data_root):
    arrays, manifest, _ = data.prepare_arrays("shapes", 16, n_train=20, n_val=10, progress=False)
    cache = Path(manifest["cache"])
    good = arrays["train_x"].copy()
    # flip one byte inside the image array: the checksum no longer matches
    path = cache / "train_x.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert data.read_cache(cache) is None
    arrays, _, _ = data.prepare_arrays("shapes", 16, n_train=20, n_val=10, progress=False)
    assert np.array_equal(arrays["train_x"], good)
    # a cache whose manifest was never written (interrupted build) is not used either
    (cache / "manifest.json").unlink()
    assert data.read_cache(cache) is None
    arrays, _, _ = data.prepare_arrays("shapes", 16, n_train=20, n_val=10, progress=False)
    assert np.array_equal(arrays["train_x"], good) and data.read_cache(cache) is not None


def test_generated_data_is_deterministic_from_its_seed(tmp_path):
    a = shapes.make_shapes_archive(tmp_path / "a.tgz", 10, 10, seed=5)
    b = shapes.make_shapes_archive(tmp_path / "b.tgz", 10, 10, seed=5)
    c = shapes.make_shapes_archive(tmp_path / "c.tgz", 10, 10, seed=6)

    def images(archive):
        with tarfile.open(archive) as tar:
            return [
                np.asarray(Image.open(tar.extractfile(m))) for m in tar.getmembers() if m.isfile()
            ]

    ia, ib, ic = images(a), images(b), images(c)
    assert len(ia) == 20 and all(np.array_equal(x, y) for x, y in zip(ia, ib))
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(ia, ic))


def test_load_image_shrinks_on_decode_and_centre_crops(tmp_path):
    img = np.zeros((160, 240, 3), np.uint8)
    img[:, 40:200] = 255  # a white square in the middle of a wide image
    Image.fromarray(img).save(tmp_path / "x.JPEG", quality=95)
    out = imagenette.load_image(tmp_path / "x.JPEG", 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.mean() > 240  # the centre crop is the white square


def test_augment_identity_and_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    same = augment.augment(x, g, min_scale=1.0, flip=False)
    assert torch.allclose(same, x, atol=1e-4)
    flipped = [
        augment.augment(x, torch.Generator().manual_seed(s), min_scale=1.0) for s in range(8)
    ]
    # with full-size crops every output is the image or its mirror, and both occur
    kinds = {
        (
            "same"
            if torch.allclose(f[0], x[0], atol=1e-4)
            else "mirror"
            if torch.allclose(f[0], x[0].flip(-1), atol=1e-4)
            else "other"
        )
        for f in flipped
    }
    assert kinds == {"same", "mirror"}
    crops = augment.augment(x, torch.Generator().manual_seed(1), min_scale=0.35)
    assert crops.shape == x.shape and not torch.allclose(crops, x)


def test_crop_grid_matches_affine_grid():
    """The axis-by-axis grid against torch's affine_grid for the same crops and flips, on a
    non-square image so that rows and columns cannot be swapped unnoticed."""
    g = torch.Generator().manual_seed(3)
    n, h, w = 16, 6, 11
    sx = (torch.rand(n, generator=g) + 0.3) * torch.where(torch.rand(n, generator=g) < 0.5, -1, 1)
    sy, tx, ty = (
        torch.rand(n, generator=g) + 0.3,
        torch.randn(n, generator=g),
        torch.randn(n, generator=g),
    )
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    ref = torch.nn.functional.affine_grid(theta, [n, 3, h, w], align_corners=False)
    grid = augment.crop_grid(sx, tx, sy, ty, h, w)
    assert grid.shape == ref.shape == (n, h, w, 2)
    assert torch.allclose(grid, ref, atol=1e-6)


def test_normalize_uses_imagenet_statistics():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = augment.normalize(x)
    expect = [(1 - m) / s for m, s in zip(augment.MEAN, augment.STD)]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expect), atol=1e-5)
