"""Invariant Adam across processes: 2 gloo ranks on 127.0.0.1 against one process on the same
samples, standard data parallelism against it, the torchrun runner, and its faults."""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lessons import distributed as D
from lessons.optim import InvariantAdamW
from tests.conftest import ci

LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo0" if sys.platform == "darwin" else "lo"}
TIMEOUT = 240  # seconds any spawned process may take before the test fails (no hang)
RANK_TIMEOUT = datetime.timedelta(seconds=60)  # a lost rank ends the others' collectives
COUNTS = (3, 1)  # micro-batches on rank 0 and rank 1


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A step's 4 micro-batches (float64), the same in every process."""
    g = torch.Generator().manual_seed(step)
    return [
        (
            torch.randn(5, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=g),
        )
        for _ in range(sum(COUNTS))
    ]


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return net.double()


def steps(model, opt, mine, n_steps: int = 4, average=None, inf_at: int | None = None):
    """``n_steps`` steps on micro-batches ``mine`` of each; ``average``: standard data-parallel
    AdamW (each rank's mean gradient, averaged across ranks); ``inf_at``: a step whose first
    micro-batch here gets an inf gradient."""
    for step in range(n_steps):
        batch = micro_batches(step)
        for j in mine:
            x, y = batch[j]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            (loss / len(mine) if average else loss).backward()
            if inf_at == step and j == mine[0]:
                next(model.parameters()).grad[0, 0] = float("inf")
            if not average:
                opt.accumulate()
        if average:
            for p in model.parameters():
                average(p.grad)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _optimizer_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=RANK_TIMEOUT,
    )
    mine = list(range(sum(COUNTS[:rank]), sum(COUNTS[: rank + 1])))
    found = {}
    model = tiny_model()
    opt = InvariantAdamW(model.parameters(), lr=0.05, process_group=dist.group.WORLD)
    found["invariant"] = steps(model, opt, mine)
    model = tiny_model()

    def average(grad):
        dist.all_reduce(grad)
        grad /= world

    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-2)
    found["data_parallel"] = steps(model, opt, mine, average=average)
    model = tiny_model()
    opt = InvariantAdamW(
        model.parameters(), lr=0.05, process_group=dist.group.WORLD, skip_nonfinite=True
    )
    found["skipped"] = steps(model, opt, mine, n_steps=2, inf_at=0 if rank == 1 else None)
    found["skipped_steps"] = opt.skipped_steps
    torch.save(found, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown, as lessons.distributed's __main__


def spawn(fn, tmp_path, *args) -> list[dict]:
    ctx = mp.start_processes(
        fn, args=(2, str(tmp_path / "store"), str(tmp_path), *args), nprocs=2, join=False
    )
    deadline = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish in time")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_with_unequal_micro_batches_take_the_one_process_step(tmp_path):
    ranks = spawn(_optimizer_worker, tmp_path)
    model = tiny_model()
    one = steps(model, InvariantAdamW(model.parameters(), lr=0.05), range(sum(COUNTS)))
    for r in ranks:  # the same step on both ranks: the one-process step, to float64 round-off
        for p, q in zip(r["invariant"], one):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # standard AdamW with the ranks' gradients averaged takes another path
    gap = max(float((p - q).abs().max()) for p, q in zip(ranks[0]["data_parallel"], one))
    assert gap > 1e-3, gap
    # an inf on rank 1 only: both ranks skip that step and take the next alike
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    for p, q in zip(*(r["skipped"] for r in ranks)):
        assert torch.equal(p, q)


def test_a_group_of_one_rank_is_bit_for_bit_no_group(tmp_path):
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        found = []
        for group in (None, dist.group.WORLD):
            model = tiny_model()
            opt = InvariantAdamW(model.parameters(), lr=0.05, process_group=group)
            found.append(steps(model, opt, range(sum(COUNTS))))
    finally:
        dist.destroy_process_group()
    for p, q in zip(*found):
        assert torch.equal(p, q)


def _engine_worker(rank: int, world: int, store: str, out: str, reduce: bool) -> None:
    if not reduce:  # the reduction taken out: each rank steps on its own micro-batches
        InvariantAdamW._reduced_count = lambda self: self.micro_batches
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=RANK_TIMEOUT,
    )
    share = D.train_share(engine_config(), rank, world, dist.group.WORLD)
    result = D.summary(share, world, 0.0)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


def engine_config():
    return ci(optimizer="invariant-adamw", lr=1e-3, micro_batch=16, max_steps=6, epochs=1)


@pytest.mark.parametrize("reduce", [True, False])
def test_the_engine_on_two_ranks_is_the_one_process_run_and_the_check_sees_it(tmp_path, reduce):
    """lessons.distributed.assert_same_run, the lesson's self-check, passes on two ranks of the
    engine against one process on the same samples, and fails with the reduction taken out."""
    ranks = spawn(_engine_worker, tmp_path, reduce)
    one = D.summary(D.train_share(engine_config()), 1, 0.0)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    if reduce:
        D.assert_same_run(ranks[0], one)
        assert ranks[0]["v_hat"] == ranks[1]["v_hat"]
    else:
        with pytest.raises(AssertionError, match="part|v-hat"):
            D.assert_same_run(ranks[0], one)


def test_the_runner_under_torchrun_trains_both_optimizers_and_reports_on_rank_0(tmp_path):
    for name in ("invariant-adamw", "adamw"):
        out = tmp_path / f"{name}.json"
        args = ["--profile", "ci", "--optimizer", name, "--steps", "3", "--json", str(out)]
        done = D.launch(2, args, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("trained") == 1, done.stdout  # rank 0 only
        result = json.loads(out.read_text())
        assert result["world"] == 2 and result["backend"] == "gloo" and result["steps"] == 3
        assert result["optimizer"] == name and result["per_rank"] == result["batch"] // 2


def rank_process(rank: int, store, code: str | None = None, *args: str):
    env = {**os.environ, **LOOPBACK, "RANK": str(rank), "WORLD_SIZE": "2"}
    env |= {"LOCAL_RANK": str(rank), "LESSONS_DIST_STORE": str(store), "OMP_NUM_THREADS": "1"}
    cmd = ["-c", code] if code else ["-m", "lessons.distributed", *args]
    return subprocess.Popen(
        [sys.executable, *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_rank_that_dies_or_never_joins_ends_the_run_with_a_message(tmp_path):
    dies = "from lessons.distributed import join; import os; join(1, 2, 0, 10); os._exit(3)"
    args = ("--profile", "ci", "--steps", "50", "--timeout", "10")
    for store, partner in ((tmp_path / "a", dies), (tmp_path / "b", None)):
        t0 = time.monotonic()
        ranks = [rank_process(0, store, None, *args)]
        if partner:
            ranks.append(rank_process(1, store, partner))
        outs = [p.communicate(timeout=TIMEOUT) for p in ranks]
        assert ranks[0].returncode == 1, outs[0]
        assert "rank 0 of 2 stopped: another rank died or did not join within 10 s" in outs[0][1]
        print(f"ended after {time.monotonic() - t0:.1f} s")  # the 10 s timeout and start-up


def test_a_batch_the_ranks_cannot_split_is_refused_with_what_to_change(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.main(["--profile", "ci", "--batch", "60", "--micro-batch", "16"]) == 2
    err = capsys.readouterr().err
    assert "a batch of 60 does not split into 2 ranks x micro-batches of 16" in err
    assert "multiple of 32" in err
    with pytest.raises(ValueError, match="multiple of 3 "):
        D.check_split(64, 3, None)


# /proc/net/tcp{,6} addresses of 127.0.0.1 and ::1 (IPv4 bytes little-endian, as the kernel
# prints them)
LOOPBACK_HEX = ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")


def process_tree(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        found = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree, grew = tree | found, bool(found)
    return tree


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp prints them) of the sockets these processes
    listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.add(cols[1].split(":")[0])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_a_launched_run_listens_on_the_loopback_address_only(tmp_path):
    env = {**os.environ, **D.loopback_env(2), "LESSONS_DIST_STORE": str(tmp_path / "store")}
    cmd = D.torchrun_command(2, ["--profile", "ci", "--steps", "30"], tmp_path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = set(), time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= listening_addresses(process_tree(proc.pid))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == 0
    assert seen, "no listening socket seen: gloo listens on every rank while it runs"
    assert seen <= set(LOOPBACK_HEX), seen
