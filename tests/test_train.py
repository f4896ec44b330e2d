"""The training loop: learning, stopping, divergence, repeatability, settings, profiles, models."""

import subprocess
import sys
import threading

import pytest
import torch

from lessons import profiles
from lessons.callbacks import EpochEnd
from lessons.config import Metrics, epoch_train_loss
from lessons.models import make_model
from lessons.optim import param_groups
from lessons.train import run, train
from tests.conftest import ci, losses


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


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_every_optimizer_trains(shapes_ci, opt):
    lr = 0.05 if opt == "sgd" else 3e-3
    ls = losses(run(ci(optimizer=opt, lr=lr, epochs=3), dataset=shapes_ci))
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5


def test_weight_decay_skips_biases_and_norm_scales(shapes_ci):
    model = make_model(10, 8, 1, "batch")
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_onecycle_schedule_warms_up_then_decays(shapes_ci):
    records = run(ci(schedule="onecycle", warmup=0.25, epochs=2), dataset=shapes_ci)
    lrs = [r.lr for r in records if r.kind == "train"]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.05)
    assert lrs[: peak + 1] == sorted(lrs[: peak + 1]) and lrs[peak:] == sorted(lrs[peak:])[::-1]


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
    c = ci(epochs=1, max_steps=2, callbacks=[EpochEnd(lambda m, ds, e: seen.append(m) or {})])
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
        "import importlib, pkgutil, lessons\n"
        "for m in pkgutil.iter_modules(lessons.__path__):\n"
        "    importlib.import_module('lessons.' + m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


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
