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
- reduce_*: invariant Adam's reduction across processes (the sums of g and g^2 and the count,
  one all_reduce) against data-parallel Adam's gradient all-reduce, on the profile's model in
  2 gloo processes on the CPU (lessons.fresh_process.reduction_cost): bytes and milliseconds a
  step, and their ratios (twice the bytes, by design);
- sweep_*: a 4-run sweep (learning rates 0.5x, 1x, 2x, 4x the default) one run after the other
  against the four side by side (lessons.sweep.train_many: a thread per run, on CUDA a stream
  per run), each as a multiple of one run.

``--candidates`` adds ``candidates``: for cheaper models and larger batches than the profile's
(stem stride 1 or 2, the profile's width or half of it, its batch, 2x and 4x with the learning
rate scaled linearly, lessons.scaling's "sgd-linear" rule), the model alone (bare img/s and its
ratio to the same run's baseline) and one default-length run (seconds, val accuracy): what it
would take to reach a speedup of 20 on a GPU, and what each choice costs in accuracy.

The measurements themselves live in lessons.throughput (in this process) and
lessons.fresh_process (each in a new process); this module sequences them and prints them.

Where Imagenette cannot be had, the bench uses the generated data set at Imagenette's size
(9,469 train / 3,925 val images of 160 px) and says so in its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from lessons import data, imagenette
from lessons.callbacks import TrustRatios
from lessons.compute import cuda_fp16_only, native_bf16, resolve, use_fused
from lessons.config import TrainConfig
from lessons.fresh_process import (
    MALLOC_FIELDS,
    cold_first_points,
    malloc_effect,
    reduction_cost,
)
from lessons.profiles import Profile, get_profile, pick_device
from lessons.sweep import train_many
from lessons.throughput import (
    bare_img_per_s,
    baseline_img_per_s,
    candidate_runs,
    engine_img_per_s,
    first_point_s,
    in_thread,
)
from lessons.train import train
from lessons.tuning import free_openmp_threads

WARMUP = 5  # untimed steps before a timing


def bench_data(profile: Profile, device: torch.device, progress: bool):
    """The profile's data on the device: Imagenette where it can be had, else the generated
    set at Imagenette's size. Returns the data set, data.load's (name, n_train, n_val) for it,
    and a notice that says which (None for the profile's own)."""
    source = (profile.dataset, profile.n_train, profile.n_val)
    try:
        ds = data.load(
            source[0],
            profile.size,
            device,
            n_train=source[1],
            n_val=source[2],
            fallback=False,
            progress=progress,
        )
        return ds, source, None
    except data.DatasetUnavailable:
        counts = imagenette.IMAGENETTE_COUNTS
        source = ("shapes", counts["train"], counts["val"])
        notice = (
            "Imagenette unavailable: measured on the generated data set at Imagenette's "
            f"size ({source[1]:,} train / {source[2]:,} val images, 160 px archive)"
        )
        ds = data.load(
            source[0], profile.size, device, n_train=source[1], n_val=source[2], progress=progress
        )
        return ds, source, notice


def _median_rate(config: TrainConfig, ds, warmup: int = WARMUP, repeats: int = 3) -> float:
    """The engine's median images per second over ``repeats`` timed runs, after an untimed
    run of ``warmup`` steps."""
    engine_img_per_s(replace(config, max_steps=warmup), ds)
    return statistics.median(engine_img_per_s(config, ds) for _ in range(repeats))


def precision_rates(timed: TrainConfig, ds) -> dict:
    """float32 against the autocast this device computes faster: bf16 where it has bf16
    hardware, fp16 (loss-scaled) on a GPU with float16 tensor cores only."""
    device = ds.device
    fast = "bf16" if native_bf16(device) else "fp16" if cuda_fp16_only(device) else None
    rates = {}
    for kind in ("fp32", fast) if fast else ():
        rates[kind] = _median_rate(replace(timed, bf16=kind == "bf16", fp16=kind == "fp16"), ds)
    out = {"native_bf16": native_bf16(device)}
    for kind in ("fp32", "bf16", "fp16"):
        out[f"engine_{kind}_img_per_s"] = round(rates[kind], 1) if kind in rates else None
    for kind in ("bf16", "fp16"):
        speedup = rates[kind] / rates["fp32"] if kind in rates else None
        out[f"{kind}_speedup"] = round(speedup, 2) if speedup else None
    return out


def micro_batch_rates(timed: TrainConfig, ds, steps: int) -> dict:
    """Invariant Adam's micro-batches: a backward per micro-batch against one torch.func pass."""
    micro = replace(
        timed,
        optimizer="invariant-adamw",
        norm="layer",
        lr=1e-3,
        micro_batch=max(1, timed.batch // 8),
        max_steps=max(10, steps // 3) + 1,
    )
    rates = {}
    for vm in (False, True):
        engine_img_per_s(replace(micro, micro_vmap=vm, max_steps=3), ds)  # warm up
        rates[vm] = engine_img_per_s(replace(micro, micro_vmap=vm), ds)
    return {
        "micro_loop_img_per_s": round(rates[False], 1),
        "micro_vmap_img_per_s": round(rates[True], 1),
        "micro_vmap_speedup": round(rates[True] / rates[False], 2),
    }


def optimizer_rates(short: TrainConfig, ds) -> dict:
    """LAMB with its trust ratios recorded (as lesson 3 trains it) against AdamW, and AdamW's
    fused step against torch's default."""
    rates = {}
    for opt_name, extra in (
        ("adamw", {}),
        ("lamb", dict(callbacks=(TrustRatios(),))),
        ("adamw-unfused", dict(fused=False)),
    ):
        one = replace(short, optimizer=opt_name.removesuffix("-unfused"), lr=1e-3, **extra)
        engine_img_per_s(replace(one, max_steps=WARMUP), ds)  # warm up
        rates[opt_name] = engine_img_per_s(one, ds)
    return {
        "adamw_img_per_s": round(rates["adamw"], 1),
        "lamb_img_per_s": round(rates["lamb"], 1),
        "lamb_over_adamw": round(rates["lamb"] / rates["adamw"], 2),
        "adamw_fused": use_fused(short, torch.optim.AdamW, ds.device),
        "adamw_unfused_img_per_s": round(rates["adamw-unfused"], 1),
        "fused_adamw_speedup": round(rates["adamw"] / rates["adamw-unfused"], 2),
    }


def thread_rates(short: TrainConfig, ds) -> dict:
    """The engine in a worker thread, as a widget runs it, after torch work on the main thread:
    as is, and after freeing the main thread's OpenMP workers."""
    as_is = in_thread(engine_img_per_s, short, ds)
    freed = free_openmp_threads()
    after = in_thread(engine_img_per_s, short, ds)
    return {
        "thread_img_per_s": round(as_is, 1),
        "thread_freed_img_per_s": round(after, 1),
        "thread_openmp_freed": freed,
        "thread_speedup": round(after / as_is, 2),
    }


def lesson_and_sweep(base: TrainConfig, ds) -> dict:
    """One default run of the profile, and a 4-run learning-rate sweep one run after the
    other and side by side, each as a multiple of the one run."""
    t0 = time.perf_counter()
    records = list(train(base, dataset=ds))
    lesson_s = time.perf_counter() - t0
    evals = [r for r in records if r.kind == "eval"]
    sweep = {f"lr x{m:g}": replace(base, lr=base.lr * m) for m in (0.5, 1, 2, 4)}
    sweep_s = {}
    for together in (False, True):
        t0 = time.perf_counter()
        for _ in train_many(sweep, datasets=dict.fromkeys(sweep, ds), concurrent=together):
            pass
        sweep_s[together] = time.perf_counter() - t0
    return {
        "lesson_run_s": round(lesson_s, 2),
        "lesson_epochs": base.epochs,
        "lesson_val_acc": round(evals[-1].val_acc, 4) if evals else None,
        "sweep_runs": len(sweep),
        "sweep_sequential_s": round(sweep_s[False], 2),
        "sweep_concurrent_s": round(sweep_s[True], 2),
        "sweep_sequential_over_one_run": round(sweep_s[False] / lesson_s, 2),
        "sweep_concurrent_over_one_run": round(sweep_s[True] / lesson_s, 2),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def run_bench(
    profile_name: str | None = None,
    steps: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    candidates: bool = False,
) -> dict:
    """Every measurement of the module docstring, on the profile's data; one flat dict."""
    profile = get_profile(profile_name)
    device = pick_device()
    ds, (name, n_train, n_val), notice = bench_data(profile, device, progress)
    base = TrainConfig.from_profile(profile.name, dataset=name, n_train=n_train, n_val=n_val)
    steps = steps or min(300, max(50, 3 * (ds.n_train // base.batch)))
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    # as many epochs as it takes: max_steps ends the timed run
    timed = replace(base, evaluate=False, max_steps=steps + 1, epochs=10_000)
    short = replace(timed, max_steps=max(20, steps // 2) + 1)

    engine = _median_rate(timed, ds, warmup=4 * WARMUP)  # the first run warms the device too
    bare = statistics.median(bare_img_per_s(timed, ds, steps) for _ in range(3))
    by_precision = precision_rates(timed, ds)
    folder = data.ensure_extracted(Path(ds.extras["archive"]), ds.extras["root_name"])
    baseline = baseline_img_per_s(base, folder, device, steps, WARMUP, workers)
    result = {
        "profile": profile.name,
        "device": str(device),
        "device_name": _device_name(device),
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
        **by_precision,
        **micro_batch_rates(timed, ds, steps),
        **optimizer_rates(short, ds),
        # the main thread has trained above, so it holds OpenMP worker threads of its own
        **thread_rates(short, ds),
    }
    if device.type == "cpu":
        result.update(malloc_effect(short, name, profile.size, n_train, n_val))
    else:
        result.update(dict.fromkeys(MALLOC_FIELDS))
    result["first_point_s"] = round(first_point_s(base, ds), 4)
    result.update(cold_first_points(profile.name, name, n_train, n_val))
    result.update(reduction_cost(profile.name))
    result.update(lesson_and_sweep(base, ds))
    if candidates:
        result["candidates"] = candidate_runs(base, ds, steps, baseline)
    return result


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
