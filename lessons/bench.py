"""``python -m lessons.bench``: the engine against a conventional per-item pipeline.

Measured in the same run, on the same model, batch, optimizer and precision:
- baseline: a torch DataLoader over the extracted JPEG folder, decoding every item with Pillow
  (full decode, random resized crop, flip, to tensor, normalise), ``min(8, cores)`` workers;
- engine: lessons.train with the split preloaded as uint8 on the device and augmentation on the
  device (the median of three timed runs);
- bare_img_per_s: the model alone (forward, backward, step on one batch already prepared on
  the device): ``ceiling_speedup`` = bare / baseline is the most any data path could reach,
  ``engine_over_bare`` what the engine's data path costs;
- precision: the profile's default (lessons.compute.resolve); where the device computes
  bf16 natively (CUDA 8.0+, or a CPU with AVX512-BF16 / AMX), the engine in float32 and under
  bf16 autocast (``engine_fp32_img_per_s``, ``engine_bf16_img_per_s``, ``bf16_speedup``); on
  a GPU with float16 tensor cores only (a T4, a V100), float32 against loss-scaled fp16
  autocast (``engine_fp16_img_per_s``, ``fp16_speedup``);
- micro_*: invariant AdamW with 8 micro-batches per batch (LayerNorm model), one backward per
  micro-batch against all micro-batch gradients in one torch.func (vmap) pass;
- lamb_*: the engine with LAMB, its trust ratios recorded (as lesson 3 trains it), against
  AdamW on the same model: ``lamb_over_adamw``, what LAMB's per-tensor trust ratios cost
  (lessons.optim.Lamb steps every tensor of a group in one torch._foreach_* op per line);
  ``fused_adamw_speedup``: AdamW with torch's fused step (``adamw_fused``: whether the run
  used it, lessons.compute.use_fused) against torch's default step;
- first_point_s: from a start request to the first loss point of a new run (data warm);
- cold_first_point_s / warmed_first_point_s: the same for the first run of a fresh process
  (its data loaded), without and after lessons.warmup.warm_up(), which a widget runs in the
  background while the student reads (on a GPU: CUDA, cuDNN and the kernels a run needs);
- lesson_run_s: one default run of the profile, evaluation included, and its val accuracy;
- thread_*: the engine in a worker thread, as a widget runs it, after torch work on the main
  thread: as is, and after lessons.tuning.free_openmp_threads() on the main thread;
- malloc_*: the engine in a worker thread, as a widget runs it, in a fresh process for each of
  MALLOC_SETTINGS: glibc malloc's defaults; lessons.tuning.keep_freed_memory(), as train() sets
  on a CPU; and that with one malloc arena for all threads (GLIBC_TUNABLES, as make lab, test and
  bench run): images per second, page faults per step, speedup over the defaults (CPU only);
- sweep_*: a 4-run sweep (learning rates 0.5x, 1x, 2x, 4x the default) one run after the other
  against the four side by side (lessons.sweep.train_many: a thread per run, on CUDA a stream
  per run), each as a multiple of one run.

``--candidates`` adds ``candidates``: for cheaper models and larger batches than the profile's
(stem stride 1 or 2, the profile's width or half of it, its batch, 2x and 4x with the learning
rate scaled linearly, lessons.scaling's "sgd-linear" rule), the model alone (bare img/s and its
ratio to the same run's baseline) and one default-length run (seconds, val accuracy): what it
would take to reach a speedup of 20 on a GPU, and what each choice costs in accuracy.

Where Imagenette cannot be had, the bench uses the generated data set at Imagenette's size
(9,469 train / 3,925 val images of 160 px) and says so in its output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lessons import data, imagenette
from lessons import scaling as S
from lessons.augment import MEAN, STD, augment, normalize
from lessons.callbacks import TrustRatios
from lessons.compute import (
    backward_step,
    cuda_fp16_only,
    forward_loss,
    native_bf16,
    resolve,
    use_fused,
)
from lessons.config import TrainConfig
from lessons.profiles import get_profile, pick_device
from lessons.sweep import train_many
from lessons.train import build_model_and_optimizer, train
from lessons.tuning import MALLOC_TUNABLES, free_openmp_threads
from lessons.warmup import warm_up


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


def _engine_child(config_json: str, name: str, size: int, n_train: int, n_val: int) -> None:
    """In a fresh process (see malloc_effect): load the data, train as a widget does (in a
    worker thread, after torch work on the main thread), print one JSON line."""
    ds = data.load(name, size, torch.device("cpu"), n_train=n_train, n_val=n_val, progress=False)
    fields = json.loads(config_json)  # JSON gives lists back where the config had tuples
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    engine_img_per_s(replace(config, max_steps=10), ds)  # warm up, on the main thread
    free_openmp_threads()

    def measure() -> tuple[float, float]:
        engine_img_per_s(replace(config, max_steps=10), ds)  # this thread's malloc arena grows
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rate = engine_img_per_s(config, ds)
        return rate, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / config.max_steps

    rate, faults = in_thread(measure)
    print(json.dumps({"img_per_s": rate, "faults_per_step": faults}))


def _child_json(code: str, what: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh Python process and return the JSON object its last line holds;
    a failed child raises RuntimeError with its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {what}'s child process failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


MALLOC_SETTINGS = {  # name: (LESSONS_KEEP_MEMORY, whether GLIBC_TUNABLES has MALLOC_TUNABLES)
    "default": ("0", False),  # glibc's own, self-adjusting thresholds
    "kept": ("1", False),  # keep_freed_memory(), as train() sets on a CPU
    "one_arena": ("1", True),  # and one malloc arena for all threads, as make lab/test/bench run
}
MALLOC_FIELDS = tuple(
    f"malloc_{name}_{what}"
    for name in MALLOC_SETTINGS
    for what in ("img_per_s", "faults_per_step", "speedup")
    if not (name == "default" and what == "speedup")
)


def malloc_effect(config: TrainConfig, name: str, size: int, n_train: int, n_val: int) -> dict:
    """The engine under each of MALLOC_SETTINGS, each in a fresh process (malloc's settings
    cannot be undone in this one), on the same data (data.load's arguments) and config."""
    fields = {k: v for k, v in config.__dict__.items() if not callable(v) and k != "callbacks"}
    args = [json.dumps(fields), name, size, n_train, n_val]
    code = f"from lessons.bench import _engine_child; _engine_child(*{args!r})"
    theirs = [
        t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and t != MALLOC_TUNABLES
    ]
    out = {}
    for setting, (keep, one_arena) in MALLOC_SETTINGS.items():
        tunables = ":".join(theirs + [MALLOC_TUNABLES] * one_arena)
        env = {**os.environ, "LESSONS_KEEP_MEMORY": keep, "LESSONS_DEVICE": "cpu"}
        env.pop("GLIBC_TUNABLES", None)
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out[setting] = _child_json(code, "malloc measurement", env)
    result = {}
    for setting, r in out.items():
        result[f"malloc_{setting}_img_per_s"] = round(r["img_per_s"], 1)
        result[f"malloc_{setting}_faults_per_step"] = round(r["faults_per_step"])
        if setting != "default":
            speedup = r["img_per_s"] / out["default"]["img_per_s"]
            result[f"malloc_{setting}_speedup"] = round(speedup, 2)
    return result


def _first_point_child(profile_name: str, name: str, n_train: int, n_val: int, warm: bool):
    """In a fresh process (see cold_first_points): load the data on the device, warm_up()
    where ``warm``, then time one run's first point; print one JSON line."""
    c = TrainConfig.from_profile(profile_name, dataset=name, n_train=n_train, n_val=n_val)
    device = pick_device()
    ds = data.load(name, c.size, device, n_train=n_train, n_val=n_val, progress=False)
    if warm:
        warm_up()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"first_point_s": first_point_s(c, ds, repeats=1)}))


def cold_first_points(profile_name: str, name: str, n_train: int, n_val: int) -> dict:
    """The first run's first point in a fresh process, without and after warm_up()."""
    out = {}
    for warm, key in ((False, "cold_first_point_s"), (True, "warmed_first_point_s")):
        args = [profile_name, name, n_train, n_val, warm]
        code = f"from lessons.bench import _first_point_child; _first_point_child(*{args!r})"
        out[key] = round(_child_json(code, "first-point measurement")["first_point_s"], 4)
    return out


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


def run_bench(
    profile_name: str | None = None,
    steps: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    candidates: bool = False,
) -> dict:
    profile = get_profile(profile_name)
    device = pick_device()
    notice = None
    n_train, n_val, name = profile.n_train, profile.n_val, profile.dataset
    try:
        ds = data.load(
            name,
            profile.size,
            device,
            n_train=n_train,
            n_val=n_val,
            fallback=False,
            progress=progress,
        )
    except data.DatasetUnavailable:
        name = "shapes"
        n_train, n_val = imagenette.IMAGENETTE_COUNTS["train"], imagenette.IMAGENETTE_COUNTS["val"]
        notice = (
            "Imagenette unavailable: measured on the generated data set at Imagenette's "
            f"size ({n_train:,} train / {n_val:,} val images, 160 px archive)"
        )
        ds = data.load(name, profile.size, device, n_train=n_train, n_val=n_val, progress=progress)
    base = TrainConfig.from_profile(profile.name, dataset=name, n_train=n_train, n_val=n_val)
    steps = steps or min(300, max(50, 3 * (ds.n_train // base.batch)))
    warmup = 5
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    # as many epochs as it takes: max_steps ends the timed run
    timed = replace(base, evaluate=False, max_steps=steps + 1, epochs=10_000)

    engine_img_per_s(replace(timed, max_steps=4 * warmup), ds)  # warm up
    engine = statistics.median(engine_img_per_s(timed, ds) for _ in range(3))
    bare = statistics.median(bare_img_per_s(timed, ds, steps) for _ in range(3))
    # float32 against the autocast this device computes faster: bf16 where it has bf16
    # hardware, fp16 (loss-scaled) on a GPU with float16 tensor cores only
    bf16_native = native_bf16(device)
    fast = "bf16" if bf16_native else "fp16" if cuda_fp16_only(device) else None
    by_precision = {}
    for kind in ("fp32", fast) if fast else ():
        one = replace(timed, bf16=kind == "bf16", fp16=kind == "fp16")
        engine_img_per_s(replace(one, max_steps=warmup), ds)  # warm up
        by_precision[kind] = statistics.median(engine_img_per_s(one, ds) for _ in range(3))
    folder = data.ensure_extracted(Path(ds.extras["archive"]), ds.extras["root_name"])
    baseline = baseline_img_per_s(base, folder, device, steps, warmup, workers)
    # invariant Adam's micro-batches: a backward per micro-batch against one torch.func pass
    micro = replace(
        timed,
        optimizer="invariant-adamw",
        norm="layer",
        lr=1e-3,
        micro_batch=max(1, base.batch // 8),
        max_steps=max(10, steps // 3) + 1,
    )
    micro_rates = {}
    for vm in (False, True):
        engine_img_per_s(replace(micro, micro_vmap=vm, max_steps=3), ds)  # warm up
        micro_rates[vm] = engine_img_per_s(replace(micro, micro_vmap=vm), ds)
    short = replace(timed, max_steps=max(20, steps // 2) + 1)
    # lesson 3: LAMB with its trust ratios recorded, against AdamW on the same model
    by_optimizer = {}
    # and AdamW's fused step (use_fused, the default on CUDA and CPU) against torch's default
    for opt_name, extra in (
        ("adamw", {}),
        ("lamb", dict(callbacks=(TrustRatios(),))),
        ("adamw-unfused", dict(fused=False)),
    ):
        one = replace(short, optimizer=opt_name.removesuffix("-unfused"), lr=1e-3, **extra)
        engine_img_per_s(replace(one, max_steps=warmup), ds)  # warm up
        by_optimizer[opt_name] = engine_img_per_s(one, ds)
    # the main thread has trained above, so it holds OpenMP worker threads of its own
    thread_as_is = in_thread(engine_img_per_s, short, ds)
    freed = free_openmp_threads()
    thread_freed = in_thread(engine_img_per_s, short, ds)
    malloc = (
        malloc_effect(short, name, profile.size, n_train, n_val)
        if device.type == "cpu"
        else dict.fromkeys(MALLOC_FIELDS)
    )
    first = first_point_s(base, ds)
    cold = cold_first_points(profile.name, name, n_train, n_val)
    t0 = time.perf_counter()
    records = list(train(base, dataset=ds))
    lesson_s = time.perf_counter() - t0
    sweep = {f"lr x{m:g}": replace(base, lr=base.lr * m) for m in (0.5, 1, 2, 4)}
    sweep_s = {}
    for together in (False, True):
        t0 = time.perf_counter()
        for _ in train_many(sweep, datasets=dict.fromkeys(sweep, ds), concurrent=together):
            pass
        sweep_s[together] = time.perf_counter() - t0
    evals = [r for r in records if r.kind == "eval"]
    extra = {"candidates": candidate_runs(base, ds, steps, baseline)} if candidates else {}
    return {
        "profile": profile.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "dataset": ds.name,
        "notice": notice or ds.notice,
        "n_train": ds.n_train,
        "size": profile.size,
        "batch": base.batch,
        "steps": steps,
        "workers": workers,
        "precision": resolve(base, device).precision,
        "engine_img_per_s": round(engine, 1),
        "baseline_img_per_s": round(baseline, 1),
        "speedup": round(engine / baseline, 2),
        "bare_img_per_s": round(bare, 1),
        "engine_over_bare": round(engine / bare, 3),
        "ceiling_speedup": round(bare / baseline, 2),
        "native_bf16": bf16_native,
        **{
            f"engine_{kind}_img_per_s": round(by_precision[kind], 1)
            if kind in by_precision
            else None
            for kind in ("fp32", "bf16", "fp16")
        },
        **{
            f"{kind}_speedup": round(by_precision[kind] / by_precision["fp32"], 2)
            if kind in by_precision
            else None
            for kind in ("bf16", "fp16")
        },
        "micro_loop_img_per_s": round(micro_rates[False], 1),
        "micro_vmap_img_per_s": round(micro_rates[True], 1),
        "micro_vmap_speedup": round(micro_rates[True] / micro_rates[False], 2),
        "adamw_img_per_s": round(by_optimizer["adamw"], 1),
        "lamb_img_per_s": round(by_optimizer["lamb"], 1),
        "lamb_over_adamw": round(by_optimizer["lamb"] / by_optimizer["adamw"], 2),
        "adamw_fused": use_fused(short, torch.optim.AdamW, device),
        "adamw_unfused_img_per_s": round(by_optimizer["adamw-unfused"], 1),
        "fused_adamw_speedup": round(by_optimizer["adamw"] / by_optimizer["adamw-unfused"], 2),
        "thread_img_per_s": round(thread_as_is, 1),
        "thread_freed_img_per_s": round(thread_freed, 1),
        "thread_openmp_freed": freed,
        "thread_speedup": round(thread_freed / thread_as_is, 2),
        **malloc,
        "first_point_s": round(first, 4),
        **cold,
        "lesson_run_s": round(lesson_s, 2),
        "lesson_epochs": base.epochs,
        "lesson_val_acc": round(evals[-1].val_acc, 4) if evals else None,
        "sweep_runs": len(sweep),
        "sweep_sequential_s": round(sweep_s[False], 2),
        "sweep_concurrent_s": round(sweep_s[True], 2),
        "sweep_sequential_over_one_run": round(sweep_s[False] / lesson_s, 2),
        "sweep_concurrent_over_one_run": round(sweep_s[True] / lesson_s, 2),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="gpu | cpu | ci (default: auto)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per pipeline")
    parser.add_argument("--workers", type=int, default=None, help="baseline loader workers")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="also time cheaper models and larger batches than the profile's",
    )
    args = parser.parse_args(argv)
    result = run_bench(
        args.profile, args.steps, args.workers, progress=not args.json, candidates=args.candidates
    )
    if args.json:
        print(json.dumps(result))
        return 0
    rows = result.pop("candidates", [])
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if rows:
        print("candidates:")
        print("  " + "  ".join(f"{k:>15}" for k in rows[0]))
        for row in rows:
            print("  " + "  ".join(f"{v!s:>15}" for v in row.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
