"""Bench measurements that need a fresh Python process: malloc's settings cannot be undone in
this one, a first run's lazy imports happen once per process, and a process group needs
processes of its own."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from lessons import data
from lessons.config import TrainConfig
from lessons.profiles import pick_device
from lessons.throughput import engine_img_per_s, first_point_s, in_thread
from lessons.tuning import MALLOC_TUNABLES, free_openmp_threads
from lessons.warmup import warm_up


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
    code = f"from lessons.fresh_process import _engine_child as f; f(*{args!r})"
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
        code = (
            f"from lessons.fresh_process import _first_point_child; _first_point_child(*{args!r})"
        )
        out[key] = round(_child_json(code, "first-point measurement")["first_point_s"], 4)
    return out


def _reduction_child(rank: int, world: int, store: str, profile_name: str, reps: int) -> None:
    """One of ``world`` gloo ranks in a fresh process (see reduction_cost): time invariant
    Adam's reduction of a step (the sums of g and g^2 and the count, InvariantAdamW with a
    process group) against data-parallel Adam's (the gradients flattened, all-reduced and
    copied back, as DDP's buckets do) on the profile's model; rank 0 prints one JSON line."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from lessons.optim import InvariantAdamW

    store = dist.FileStore(store, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    params = list(TrainConfig.from_profile(profile_name).model(10).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = InvariantAdamW(params, process_group=dist.group.WORLD)
    opt.accumulate()  # the sums exist; each timed reduction adds them up again in place
    grads = [torch.randn_like(p) for p in params]

    def adam() -> None:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))

    out = {"numel": sum(p.numel() for p in params)}
    for name, fn in (("invariant", opt._reduced_count), ("adam", adam)):
        times = []
        for _ in range(reps + 3):  # 3 untimed
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1000 * statistics.median(times[3:])
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: see lessons.distributed's __main__


def reduction_cost(profile_name: str, world: int = 2, reps: int = 30) -> dict:
    """Bytes and time a step of invariant Adam's reduction against data-parallel Adam's
    gradient all-reduce: ``world`` gloo processes on this machine's CPU, loopback only."""
    with tempfile.TemporaryDirectory(prefix="lessons-reduce-") as tmp:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo0" if sys.platform == "darwin" else "lo"}
        env |= {"OMP_NUM_THREADS": "1", "LESSONS_DEVICE": "cpu"}
        procs = []
        for rank in range(world):
            args = [rank, world, f"{tmp}/store", profile_name, reps]
            code = f"from lessons.fresh_process import _reduction_child as f; f(*{args!r})"
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outs = [p.communicate(timeout=300) for p in procs]
    if any(p.returncode != 0 for p in procs):
        errors = "\n".join(err for _, err in outs)
        raise RuntimeError(f"the reduction measurement's ranks failed:\n{errors}")
    r = json.loads(outs[0][0].strip().splitlines()[-1])
    invariant_bytes, adam_bytes = (2 * r["numel"] + 1) * 4, r["numel"] * 4  # float32
    return {
        "reduce_world": world,
        "reduce_invariant_bytes": invariant_bytes,
        "reduce_adam_bytes": adam_bytes,
        "reduce_bytes_ratio": round(invariant_bytes / adam_bytes, 3),
        "reduce_invariant_ms": round(r["invariant_ms"], 3),
        "reduce_adam_ms": round(r["adam_ms"], 3),
        "reduce_time_ratio": round(r["invariant_ms"] / r["adam_ms"], 2),
    }
