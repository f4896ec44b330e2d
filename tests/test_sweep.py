"""Several runs at once: lessons.sweep.train_many."""

import threading

import pytest
import torch

from lessons import sweep as S
from lessons import train as T
from lessons.config import Metrics
from lessons.train import run
from tests.conftest import ci


def test_train_many_side_by_side_gives_each_run_its_own_records(shapes_ci):

    configs = {f"b{b}": ci(batch=b, lr=0.05 * b / 64, epochs=1) for b in (32, 128)}
    datasets = dict.fromkeys(configs, shapes_ci)
    got = {k: [] for k in configs}
    order = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two runs side by side: one OpenMP thread each
    try:
        for name, rec in S.train_many(configs, datasets=datasets, concurrent=True):
            got[name].append(rec)
            order.append(name)
        assert torch.get_num_threads() == 2  # the caller's own count is left as it was
        torch.set_num_threads(1)  # float sums depend on how many threads share them
        for name, c in configs.items():
            alone = run(c, dataset=shapes_ci)
            assert [(r.kind, r.step, r.loss) for r in got[name]] == [
                (r.kind, r.step, r.loss) for r in alone
            ]
    finally:
        torch.set_num_threads(threads)
    # interleaved: the small-batch run had records after the large-batch run began
    assert order.index("b128") < len(order) - 1 - order[::-1].index("b32")
    sequential = [n for n, _ in S.train_many(configs, datasets=datasets, concurrent=False)]
    assert sequential == sorted(sequential, key=list(configs).index)  # one after the other

    stop = threading.Event()
    seen = {k: 0 for k in configs}
    long = {k: ci(batch=c.batch, epochs=50) for k, c in configs.items()}
    for name, rec in S.train_many(long, stop, datasets, concurrent=True):
        seen[name] += rec.kind == "train"
        if min(seen.values()) >= 3:
            stop.set()
    assert max(seen.values()) < 200  # both ended within a few steps of the stop
    assert not [t for t in threading.enumerate() if t.name.startswith("train-")]


def test_train_many_gives_each_cpu_run_its_share_of_the_threads(shapes_ci, monkeypatch):
    """Four runs on a CPU each train with a quarter of the caller's OpenMP threads: with a
    team of the caller's size each, a bf16 sweep on 2 cores took 5 - 14x as long as one run
    after the other."""

    seen = {}

    def fake_train(c, stop=None, dataset=None):
        seen[c.seed] = torch.get_num_threads()
        yield Metrics(1, c.batch, 1.0, 1.0, c.lr, c.batch)

    monkeypatch.setattr(T, "train", fake_train)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        configs = {f"s{i}": ci(seed=i) for i in range(4)}
        list(S.train_many(configs, datasets=dict.fromkeys(configs, shapes_ci), concurrent=True))
        assert seen == {0: 2, 1: 2, 2: 2, 3: 2} and torch.get_num_threads() == 8
        list(S.train_many(configs, datasets=dict.fromkeys(configs, shapes_ci), concurrent=False))
        assert seen == {0: 8, 1: 8, 2: 8, 3: 8}  # one after the other: all of them
    finally:
        torch.set_num_threads(threads)


def test_train_many_raises_a_runs_error_and_stops_the_others(shapes_ci):

    configs = {"fine": ci(epochs=50), "bad": ci(batch=10**6)}  # larger than the data set
    with pytest.raises(ValueError, match="larger than"):
        for _ in S.train_many(configs, datasets=dict.fromkeys(configs, shapes_ci), concurrent=True):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("train-")]


def test_concurrent_by_default_only_on_cuda(monkeypatch):

    monkeypatch.delenv("LESSONS_CONCURRENT", raising=False)
    assert S.concurrent_by_default(torch.device("cuda")) is True
    assert S.concurrent_by_default(torch.device("cpu")) is False
    monkeypatch.setenv("LESSONS_CONCURRENT", "1")
    assert S.concurrent_by_default(torch.device("cpu")) is True
    monkeypatch.setenv("LESSONS_CONCURRENT", "0")
    assert S.concurrent_by_default(torch.device("cuda")) is False


def test_train_many_frees_openmp_threads_before_its_threads_train(shapes_ci, monkeypatch):
    calls = []
    monkeypatch.setattr(S, "free_openmp_threads", lambda: calls.append(1) or True)
    configs = {f"b{b}": ci(batch=b, epochs=0.1) for b in (32, 64)}
    datasets = dict.fromkeys(configs, shapes_ci)
    list(S.train_many(configs, datasets=datasets, concurrent=False))
    assert calls == []  # one after the other, in this thread: nothing to free
    list(S.train_many(configs, datasets=datasets, concurrent=True))
    assert calls == [1]
