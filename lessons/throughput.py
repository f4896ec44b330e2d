"""In-process throughput measurements for the bench (lessons.bench): the conventional
per-item DataLoader pipeline, the model alone, the engine, and the first point of a run."""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from lessons import data, imagenette
from lessons import scaling as S
from lessons.augment import MEAN, STD, augment, normalize
from lessons.compute import backward_step, forward_loss, resolve
from lessons.config import TrainConfig
from lessons.train import build_model_and_optimizer, train


class FolderDataset(torch.utils.data.Dataset):
    """The conventional pipeline: one JPEG decoded and augmented per item, on the CPU."""

    def __init__(self, folder, split: str, size: int):
        self.files, self.labels, _ = imagenette.list_split(folder, split)
        self.size = size
        self.mean = np.asarray(MEAN, np.float32) * 255
        self.std = np.asarray(STD, np.float32) * 255

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        rng = np.random.default_rng()
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
        w, h = im.size
        side = min(w, h) * math.sqrt(rng.uniform(0.35, 1.0))
        left, top = rng.uniform(0, w - side), rng.uniform(0, h - side)
        im = im.resize(
            (self.size, self.size), Image.BILINEAR, box=(left, top, left + side, top + side)
        )
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = (np.asarray(im, np.float32) - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), self.labels[i]


def _model_and_optimizer(config: TrainConfig, device: torch.device, classes: int = 10):
    """The engine's model and optimizer, built as train builds them, and how they compute."""
    compute = resolve(config, device)
    return (*build_model_and_optimizer(config, compute, classes), compute)


def _step(model, opt, x, y, dtype, scaler=None) -> torch.Tensor:
    """One training step as the engine takes it; the loss, on the device."""
    opt.zero_grad(set_to_none=True)
    loss = forward_loss(model, x, y, dtype)
    backward_step(loss, opt, scaler)
    return loss


def baseline_img_per_s(
    config: TrainConfig, folder, device: torch.device, steps: int, warmup: int, workers: int
) -> float:
    ds = FolderDataset(folder, "train", config.size)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=config.batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    model, opt, compute = _model_and_optimizer(config, device)  # as the engine: only data differs
    cuda = device.type == "cuda"
    dtype, scaler = compute.dtype, compute.scaler()
    done, t0 = 0, None
    while done < warmup + steps:
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            loss = _step(model, opt, x, y, dtype, scaler)
            done += 1
            if done == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if done >= warmup + steps:
                break
    loss.item()
    return steps * config.batch / (time.perf_counter() - t0)


def bare_img_per_s(config: TrainConfig, ds: data.Dataset, steps: int, warmup: int = 5) -> float:
    """The model alone: forward, backward and optimizer step on one batch already on the
    device, normalised, augmented and in channels_last, as the engine's steps see it, and no
    data path at all. No pipeline can feed the model faster than this, so bare / baseline is
    the ceiling of ``speedup``, and engine / bare what the engine's data path costs."""
    device = ds.device
    cuda = device.type == "cuda"
    model, opt, compute = _model_and_optimizer(config, device, len(ds.classes))
    dtype, scaler = compute.dtype, compute.scaler()
    gen = torch.Generator(device=device).manual_seed(config.seed)
    idx = torch.randperm(ds.n_train, generator=gen, device=device)[: config.batch]
    x = compute.memory(augment(normalize(ds.train_x[idx]), gen))
    y = ds.train_y[idx]
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = _step(model, opt, x, y, dtype, scaler)
    loss.item()
    return steps * config.batch / (time.perf_counter() - t0)


def engine_img_per_s(config: TrainConfig, ds: data.Dataset) -> float:
    """Images per second between the first step's loss and the last (both host syncs)."""
    first = last = None
    for rec in train(config, dataset=ds):
        if rec.kind == "train":
            if first is None:
                first = (rec.samples, time.perf_counter())
            last = (rec.samples, time.perf_counter())
    return (last[0] - first[0]) / (last[1] - first[1])


def in_thread(fn, *args):
    """fn(*args) in a new thread, as a widget's worker runs training; its result."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join()
    return out[0]


def first_point_s(config: TrainConfig, ds: data.Dataset, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen = train(config, dataset=ds)
        next(r for r in gen if r.kind == "train")
        times.append(time.perf_counter() - t0)
        gen.close()
    return statistics.median(times)


def candidate_runs(base: TrainConfig, ds: data.Dataset, steps: int, baseline: float) -> list:
    """Cheaper models and larger batches than ``base``: bare img/s, its ratio to
    ``baseline``, and one default-length run (evaluation included) of each."""
    rows = []
    for stride in (1, 2):
        for width in (base.width, max(1, base.width // 2)):
            for k in (1, 2, 4):
                hp = S.transfer(dict(lr=base.lr, momentum=base.momentum), 1, k, "sgd-linear")
                c = replace(base, stem_stride=stride, width=width, batch=base.batch * k, **hp)
                timed = replace(c, evaluate=False, max_steps=steps + 1, epochs=10_000)
                bare = bare_img_per_s(timed, ds, max(5, steps // k))
                t0 = time.perf_counter()
                records = list(train(c, dataset=ds))
                evals = [r for r in records if r.kind == "eval"]
                rows.append(
                    {
                        "stem_stride": stride,
                        "width": width,
                        "batch": c.batch,
                        "lr": round(c.lr, 4),
                        "bare_img_per_s": round(bare, 1),
                        "ceiling_speedup": round(bare / baseline, 2),
                        "run_s": round(time.perf_counter() - t0, 2),
                        "val_acc": round(evals[-1].val_acc, 4) if evals else None,
                        "ended": records[-1].kind if records else None,  # done | diverged
                    }
                )
    return rows
