"""The engine: learning, stopping, divergence, repeatability, settings, profiles, models."""

import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from lessons import profiles
from lessons.models import make_model
from lessons.train import Metrics, TrainConfig, epoch_train_loss, run, train


def ci(**kw) -> TrainConfig:
    return TrainConfig.from_profile("ci", device="cpu", **kw)


def losses(records):
    return [r.loss for r in records if r.kind == "train"]


def test_loss_falls_and_accuracy_beats_chance(shapes_ci):
    records = run(ci(epochs=5), dataset=shapes_ci)
    assert records[-1].kind == "done"
    ls = losses(records)
    head, tail = sum(ls[:10]) / 10, sum(ls[-10:]) / 10
    assert tail < head - 0.3, (head, tail)
    evals = [r for r in records if r.kind == "eval"]
    assert len(evals) == 5 and evals[-1].val_acc > 0.25  # chance is 0.10


def test_records_count_samples_steps_and_epochs(shapes_ci):
    c = ci(batch=50, epochs=2)
    records = run(c, dataset=shapes_ci)
    train_recs = [r for r in records if r.kind == "train"]
    per_epoch = shapes_ci.n_train // 50
    assert [r.step for r in train_recs] == list(range(1, 2 * per_epoch + 1))
    assert all(r.samples == 50 * r.step and r.batch == 50 for r in train_recs)
    assert train_recs[-1].epoch == pytest.approx(2.0)
    assert [r.step for r in records if r.kind == "eval"] == [per_epoch, 2 * per_epoch]


def test_stop_ends_the_run_within_one_step(shapes_ci):
    stop = threading.Event()
    seen = []
    for rec in train(ci(epochs=50, flush_s=0.0), stop, dataset=shapes_ci):
        seen.append(rec)
        if rec.kind == "train" and rec.step == 3:
            stop.set()
    assert seen[-1].kind == "stopped"
    assert max(r.step for r in seen) <= 4


def test_divergence_is_a_record_not_an_exception(shapes_ci):
    records = run(ci(lr=1e6, momentum=0.0, epochs=3), dataset=shapes_ci)
    assert records[-1].kind == "diverged"
    assert (
        "loss became" in records[-1].extras["reason"]
        or "not finite" in (records[-1].extras["reason"])
    )
    assert all(r.kind != "done" for r in records)


def test_a_loss_stuck_far_above_its_start_is_divergence(shapes_ci):
    # BatchNorm keeps lr=10 finite, but the net is thrown to worse than chance and stays there
    records = run(ci(lr=10.0, epochs=2), dataset=shapes_ci)
    last = records[-1]
    assert last.kind == "diverged" and "smoothed loss rose to" in last.extras["reason"]
    train = [r.loss for r in records if r.kind == "train"]
    assert len(train) >= 20 and last.step == len(train)
    ema = w = 0.0
    for v in train:  # the rule, recomputed from the recorded losses
        ema, w = 0.9 * ema + 0.1 * v, 0.9 * w + 0.1
    assert ema / w > 1.5 * train[0]
    undetected = run(ci(lr=10.0, epochs=2, diverge_factor=None), dataset=shapes_ci)
    assert undetected[-1].kind == "done"
    assert max(r.loss for r in undetected if r.kind == "train") > 1.5 * train[0]
    # a sound run never trips it
    assert run(ci(epochs=2), dataset=shapes_ci)[-1].kind == "done"


def test_runs_repeat_bit_for_bit_on_cpu(shapes_ci):
    a = losses(run(ci(max_steps=8), dataset=shapes_ci))
    b = losses(run(ci(max_steps=8), dataset=shapes_ci))
    c = losses(run(ci(max_steps=8, seed=1), dataset=shapes_ci))
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(batch=0), "batch size"),
        (dict(batch=10**6), "larger than"),
        (dict(momentum=1.0), "momentum"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(optimizer="rmsprop"), "unknown optimizer"),
        (dict(norm="group"), "norm"),
        (dict(bf16=True, fp16=True), "one of bf16 and fp16"),
    ],
)
def test_impossible_settings_raise_a_clear_value_error(shapes_ci, kw, match):
    with pytest.raises(ValueError, match=match):
        run(ci(**kw), dataset=shapes_ci)


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
    import lessons.train as T

    monkeypatch.delenv("LESSONS_BF16", raising=False)
    cpu, cuda, mps = (torch.device(d) for d in ("cpu", "cuda", "mps"))
    on_cpu, on_ci = TrainConfig.from_profile("cpu"), TrainConfig.from_profile("ci")
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(T, "cuda_has_native_bf16", lambda device: True)
    assert T.use_bf16(on_cpu, cpu) and T.precision(on_cpu, cpu) == "bf16 autocast"
    assert not T.use_bf16(on_ci, cpu)  # the tests see float32 numbers on every CPU
    assert not T.use_bf16(TrainConfig(), cpu)  # no profile: float32
    assert not T.use_bf16(TrainConfig.from_profile("cpu", bf16=False), cpu)
    assert T.use_bf16(on_ci, cuda) and not T.use_bf16(on_cpu, mps)
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: False)
    assert not T.use_bf16(on_cpu, cpu) and T.precision(on_cpu, cpu) == "float32"
    assert T.use_bf16(TrainConfig.from_profile("ci", bf16=True), cpu)  # asked for: emulated
    monkeypatch.setenv("LESSONS_BF16", "1")
    assert T.use_bf16(on_ci, cpu)
    monkeypatch.setenv("LESSONS_BF16", "0")
    assert not T.use_bf16(on_ci, cuda)
    assert T.use_bf16(TrainConfig.from_profile("ci", bf16=True), cuda)  # the setting wins
    # a GPU that only emulates bf16 (Colab's T4) does not train in bf16 unless asked to
    monkeypatch.delenv("LESSONS_BF16")
    monkeypatch.setattr(T, "cuda_has_native_bf16", lambda device: False)
    assert not T.use_bf16(on_ci, cuda)
    assert T.use_bf16(TrainConfig.from_profile("ci", bf16=True), cuda)
    assert not T.use_bf16(TrainConfig.from_profile("ci", fp16=True), cuda)  # asked for fp16


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
    import lessons.train as T

    for var in ("LESSONS_BF16", "LESSONS_FP16"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gpu = TrainConfig.from_profile("gpu")
    assert T.autocast_dtype(gpu, cuda) == dtype
    words = {None: "float32", torch.float16: "fp16 autocast, loss scaling"}
    assert T.precision(gpu, cuda) == words.get(dtype, "bf16 autocast")
    # the settings win over the device: no bf16 on an H100 means float32, not fp16
    assert T.autocast_dtype(TrainConfig.from_profile("gpu", bf16=False), cuda) in (
        None,
        torch.float16 if dtype == torch.float16 else None,
    )
    assert T.autocast_dtype(TrainConfig.from_profile("gpu", fp16=True), cuda) == torch.float16
    assert T.autocast_dtype(TrainConfig.from_profile("gpu", fp16=False), cuda) == (
        None if dtype == torch.float16 else dtype
    )
    monkeypatch.setenv("LESSONS_FP16", "0")
    assert T.autocast_dtype(gpu, cuda) == (None if dtype == torch.float16 else dtype)
    monkeypatch.setenv("LESSONS_FP16", "1")  # forced: on any device, unless bf16 is used
    assert T.autocast_dtype(TrainConfig.from_profile("ci"), cpu) == torch.float16
    assert T.autocast_dtype(gpu, cuda) == (dtype if dtype == torch.bfloat16 else torch.float16)
    monkeypatch.setenv("LESSONS_BF16", "1")  # both asked for by the environment: bf16
    assert T.autocast_dtype(gpu, cuda) == torch.bfloat16
    monkeypatch.delenv("LESSONS_FP16")
    monkeypatch.delenv("LESSONS_BF16")
    assert T.autocast_dtype(TrainConfig.from_profile("ci"), cpu) is None  # no GPU: float32


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
    "lamb": dict(optimizer="lamb", lr=1e-2, record_trust=True),
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
    import lessons.train as T

    torch.manual_seed(0)  # the weights every run starts from (TrainConfig.seed 0)
    start = dict(ci(**kw).model(len(shapes_ci.classes)).named_parameters())
    seen = {}

    def weights_after_two_steps(**scaler):
        monkeypatch.setattr(
            T, "grad_scaler", lambda device: torch.amp.GradScaler(device.type, **scaler)
        )
        keep = lambda m, ds, e: seen.update(m.named_parameters())  # noqa: E731
        c = ci(fp16=True, max_steps=2, on_epoch=keep, **kw)
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
    import lessons.train as T

    monkeypatch.delenv("LESSONS_FUSED", raising=False)
    for var in ("LESSONS_BF16", "LESSONS_FP16"):
        monkeypatch.delenv(var, raising=False)
    cpu, mps = torch.device("cpu"), torch.device("mps")
    SGD, AdamW = torch.optim.SGD, torch.optim.AdamW
    assert T.fused_runs(SGD, "cpu") and T.fused_runs(AdamW, "cpu")  # torch >= 2.4 on a CPU
    assert T.use_fused(ci(), SGD, cpu) and T.use_fused(ci(), AdamW, cpu)
    assert not T.use_fused(ci(), AdamW, mps)  # torch's own default there
    assert not T.use_fused(ci(fused=False), AdamW, cpu) and T.use_fused(ci(fused=True), AdamW, mps)
    monkeypatch.setenv("LESSONS_FUSED", "0")
    assert not T.use_fused(ci(), AdamW, cpu) and T.use_fused(ci(fused=True), AdamW, cpu)
    monkeypatch.delenv("LESSONS_FUSED")
    # fused SGD would leave an overflowed step's momentum uninitialised: never under fp16
    assert not T.use_fused(ci(fp16=True), SGD, cpu)
    assert not T.use_fused(ci(fp16=True, fused=True), SGD, cpu)
    assert T.use_fused(ci(fp16=True), AdamW, cpu)
    # a torch (or device) without the kernel: the probe says no and the run is not fused
    T.fused_runs.cache_clear()
    try:
        assert not T.fused_runs(SGD, "no-such-device")
        with monkeypatch.context() as m:
            m.setattr(T, "fused_runs", lambda cls, device_type: False)
            assert not T.use_fused(ci(), AdamW, cpu)
        model = torch.nn.Linear(2, 2)
        opt = T.OPTIMIZERS["sgd"](ci(), T._param_groups(model, 0.0))
        assert opt.defaults["fused"] is True
        opt = T.OPTIMIZERS["sgd"](ci(fp16=True), T._param_groups(model, 0.0))
        assert not opt.defaults["fused"]
    finally:
        T.fused_runs.cache_clear()


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_fused_step_follows_the_unfused_one_to_rounding(optimizer):
    """Open loop: the same 40 random gradients go to a fused and an unfused optimizer over two
    copies of the ci model's weights (both parameter groups, weight decay on). Nothing feeds
    back, so the weights can differ only by the two kernels' rounding. Whole training runs
    cannot show that: there a one-ulp difference grows with every step, at a rate that
    depends on the CPU (on a 2-core Zen 1 a fused Adam run was 1e-2 away in loss after 40
    steps, on a Zen 4 5.8e-4)."""
    import copy

    from lessons.train import OPTIMIZERS, _param_groups

    kw = dict(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 2e-3, weight_decay=0.05)
    torch.manual_seed(0)
    model = ci(**kw).model(10)
    twins = (copy.deepcopy(model), copy.deepcopy(model))
    opts = [
        OPTIMIZERS[optimizer](ci(fused=f, **kw), _param_groups(m, kw["weight_decay"]))
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
    import lessons.train as T

    seen = []

    def capability_of(device):
        seen.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    assert T.cuda_has_native_bf16(torch.device("cuda:0")) is native
    assert T.native_bf16(torch.device("cuda:0")) is native and seen[-1] == torch.device("cuda:0")

    def no_gpu(device):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    assert T.cuda_has_native_bf16(torch.device("cuda")) is False


@pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="reads x86 flags"
)
def test_native_bf16_means_the_cpus_bf16_instructions():
    from lessons.train import cpu_has_native_bf16

    with open("/proc/cpuinfo") as f:
        flags = next(ln for ln in f if ln.startswith("flags")).split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_every_optimizer_trains(shapes_ci, opt):
    lr = 0.05 if opt == "sgd" else 3e-3
    ls = losses(run(ci(optimizer=opt, lr=lr, epochs=3), dataset=shapes_ci))
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5


def test_weight_decay_skips_biases_and_norm_scales(shapes_ci):
    from lessons.train import _param_groups

    model = make_model(10, 8, 1, "batch")
    decay, no_decay = _param_groups(model, 0.1)
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_onecycle_schedule_warms_up_then_decays(shapes_ci):
    records = run(ci(schedule="onecycle", warmup=0.25, epochs=2), dataset=shapes_ci)
    lrs = [r.lr for r in records if r.kind == "train"]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.05)
    assert lrs[: peak + 1] == sorted(lrs[: peak + 1]) and lrs[peak:] == sorted(lrs[peak:])[::-1]


def test_warm_device_takes_a_step_of_the_profiles_model_under_the_seeding_lock(monkeypatch):
    import threading
    import time

    import lessons.train as T

    loss = T.warm_device(torch.device("cpu"), "ci")
    assert math.isfinite(loss) and 1.0 < loss < 5.0  # an untrained 10-class model: ~ln 10
    # the model's initialisation draws from the global RNG: while a run seeds it (holding
    # _INIT_LOCK), the warm-up waits
    out = []
    with T._INIT_LOCK:
        t = threading.Thread(target=lambda: out.append(T.warm_device(torch.device("cpu"), "ci")))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not out
    t.join(60)
    assert out and math.isfinite(out[0])
    # warm_up warms a GPU only: on a CPU it trains nothing
    calls = []
    monkeypatch.setattr(T, "warm_device", lambda *a: calls.append(a))
    for device, expect in (("cpu", []), ("cuda", [(torch.device("cuda"),)])):
        monkeypatch.setattr(T, "pick_device", lambda d=device: torch.device(d))
        T.warm_up.cache_clear()
        T.warm_up()
        assert calls == expect, device
    T.warm_up.cache_clear()


def test_metrics_round_trip_through_dicts():
    m = Metrics(3, 192, 0.1, 2.3, 0.05, 64, extras={"a": 1})
    assert Metrics.from_dict({**m.to_dict(), "unknown": 1}) == m


def test_epoch_train_loss_weights_each_step_by_its_batch():
    recs = [  # 40 training samples an epoch
        Metrics(1, 20, 0.5, 1.0, 0.1, 20),
        Metrics(2, 40, 1.0, 3.0, 0.1, 20),  # ends exactly at epoch 1: still epoch 0
        Metrics(2, 40, 1.0, None, 0.1, 20, val_loss=9.0, val_acc=0.1, kind="eval"),
        Metrics(3, 50, 1.25, 4.0, 0.1, 10),
        Metrics(4, 80, 2.0, 0.0, 0.1, 30),  # a grown batch: 30 samples at loss 0
    ]
    # per sample: (4*10 + 0*30) / 40 = 1.0, where a mean of steps would give 2.0
    assert epoch_train_loss(recs) == [2.0, 1.0]


def test_epoch_train_loss_of_a_growing_batch_run_counts_every_sample_once(shapes_ci):
    c = ci(epochs=2, batch=50, batch_at=lambda e: 50 if e == 0 else 200)
    records = run(c, dataset=shapes_ci)
    curve = epoch_train_loss(records)
    assert len(curve) == 2
    per_epoch = [[r for r in records if r.kind == "train" and r.epoch_index == e] for e in (0, 1)]
    assert {r.batch for r in per_epoch[1]} == {200}
    for e, rs in enumerate(per_epoch):
        assert sum(r.batch for r in rs) == shapes_ci.n_train  # each sample once
        # one batch size within an epoch: per sample is the plain mean of its steps
        assert curve[e] == pytest.approx(sum(r.loss for r in rs) / len(rs), rel=1e-9)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_models_take_any_size(norm):
    model = make_model(10, 8, 1, norm)
    for size in (16, 32, 64):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_a_strided_stem_halves_the_first_resolution_and_only_the_ci_profile_has_one(shapes_ci):
    x = torch.randn(2, 3, 32, 32)
    for stride, side in ((1, 32), (2, 16)):
        model = make_model(10, 8, 1, "batch", stem_stride=stride)
        assert model.features[0](x).shape[-2:] == (side, side)
        assert model(x).shape == (2, 10)
    with pytest.raises(ValueError, match="stem_stride"):
        make_model(10, 8, 1, stem_stride=3)
    # the lessons' own profiles keep a full-resolution stem; the ci profile's run gets the
    # strided one (the model train() builds, seen from its epoch hook)
    assert profiles.get_profile("gpu").stem_stride == profiles.get_profile("cpu").stem_stride == 1
    seen = []
    c = ci(epochs=1, max_steps=2, on_epoch=lambda m, ds, e: seen.append(m) or {})
    assert c.stem_stride == 2 and c.model(10).features[0][0].stride == (2, 2)
    run(c, dataset=shapes_ci)
    assert seen and seen[0].features[0][0].stride == (2, 2)


def test_profiles_chosen_by_env_and_unknown_rejected(monkeypatch):
    monkeypatch.setenv("LESSONS_PROFILE", "cpu")
    assert profiles.get_profile().name == "cpu"
    assert profiles.get_profile("gpu").size >= 64
    monkeypatch.setenv("LESSONS_PROFILE", "tpu")
    with pytest.raises(ValueError, match="gpu, cpu, ci"):
        profiles.get_profile()
    monkeypatch.delenv("LESSONS_PROFILE")
    monkeypatch.delenv("LESSONS_DEVICE", raising=False)
    expect = "gpu" if torch.cuda.is_available() else "cpu"
    assert profiles.get_profile().name == expect


def test_lessons_imports_without_ui_libraries():
    """lessons/ must work where ipywidgets, plotly and IPython are absent."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ipywidgets', 'plotly', 'IPython', 'anywidget',\n"
        "                                  'matplotlib', 'widgets'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import lessons.data, lessons.train, lessons.models, lessons.profiles, lessons.bench\n"
        "import lessons.imagenette, lessons.shapes, lessons.augment\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_train_many_side_by_side_gives_each_run_its_own_records(shapes_ci):
    import threading

    from lessons.train import train_many

    configs = {f"b{b}": ci(batch=b, lr=0.05 * b / 64, epochs=1) for b in (32, 128)}
    datasets = dict.fromkeys(configs, shapes_ci)
    got = {k: [] for k in configs}
    order = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two runs side by side: one OpenMP thread each
    try:
        for name, rec in train_many(configs, datasets=datasets, concurrent=True):
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
    sequential = [n for n, _ in train_many(configs, datasets=datasets, concurrent=False)]
    assert sequential == sorted(sequential, key=list(configs).index)  # one after the other

    stop = threading.Event()
    seen = {k: 0 for k in configs}
    long = {k: ci(batch=c.batch, epochs=50) for k, c in configs.items()}
    for name, rec in train_many(long, stop, datasets, concurrent=True):
        seen[name] += rec.kind == "train"
        if min(seen.values()) >= 3:
            stop.set()
    assert max(seen.values()) < 200  # both ended within a few steps of the stop
    assert not [t for t in threading.enumerate() if t.name.startswith("train-")]


def test_train_many_gives_each_cpu_run_its_share_of_the_threads(shapes_ci, monkeypatch):
    """Four runs on a CPU each train with a quarter of the caller's OpenMP threads: with a
    team of the caller's size each, a bf16 sweep on 2 cores took 5 - 14x as long as one run
    after the other."""
    import lessons.train as T

    seen = {}

    def fake_train(c, stop=None, dataset=None):
        seen[c.seed] = torch.get_num_threads()
        yield Metrics(1, c.batch, 1.0, 1.0, c.lr, c.batch)

    monkeypatch.setattr(T, "train", fake_train)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        configs = {f"s{i}": ci(seed=i) for i in range(4)}
        list(T.train_many(configs, datasets=dict.fromkeys(configs, shapes_ci), concurrent=True))
        assert seen == {0: 2, 1: 2, 2: 2, 3: 2} and torch.get_num_threads() == 8
        list(T.train_many(configs, datasets=dict.fromkeys(configs, shapes_ci), concurrent=False))
        assert seen == {0: 8, 1: 8, 2: 8, 3: 8}  # one after the other: all of them
    finally:
        torch.set_num_threads(threads)


def test_train_many_raises_a_runs_error_and_stops_the_others(shapes_ci):
    import threading

    from lessons.train import train_many

    configs = {"fine": ci(epochs=50), "bad": ci(batch=10**6)}  # larger than the data set
    with pytest.raises(ValueError, match="larger than"):
        for _ in train_many(configs, datasets=dict.fromkeys(configs, shapes_ci), concurrent=True):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("train-")]


def test_concurrent_by_default_only_on_cuda(monkeypatch):
    import torch

    from lessons.train import concurrent_by_default

    monkeypatch.delenv("LESSONS_CONCURRENT", raising=False)
    assert concurrent_by_default(torch.device("cuda")) is True
    assert concurrent_by_default(torch.device("cpu")) is False
    monkeypatch.setenv("LESSONS_CONCURRENT", "1")
    assert concurrent_by_default(torch.device("cpu")) is True
    monkeypatch.setenv("LESSONS_CONCURRENT", "0")
    assert concurrent_by_default(torch.device("cuda")) is False


def test_gpu_and_cpu_fall_back_to_generated_data_of_imagenettes_size():
    # offline, a lesson's batch sizes (up to 2048 in lesson 3) must still fit the data set
    from lessons import imagenette
    from lessons.profiles import get_profile

    for name in ("gpu", "cpu"):
        p = get_profile(name)
        assert (p.n_train, p.n_val) == (
            imagenette.IMAGENETTE_COUNTS["train"],
            imagenette.IMAGENETTE_COUNTS["val"],
        )


@pytest.mark.skipif(sys.platform != "linux", reason="libgomp and /proc are Linux's")
def test_free_openmp_threads_frees_the_main_threads_workers_and_torch_still_works():
    # a fresh process: this one's OpenMP state depends on the tests before
    code = (
        "import os, threading, torch\n"
        "from lessons.train import free_openmp_threads\n"
        "n = lambda: len(os.listdir('/proc/self/task'))\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(64, 16, 64, 64)\n"
        "w = torch.randn(16, 16, 3, 3)\n"
        "ref = torch.nn.functional.conv2d(x, w)\n"  # a parallel region: the team exists
        "before = n()\n"
        "assert free_openmp_threads()\n"
        "after = n()\n"
        "again = torch.nn.functional.conv2d(x, w)\n"  # the team comes back when needed
        "out = []\n"
        "t = threading.Thread(target=lambda: out.append(torch.nn.functional.conv2d(x, w)))\n"
        "t.start(); t.join()\n"
        "assert torch.equal(ref, again) and torch.equal(ref, out[0])\n"
        "off_main = []\n"  # another thread's call frees nothing and says so
        "t = threading.Thread(target=lambda: off_main.append(free_openmp_threads()))\n"
        "t.start(); t.join()\n"
        "assert off_main == [False], off_main\n"
        "print(before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before - 1  # the main thread's one OpenMP worker (2 threads) has gone


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


# run first in the fresh processes of the page-fault tests: minor page faults of the median
# round of ``work`` (the median: the heap may grow once or twice after a change)
MEDIAN_FAULTS = (
    "import resource\n"
    "def median_faults(work, rounds, warmup=0):\n"  # warmup: rounds run first, not counted
    "    counts = []\n"
    "    for _ in range(warmup + rounds):\n"
    "        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "        work()\n"
    "        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n"
    "    return sorted(counts[warmup:])[rounds // 2]\n"
)


def _fresh_python(code: str, **env) -> str:
    """stdout of ``code`` in a fresh interpreter, without this process's malloc settings
    (LESSONS_KEEP_MEMORY, GLIBC_TUNABLES) unless given in ``env``."""
    clean = {
        k: v for k, v in os.environ.items() if k not in ("LESSONS_KEEP_MEMORY", "GLIBC_TUNABLES")
    }
    out = subprocess.run(
        [sys.executable, "-c", MEDIAN_FAULTS + code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not _glibc(), reason="mallopt's thresholds are glibc's")
def test_keep_freed_memory_ends_the_page_faults_of_every_cpu_step():
    # the same steps of a 32 px model whose stem runs at full resolution (the cpu profile's,
    # without its residual blocks), with glibc's defaults, then after the call
    code = (
        "import torch, torch.nn.functional as F\n"
        "from lessons.models import make_model\n"
        "from lessons.train import keep_freed_memory\n"
        "torch.manual_seed(0)\n"
        "m = make_model(10, 16, 0).to(memory_format=torch.channels_last)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)\n"
        "x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)\n"
        "y = torch.randint(0, 10, (64,))\n"
        "def step():\n"
        "    opt.zero_grad(set_to_none=True)\n"
        "    F.cross_entropy(m(x), y).backward()\n"
        "    opt.step()\n"
        "before = median_faults(step, 15)\n"
        "assert keep_freed_memory()\n"
        "print(before, median_faults(step, 15))\n"
    )
    before, after = map(int, _fresh_python(code).split())
    assert before > 500, before  # measured 2,900 - 5,800 a step: the activations, mapped afresh
    assert after < 50, after  # measured 0


@pytest.mark.skipif(not _glibc(), reason="GLIBC_TUNABLES are glibc's")
def test_a_worker_threads_large_blocks_are_kept_only_with_one_malloc_arena():
    # a widget's thread allocates from an arena of its own, which maps blocks over 64 MB
    # afresh each time (a batch-1024 activation on the cpu profile is 67 MB) whatever
    # keep_freed_memory sets; with MALLOC_TUNABLES at process start it uses the main arena
    from lessons.train import MALLOC_TUNABLES

    code = (
        "import threading, torch\n"
        "from lessons.train import keep_freed_memory\n"
        "assert keep_freed_memory()\n"
        "def round():\n"
        "    a = torch.ones(20_000_000)\n"  # 80 MB, as a step's activation and gradients
        "    b = a * 2\n"
        "    del a\n"
        "    c = b + 1\n"
        "    del b, c\n"
        "out = []\n"
        "t = threading.Thread(target=lambda: out.append(median_faults(round, 9, warmup=6)))\n"
        "t.start(); t.join()\n"
        "print(out[0])\n"
    )
    faults = {
        False: int(_fresh_python(code)),
        True: int(_fresh_python(code, GLIBC_TUNABLES=MALLOC_TUNABLES)),
    }
    # 80 MB is 19,531 pages of 4 kB; measured 58,596 (three blocks faulted in every round)
    # against 0 from the fourth or fifth round on (the heap grows for the first few; once,
    # under make test's two processes, a median of 19,531 over rounds 1-9, so six are skipped)
    assert faults[False] > 30_000, faults
    assert faults[True] < 100, faults


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    from lessons import train as T

    monkeypatch.setenv("LESSONS_KEEP_MEMORY", "0")
    assert T.keep_freed_memory.__wrapped__() is False  # the uncached function: nothing set


def test_cpu_training_keeps_freed_memory(shapes_ci, monkeypatch):
    from lessons import train as T

    calls = []
    monkeypatch.setattr(T, "keep_freed_memory", lambda: calls.append(1) or True)
    T.run(ci(epochs=0.05, evaluate=False), dataset=shapes_ci)
    assert calls == [1]


def test_train_many_frees_openmp_threads_before_its_threads_train(shapes_ci, monkeypatch):
    from lessons import train as T

    calls = []
    monkeypatch.setattr(T, "free_openmp_threads", lambda: calls.append(1) or True)
    configs = {f"b{b}": ci(batch=b, epochs=0.1) for b in (32, 64)}
    datasets = dict.fromkeys(configs, shapes_ci)
    list(T.train_many(configs, datasets=datasets, concurrent=False))
    assert calls == []  # one after the other, in this thread: nothing to free
    list(T.train_many(configs, datasets=datasets, concurrent=True))
    assert calls == [1]
