"""Several runs at once: ``train_many`` trains configs side by side or one after the other."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator

import torch

from lessons import data as data_mod
from lessons import train as train_mod
from lessons.config import Metrics, TrainConfig
from lessons.profiles import pick_device
from lessons.tuning import free_openmp_threads


def concurrent_by_default(device: torch.device) -> bool:
    """Whether several runs should train side by side: on CUDA, where one small model leaves
    most of the GPU idle, unless LESSONS_CONCURRENT=0; elsewhere only with LESSONS_CONCURRENT=1
    (on a CPU the runs would only share the same cores)."""
    env = os.environ.get("LESSONS_CONCURRENT", "")
    if env:
        return env not in ("0", "false", "no")
    return device.type == "cuda"


def train_many(
    configs: dict[str, TrainConfig],
    stop: threading.Event | None = None,
    datasets: dict[str, data_mod.Dataset] | None = None,
    concurrent: bool | None = None,
) -> Iterator[tuple[str, Metrics]]:
    """Train several configs, yielding (name, record) as each arrives.

    Concurrently (``concurrent``; None: see concurrent_by_default): a thread per run, on CUDA
    each on a stream of its own so that their kernels overlap, and the records of different
    runs interleave. Otherwise one run after the other. Each run's records are the ones
    ``train`` gives on its own (with as many threads). ``stop`` ends every run within a step;
    closing the generator too."""
    stop = stop or threading.Event()
    datasets = datasets or {}
    if not configs:
        return
    if concurrent is None:
        first = next(iter(configs.values()))
        device = first.device or (datasets and next(iter(datasets.values())).device)
        concurrent = concurrent_by_default(torch.device(device) if device else pick_device())
    if not concurrent or len(configs) == 1:
        for name, c in configs.items():
            for rec in train_mod.train(c, stop, dataset=datasets.get(name)):
                yield name, rec
            if stop.is_set():
                return
        return
    yield from _side_by_side(configs, stop, datasets)


def _side_by_side(configs, stop, datasets) -> Iterator[tuple[str, Metrics]]:
    """A thread per run; on a CPU each computes with its share of the caller's OpenMP threads
    (torch's thread count is the calling thread's own, and teams of the caller's size each
    would fight over the same cores)."""
    out: queue.Queue = queue.Queue()
    done = object()
    free_openmp_threads()  # CPU steps in threads are slower otherwise (lessons.tuning)
    share = max(1, torch.get_num_threads() // len(configs))

    def worker(name: str, c: TrainConfig) -> None:
        try:
            ds = datasets.get(name)
            cuda = (ds.device.type if ds else torch.device(c.device or "cpu").type) == "cuda"
            if not cuda:
                torch.set_num_threads(share)
            ctx = torch.cuda.stream(torch.cuda.Stream()) if cuda else contextlib.nullcontext()
            with ctx:
                for rec in train_mod.train(c, stop, dataset=ds):
                    out.put((name, rec))
        except BaseException as e:  # handed to the consumer, raised there
            out.put((name, e))
        finally:
            out.put((name, done))

    threads = [
        threading.Thread(target=worker, args=(name, c), daemon=True, name=f"train-{name}")
        for name, c in configs.items()
    ]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            name, item = out.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield name, item
    finally:
        if running:  # closed early, or a run failed: the others stop too
            stop.set()
        for t in threads:
            t.join()
