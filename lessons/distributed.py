"""Data-parallel training across processes with torch.distributed: every rank takes its share of
every batch, and the ranks together take the step of one process that saw the whole batch.

    python -m lessons.distributed --launch 2 --optimizer invariant-adamw --micro-batch 16

trains the lesson's model on the profile's data in 2 processes (gloo on CPUs, NCCL on GPUs) and
prints, on rank 0, what it trained and the final losses. Every rank draws the same permutation
and the same augmentation of the whole batch from the run's seed and keeps its slice, so a run's
samples do not depend on the number of ranks. ``invariant-adamw`` accumulates the rank's
micro-batches and its optimizer sums g, g^2 and the counts across ranks at the step
(``InvariantAdamW(process_group=...)``, no DDP wrapper); any other optimizer is standard data
parallelism: the model in DDP, gradients averaged across ranks during backward.

Loopback only. ``torchrun --standalone`` (and torchrun with ``--master-addr 127.0.0.1`` or a
127.0.0.1 ``--rdzv-endpoint``) has its agent host a TCPStore, and torch's TCPStore listens on the
wildcard address whatever host it is given. So ``--launch`` (and ``launch()``, which the lesson
and the tests use) runs torchrun with a file rendezvous instead: ``--rdzv-backend=c10d
--rdzv-endpoint=FILE --rdzv-conf=store_type=file --local-addr=127.0.0.1`` and
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (no agent store), the ranks meet in a FileStore, and gloo
binds the loopback interface (GLOO_SOCKET_IFNAME). Under a plain ``torchrun --standalone
--nproc_per_node=N -m lessons.distributed ...`` the ranks join the agent's store instead.

A rank that dies or never joins ends the run on every other rank within ``--timeout`` seconds,
with a message; a batch the ranks and micro-batches cannot split evenly is refused up front.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lessons.config import TrainConfig
from lessons.optim import InvariantAdamW
from lessons.train import Run, evaluate, prepare_batch, setup, train_step


@dataclass
class Share:
    """What one rank trained: its run (model, optimizer) and its mean loss of every step."""

    run: Run
    losses: torch.Tensor


def check_split(batch: int, world: int, micro_batch: int | None) -> None:
    """ValueError, saying what to change, where ``world`` ranks (of micro-batches of
    ``micro_batch`` samples) cannot share ``batch`` evenly."""
    unit = world * (micro_batch or 1)
    if batch % unit:
        what = f"{world} ranks" + (f" x micro-batches of {micro_batch}" if micro_batch else "")
        fits = max(unit, batch // unit * unit)
        raise ValueError(
            f"a batch of {batch} does not split into {what}: choose a batch that is a multiple "
            f"of {unit} (such as {fits}), or another micro-batch or number of ranks"
        )


def train_share(c: TrainConfig, rank: int = 0, world: int = 1, group=None, dataset=None) -> Share:
    """Train run ``c`` as rank ``rank`` of ``world``: the engine's own samples (lessons.train),
    of which this rank keeps its slice of every batch. With ``world`` 1 and no group this is the
    one-process run on the same samples."""
    check_split(c.batch, world, c.micro_batch)
    run = setup(c, dataset)
    if group is not None:
        _join_replicas(run, group)
    gen = torch.Generator(device=run.dataset.device).manual_seed(c.seed)
    share, losses, step = c.batch // world, [], 0
    run.model.train()
    for ep in run.plan.epochs:
        perm = torch.randperm(run.dataset.n_train, generator=gen, device=run.dataset.device)
        for i in range(min(ep.steps, run.plan.total - step)):
            x, y = prepare_batch(run, perm[i * c.batch : (i + 1) * c.batch], gen)
            for g in run.opt.param_groups:
                g["lr"] = run.plan.lr(c, ep.epoch, step)
            mine = slice(rank * share, (rank + 1) * share)
            losses.append(train_step(run, x[mine], y[mine]).detach())
            step += 1
    return Share(run, torch.stack(losses).float())


def _join_replicas(run: Run, group) -> None:
    """Start every rank from rank 0's weights and tie the steps together: invariant Adam
    reduces its sums at the step; any other optimizer gets the model in DDP."""
    if isinstance(run.opt, InvariantAdamW):
        for t in [*run.model.parameters(), *run.model.buffers()]:
            dist.broadcast(t.data, src=dist.get_global_rank(group, 0), group=group)
        run.opt.process_group = group
        return
    device = run.compute.device
    ids = [device.index] if device.type == "cuda" else None
    run.model = torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=ids, process_group=group
    )


def v_hat_mean(opt: torch.optim.Optimizer) -> float:
    """Adam's bias-corrected second moment, averaged over every weight: what the step divides
    by, squared."""
    total = count = 0.0
    for group in opt.param_groups:
        b2 = group["betas"][1]
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "exp_avg_sq" in state:
                total += float(state["exp_avg_sq"].sum()) / (1 - b2 ** float(state["step"]))
                count += p.numel()
    return total / count


def rank_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def join(rank: int, world: int, local_rank: int, timeout_s: float):
    """Join the process group (NCCL with a GPU per rank, else gloo on the CPU); the group and
    this rank's device. The ranks meet in a FileStore (LESSONS_DIST_STORE, else one named
    after torchrun's run), or in torchrun's agent store where it shares one."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = os.environ.get("LESSONS_DEVICE", "cuda") != "cpu" and torch.cuda.is_available()
    cuda = cuda and torch.cuda.device_count() >= local_world  # NCCL: a GPU per rank
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if cuda else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = dist.FileStore(store_path(), world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return dist.group.WORLD, device


def store_path() -> str:
    if "LESSONS_DIST_STORE" in os.environ:
        return os.environ["LESSONS_DIST_STORE"]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    name = f"lessons-dist-{run_id}-{os.environ.get('MASTER_PORT', '0')}"
    return str(Path(tempfile.gettempdir()) / name)


def loopback_env(nproc: int) -> dict[str, str]:
    """The environment that keeps torchrun and gloo on the loopback interface."""
    return {
        "GLOO_SOCKET_IFNAME": "lo0" if sys.platform == "darwin" else "lo",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))
        ),
    }


def torchrun_command(nproc: int, args: list[str], folder: Path) -> list[str]:
    """torchrun on one node with a file rendezvous in ``folder``: no TCP store, loopback only."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={folder / 'rendezvous'}",
        "--rdzv-conf=store_type=file",
        f"--rdzv-id={folder.name}",
        "--local-addr=127.0.0.1",
        "-m",
        "lessons.distributed",
        *args,
    ]


def launch(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``lessons.distributed ARGS`` in ``nproc`` processes under torchrun, loopback only;
    the finished process with its output (text)."""
    with tempfile.TemporaryDirectory(prefix="lessons-dist-") as tmp:
        env = {**os.environ, **loopback_env(nproc), "LESSONS_DIST_STORE": f"{tmp}/store"}
        root = str(Path(__file__).resolve().parent.parent)  # where lessons is imported from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return subprocess.run(
            torchrun_command(nproc, args, Path(tmp)),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def summary(share: Share, world: int, seconds: float) -> dict:
    """The run as one JSON-able dict: the mean loss of every step over all ranks (one
    all_reduce), rank 0's validation loss and accuracy, and v-hat's mean."""
    losses = share.losses.clone()
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
    run = share.run
    model = getattr(run.model, "module", run.model)
    val_loss, val_acc = evaluate(model, run.dataset, run.compute)
    c = run.config
    return {
        "optimizer": c.optimizer,
        "world": world,
        "batch": c.batch,
        "per_rank": c.batch // world,
        "micro_batch": c.micro_batch,
        "lr": c.lr,
        "steps": len(losses),
        "device": str(run.compute.device),
        "backend": dist.get_backend() if world > 1 else None,
        "losses": losses.tolist(),
        "v_hat": v_hat_mean(run.opt),
        "val_loss": val_loss,
        "val_acc": val_acc,
        "seconds": round(seconds, 2),
    }


def assert_same_run(ranks: dict, one: dict, rel: float = 1e-4) -> None:
    """AssertionError unless two runs' summaries (``summary``) trained alike: the same loss at
    every step and the same mean v-hat, up to float32 round-off (ranks add their sums in
    another order than one process does)."""
    a, b = torch.tensor(ranks["losses"]), torch.tensor(one["losses"])
    assert a.shape == b.shape, f"{len(a)} steps against {len(b)}"
    gap = float((a - b).abs().max() / b.abs().max())
    assert gap < rel, f"the losses part: by up to {gap:.2g} of their size"
    v_gap = abs(ranks["v_hat"] / one["v_hat"] - 1)
    assert v_gap < rel, f"mean v-hat {ranks['v_hat']:.6g} against {one['v_hat']:.6g}"


def report(result: dict) -> str:
    r = result
    micro = f", micro-batches of {r['micro_batch']}" if r["micro_batch"] else ""
    tail = ", ".join(f"{x:.4f}" for x in r["losses"][-3:])
    return (
        f"trained {r['optimizer']} on {r['world']} rank(s) ({r['backend'] or 'one process'}, "
        f"{r['device']}): batch {r['batch']} = {r['world']} x {r['per_rank']}{micro}, "
        f"lr {r['lr']:g}, {r['steps']} steps in {r['seconds']} s\n"
        f"final train losses {tail}; val loss {r['val_loss']:.4f}, acc {r['val_acc']:.3f}; "
        f"mean v-hat {r['v_hat']:.4g}"
    )


def lost_message(rank: int, world: int, timeout_s: float, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (
        f"lessons.distributed: rank {rank} of {world} stopped: another rank died or did not "
        f"join within {timeout_s:g} s, so the run ends on every rank ({type(err).__name__}: "
        f"{first[:300]})"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launch", type=int, default=0, help="start N processes under torchrun")
    p.add_argument("--profile", default=None, help="gpu | cpu | ci (default: auto)")
    p.add_argument("--optimizer", default="invariant-adamw", help="invariant-adamw | adamw | ...")
    p.add_argument("--batch", type=int, default=None, help="samples a step, over all ranks")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per micro-batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--norm", default="batch", help="batch | layer | ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for a rank")
    p.add_argument("--json", default=None, help="rank 0 writes the result here")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace, world: int) -> TrainConfig:
    fields = dict(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay)
    fields |= dict(max_steps=args.steps, norm=args.norm, seed=args.seed, evaluate=False)
    fields |= {k: v for k, v in (("batch", args.batch), ("epochs", args.epochs)) if v}
    c = TrainConfig.from_profile(args.profile, **fields)
    if c.optimizer == "invariant-adamw":  # by default one micro-batch per rank
        c.micro_batch = args.micro_batch or max(1, c.batch // world)
    return c


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.launch:
        done = launch(args.launch, _without_launch(argv))
        print(done.stdout, end="")
        print(done.stderr, end="", file=sys.stderr)
        return done.returncode
    rank, world, local_rank = rank_env()
    c = config_from(args, world)
    try:
        check_split(c.batch, world, c.micro_batch)
    except ValueError as err:
        print(f"lessons.distributed: {err}", file=sys.stderr)
        return 2
    return _run(c, args, rank, world, local_rank)


def _without_launch(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if not skip and a != "--launch" and not a.startswith("--launch="):
            out.append(a)
        skip = a == "--launch"
    return out


def _run(c: TrainConfig, args, rank: int, world: int, local_rank: int) -> int:
    t0 = time.perf_counter()
    try:
        group, device = join(rank, world, local_rank, args.timeout)
        c.device = str(device)
        share = train_share(c, rank, world, group)
        result = summary(share, world, time.perf_counter() - t0)
    except (RuntimeError, TimeoutError) as err:  # torch.distributed's errors are RuntimeErrors
        print(lost_message(rank, world, args.timeout, err), file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        print(report(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the process group is destroyed and the results written: skip the interpreter's teardown,
    # where a collective library's thread still joinable at exit can abort a finished rank
    os._exit(code)
