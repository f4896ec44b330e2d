import os
from pathlib import Path

import pytest

# every test runs on the generated data set unless it says otherwise
os.environ.setdefault("LESSONS_PROFILE", "ci")
os.environ.setdefault("LESSONS_DEVICE", "cpu")
if "LESSONS_DATA" not in os.environ:  # `make test` sets one; a bare pytest gets its own
    os.environ["LESSONS_DATA"] = str(Path(__file__).resolve().parent.parent / ".cache/test-data")

ROOT = Path(__file__).resolve().parent.parent


def ci(**kw):
    """The ci profile's TrainConfig on the CPU, with ``kw`` changed."""
    from lessons.config import TrainConfig

    return TrainConfig.from_profile("ci", device="cpu", **kw)


def losses(records) -> list[float]:
    """The training losses of a run's records."""
    return [r.loss for r in records if r.kind == "train"]


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty, private LESSONS_DATA, and no data set held in memory from earlier tests."""
    from lessons import data

    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("LESSONS_DATA", str(root))
    saved = dict(data._loaded)
    data._loaded.clear()
    yield root
    data._loaded.clear()
    data._loaded.update(saved)


@pytest.fixture(scope="session")
def shapes_ci():
    """The ci profile's data set on the CPU (built once into the shared test cache)."""
    from lessons import data
    from lessons.profiles import get_profile

    p = get_profile("ci")
    return data.load(p.dataset, p.size, "cpu", n_train=p.n_train, n_val=p.n_val, progress=False)


@pytest.fixture
def private_run_log(tmp_path, monkeypatch):
    """Widgets write their run log into this test's own folder."""
    monkeypatch.setenv("LESSONS_RUNS", str(tmp_path))


def top_level_ops(fn) -> int:
    """How many aten operations ``fn()`` issues itself (not those an operation calls inside):
    on a GPU each is at least one kernel launch, so the count is what an optimizer step costs
    in launches, measurable on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def ops_per_step(make_optimizer, n_tensors: int, micro_batches: int = 0) -> int:
    """top_level_ops of one step of ``make_optimizer(params)`` over ``n_tensors`` small
    parameters, after a first step has made its state: ``micro_batches`` accumulate() calls
    first where given, trust_ratios() after where the optimizer has it."""
    import torch

    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n_tensors)]
    grads = [torch.randn(4, 3) for _ in params]
    opt = make_optimizer(params)

    def step():
        for _ in range(max(1, micro_batches)):
            for p, g in zip(params, grads):
                p.grad = g
            if micro_batches:
                opt.accumulate()
        opt.step()
        if hasattr(opt, "trust_ratios"):
            opt.trust_ratios()

    step()
    return top_level_ops(step)
