"""How a run computes: bf16 and fp16 autocast, loss scaling, fused steps, warm-up."""

import math
import os
import sys

import pytest
import torch

from lessons import compute as C
from lessons import warmup
from lessons.callbacks import EpochEnd, TrustRatios
from lessons.config import TrainConfig
from lessons.models import INIT_LOCK
from lessons.optim import build_optimizer, param_groups
from lessons.train import run
from tests.conftest import ci, losses


def test_bf16_autocast_on_a_cpu_trains_repeats_and_says_so(shapes_ci):
    a = run(ci(epochs=3, bf16=True), dataset=shapes_ci)
    b = run(ci(epochs=3, bf16=True), dataset=shapes_ci)
    f = run(ci(epochs=3, bf16=False), dataset=shapes_ci)
    assert losses(a) == losses(b)  # repeatable bit for bit in bf16 too
    assert losses(a) != losses(f)  # the forward pass really ran in bf16
    # the same net from the same weights: the first losses differ only by bf16's rounding
    assert abs(losses(a)[0] - losses(f)[0]) < 0.05
    ls = losses(a)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.2
    assert a[-1].extras["precision"] == "bf16 autocast"
    assert f[-1].extras["precision"] == "float32"


def test_use_bf16_follows_the_setting_the_environment_the_device_and_the_profile(monkeypatch):

    monkeypatch.delenv("LESSONS_BF16", raising=False)
    cpu, cuda, mps = (torch.device(d) for d in ("cpu", "cuda", "mps"))
    on_cpu, on_ci = TrainConfig.from_profile("cpu"), TrainConfig.from_profile("ci")
    monkeypatch.setattr(C, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(C, "cuda_has_native_bf16", lambda device: True)
    assert C.use_bf16(on_cpu, cpu) and C.resolve(on_cpu, cpu).precision == "bf16 autocast"
    assert not C.use_bf16(on_ci, cpu)  # the tests see float32 numbers on every CPU
    assert not C.use_bf16(TrainConfig(), cpu)  # no profile: float32
    assert not C.use_bf16(TrainConfig.from_profile("cpu", bf16=False), cpu)
    assert C.use_bf16(on_ci, cuda) and not C.use_bf16(on_cpu, mps)
    monkeypatch.setattr(C, "cpu_has_native_bf16", lambda: False)
    assert not C.use_bf16(on_cpu, cpu) and C.resolve(on_cpu, cpu).precision == "float32"
    assert C.use_bf16(TrainConfig.from_profile("ci", bf16=True), cpu)  # asked for: emulated
    monkeypatch.setenv("LESSONS_BF16", "1")
    assert C.use_bf16(on_ci, cpu)
    monkeypatch.setenv("LESSONS_BF16", "0")
    assert not C.use_bf16(on_ci, cuda)
    assert C.use_bf16(TrainConfig.from_profile("ci", bf16=True), cuda)  # the setting wins
    # a GPU that only emulates bf16 (Colab's T4) does not train in bf16 unless asked to
    monkeypatch.delenv("LESSONS_BF16")
    monkeypatch.setattr(C, "cuda_has_native_bf16", lambda device: False)
    assert not C.use_bf16(on_ci, cuda)
    assert C.use_bf16(TrainConfig.from_profile("ci", bf16=True), cuda)
    assert not C.use_bf16(TrainConfig.from_profile("ci", fp16=True), cuda)  # asked for fp16


@pytest.mark.parametrize(
    "capability, dtype",
    [
        ((6, 1), None),  # a P100 or GTX 10xx: no tensor cores
        ((7, 0), torch.float16),  # V100
        ((7, 5), torch.float16),  # T4, RTX 20xx
        ((8, 0), torch.bfloat16),  # A100
        ((9, 0), torch.bfloat16),  # H100
    ],
)
def test_gpus_with_float16_tensor_cores_and_no_bf16_train_in_loss_scaled_fp16(
    monkeypatch, capability, dtype
):

    for var in ("LESSONS_BF16", "LESSONS_FP16"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gpu = TrainConfig.from_profile("gpu")
    assert C.autocast_dtype(gpu, cuda) == dtype
    words = {None: "float32", torch.float16: "fp16 autocast, loss scaling"}
    assert C.resolve(gpu, cuda).precision == words.get(dtype, "bf16 autocast")
    # the settings win over the device: no bf16 on an H100 means float32, not fp16
    assert C.autocast_dtype(TrainConfig.from_profile("gpu", bf16=False), cuda) in (
        None,
        torch.float16 if dtype == torch.float16 else None,
    )
    assert C.autocast_dtype(TrainConfig.from_profile("gpu", fp16=True), cuda) == torch.float16
    assert C.autocast_dtype(TrainConfig.from_profile("gpu", fp16=False), cuda) == (
        None if dtype == torch.float16 else dtype
    )
    monkeypatch.setenv("LESSONS_FP16", "0")
    assert C.autocast_dtype(gpu, cuda) == (None if dtype == torch.float16 else dtype)
    monkeypatch.setenv("LESSONS_FP16", "1")  # forced: on any device, unless bf16 is used
    assert C.autocast_dtype(TrainConfig.from_profile("ci"), cpu) == torch.float16
    assert C.autocast_dtype(gpu, cuda) == (dtype if dtype == torch.bfloat16 else torch.float16)
    monkeypatch.setenv("LESSONS_BF16", "1")  # both asked for by the environment: bf16
    assert C.autocast_dtype(gpu, cuda) == torch.bfloat16
    monkeypatch.delenv("LESSONS_FP16")
    monkeypatch.delenv("LESSONS_BF16")
    assert C.autocast_dtype(TrainConfig.from_profile("ci"), cpu) is None  # no GPU: float32


def test_fp16_autocast_with_loss_scaling_trains_repeats_and_says_so(shapes_ci):
    a = run(ci(epochs=3, fp16=True), dataset=shapes_ci)
    b = run(ci(epochs=3, fp16=True), dataset=shapes_ci)
    f = run(ci(epochs=3), dataset=shapes_ci)
    assert losses(a) == losses(b)  # repeatable bit for bit
    assert losses(a) != losses(f)  # the forward pass really ran in float16
    assert abs(losses(a)[0] - losses(f)[0]) < 0.01  # float16's rounding, from the same weights
    ls = losses(a)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.2
    assert a[-1].extras["precision"] == "fp16 autocast, loss scaling"
    # a healthy run overflows seldom, if ever (a step skipped, the scale halved, each time):
    # none with 2 threads, one with 1 here; torch's GradScaler starts at 2**16
    assert 2.0**12 <= a[-1].extras["loss_scale"] <= 2.0**16
    assert "loss_scale" not in f[-1].extras
    evals = [r for r in a if r.kind == "eval"]
    assert all(math.isfinite(r.val_loss) for r in evals) and evals[-1].val_acc > 0.15


FP16_RUNS = {
    "sgd": dict(),
    "adamw, fused": dict(optimizer="adamw", lr=1e-3, fused=True),
    "lamb": dict(optimizer="lamb", lr=1e-2, callbacks=[TrustRatios()]),
    "invariant-adamw, micro-batches": dict(
        optimizer="invariant-adamw", lr=1e-3, micro_batch=16, norm="layer"
    ),
}


@pytest.mark.parametrize("kw", FP16_RUNS.values(), ids=FP16_RUNS.keys())
def test_fp16_steps_whose_gradients_overflow_leave_the_weights_and_the_scale_backs_off(
    monkeypatch, shapes_ci, kw
):
    """A loss scale of 2**40 overflows float16 in the backward pass: each such step must be
    skipped (the weights as the seed made them; without the skip, invariant AdamW's sums turn
    the weights to NaN at step 2) and the scale halved until the gradients fit."""

    torch.manual_seed(0)  # the weights every run starts from (TrainConfig.seed 0)
    start = dict(ci(**kw).model(len(shapes_ci.classes)).named_parameters())
    seen = {}

    def weights_after_two_steps(**scaler):
        monkeypatch.setattr(
            C, "grad_scaler", lambda device: torch.amp.GradScaler(device.type, **scaler)
        )
        keep = EpochEnd(lambda m, ds, e: seen.update(m.named_parameters()))
        callbacks = [*kw.get("callbacks", ()), keep]
        c = ci(fp16=True, max_steps=2, **{**kw, "callbacks": callbacks})
        assert run(c, dataset=shapes_ci)[-1].kind == "done"
        return {k: torch.equal(v.detach(), start[k].detach()) for k, v in seen.items()}

    assert not any(weights_after_two_steps().values())  # torch's default scale: steps taken
    unchanged = weights_after_two_steps(init_scale=2.0**40)
    assert len(unchanged) == len(start) and all(unchanged.values())
    whole = run(ci(fp16=True, **kw), dataset=shapes_ci)
    assert whole[-1].kind == "done", whole[-1].extras.get("reason")
    # halved at every overflow: it ends far below where it started (2**16 - 2**18 seen here)
    assert whole[-1].extras["loss_scale"] <= 2.0**24
    assert all(math.isfinite(v) for v in losses(whole))
    ls = losses(whole)
    assert sum(ls[-10:]) / 10 < sum(ls[:10]) / 10  # once the scale fits, it learns


def test_torch_optimizers_take_fused_steps_where_they_run_and_sgd_never_under_loss_scaling(
    monkeypatch,
):

    monkeypatch.delenv("LESSONS_FUSED", raising=False)
    for var in ("LESSONS_BF16", "LESSONS_FP16"):
        monkeypatch.delenv(var, raising=False)
    cpu, mps = torch.device("cpu"), torch.device("mps")
    SGD, AdamW = torch.optim.SGD, torch.optim.AdamW
    assert C.fused_runs(SGD, "cpu") and C.fused_runs(AdamW, "cpu")  # torch >= 2.4 on a CPU
    assert C.use_fused(ci(), SGD, cpu) and C.use_fused(ci(), AdamW, cpu)
    assert not C.use_fused(ci(), AdamW, mps)  # torch's own default there
    assert not C.use_fused(ci(fused=False), AdamW, cpu) and C.use_fused(ci(fused=True), AdamW, mps)
    monkeypatch.setenv("LESSONS_FUSED", "0")
    assert not C.use_fused(ci(), AdamW, cpu) and C.use_fused(ci(fused=True), AdamW, cpu)
    monkeypatch.delenv("LESSONS_FUSED")
    # fused SGD would leave an overflowed step's momentum uninitialised: never under fp16
    assert not C.use_fused(ci(fp16=True), SGD, cpu)
    assert not C.use_fused(ci(fp16=True, fused=True), SGD, cpu)
    assert C.use_fused(ci(fp16=True), AdamW, cpu)
    # a torch (or device) without the kernel: the probe says no and the run is not fused
    C.fused_runs.cache_clear()
    try:
        assert not C.fused_runs(SGD, "no-such-device")
        with monkeypatch.context() as m:
            m.setattr(C, "fused_runs", lambda cls, device_type: False)
            assert not C.use_fused(ci(), AdamW, cpu)
        model = torch.nn.Linear(2, 2)
        for c, fused in ((ci(), True), (ci(fp16=True), False)):
            groups = param_groups(model, 0.0)
            opt = build_optimizer("sgd", groups, lr=0.1, fused=C.resolve(c, cpu).fused)
            assert bool(opt.defaults["fused"]) is fused
    finally:
        C.fused_runs.cache_clear()


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_fused_step_follows_the_unfused_one_to_rounding(optimizer):
    """Open loop: the same 40 random gradients go to a fused and an unfused optimizer over two
    copies of the ci model's weights (both parameter groups, weight decay on). Nothing feeds
    back, so the weights can differ only by the two kernels' rounding. Whole training runs
    cannot show that: there a one-ulp difference grows with every step, at a rate that
    depends on the CPU (on a 2-core Zen 1 a fused Adam run was 1e-2 away in loss after 40
    steps, on a Zen 4 5.8e-4)."""
    import copy

    kw = dict(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 2e-3, weight_decay=0.05)
    torch.manual_seed(0)
    model = ci(**kw).model(10)
    twins = (copy.deepcopy(model), copy.deepcopy(model))
    opts = [
        build_optimizer(optimizer, param_groups(m, kw["weight_decay"]), lr=kw["lr"], fused=f)
        for f, m in zip((True, False), twins)
    ]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        for pair in zip(*(m.parameters() for m in twins)):
            g = torch.randn(pair[0].shape, generator=gen)
            for q in pair:
                q.grad = g.clone()
        for opt in opts:
            opt.step()
    moved = 0.0
    for start, a, b in zip(model.parameters(), *(m.parameters() for m in twins)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
        moved = max(moved, float((a - start).detach().abs().max()))
    assert moved > 1e-2  # the steps were taken, not skipped


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_fused_run_trains_as_the_unfused_one_does(shapes_ci, optimizer):
    """In the engine the two runs start together and part only as rounding grows: the first
    steps agree, and after 40 steps their losses are as low as each other's."""
    kw = dict(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 2e-3, max_steps=40)
    fused, plain = (run(ci(fused=f, **kw), dataset=shapes_ci) for f in (True, False))
    assert fused[-1].kind == plain[-1].kind == "done"
    a, b = losses(fused), losses(plain)
    assert len(a) == len(b) == 40
    assert max(abs(x - y) for x, y in zip(a[:3], b[:3])) < 1e-4
    assert a[-1] < a[0] and b[-1] < b[0]
    assert abs(sum(a[-10:]) - sum(b[-10:])) / 10 < 0.05


def test_a_fused_optimizer_under_loss_scaling_skips_overflows_on_the_device(monkeypatch, shapes_ci):
    """GradScaler's other path asks the host whether any gradient overflowed (one sync a
    step, torch.amp.GradScaler._maybe_opt_step); a fused AdamW is handed the scale and the
    overflow flag as tensors and never takes it. SGD (not fused under fp16) still does."""
    calls = []
    real = torch.amp.GradScaler._maybe_opt_step

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.amp.GradScaler, "_maybe_opt_step", counted)
    assert (
        run(ci(optimizer="adamw", lr=1e-3, fp16=True, max_steps=6), dataset=shapes_ci)[-1].kind
        == "done"
    )
    assert calls == []
    assert run(ci(fp16=True, max_steps=6), dataset=shapes_ci)[-1].kind == "done"
    assert len(calls) == 6


@pytest.mark.parametrize(
    "capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]
)
def test_bf16_counts_as_native_on_ampere_and_newer_gpus_only(monkeypatch, capability, native):
    """V100 (7.0) and T4 (7.5) emulate bf16; A100 (8.0) and H100 (9.0) compute it."""

    seen = []

    def capability_of(device):
        seen.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    assert C.cuda_has_native_bf16(torch.device("cuda:0")) is native
    assert C.native_bf16(torch.device("cuda:0")) is native and seen[-1] == torch.device("cuda:0")

    def no_gpu(device):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    assert C.cuda_has_native_bf16(torch.device("cuda")) is False


@pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="reads x86 flags"
)
def test_native_bf16_means_the_cpus_bf16_instructions():
    with open("/proc/cpuinfo") as f:
        flags = next(ln for ln in f if ln.startswith("flags")).split()
    assert C.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_warm_device_takes_a_step_of_the_profiles_model_under_the_seeding_lock(monkeypatch):
    import threading
    import time

    loss = warmup.warm_device(torch.device("cpu"), "ci")
    assert math.isfinite(loss) and 1.0 < loss < 5.0  # an untrained 10-class model: ~ln 10
    # the model's initialisation draws from the global RNG: while a run seeds it (holding
    # _INIT_LOCK), the warm-up waits
    out = []
    with INIT_LOCK:
        t = threading.Thread(
            target=lambda: out.append(warmup.warm_device(torch.device("cpu"), "ci"))
        )
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not out
    t.join(60)
    assert out and math.isfinite(out[0])
    # warm_up warms a GPU only: on a CPU it trains nothing
    calls = []
    monkeypatch.setattr(warmup, "warm_device", lambda *a: calls.append(a))
    for device, expect in (("cpu", []), ("cuda", [(torch.device("cuda"),)])):
        monkeypatch.setattr(warmup, "pick_device", lambda d=device: torch.device(d))
        warmup.warm_up.cache_clear()
        warmup.warm_up()
        assert calls == expect, device
    warmup.warm_up.cache_clear()
