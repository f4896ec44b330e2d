"""lessons.scaling: every rule against numbers computed here, the errors, the CLI."""

import math
import subprocess
import sys

import numpy as np
import pytest

from lessons import scaling as S
from lessons.ema import half_life


def test_scale_beta_keeps_the_half_life_in_samples():
    for beta, b, b2 in ((0.9, 256, 1), (0.999, 64, 1024), (0.5, 3, 7)):
        moved = S.scale_beta(beta, b, b2)
        assert moved == pytest.approx(beta ** (b2 / b))
        assert half_life(moved) * b2 == pytest.approx(half_life(beta) * b)


def test_round_trip_is_the_identity():
    adam = dict(lr=3e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.05)
    sgd = dict(lr=0.1, momentum=0.8, weight_decay=5e-4)
    for rule in S.RULES:
        for hp in (adam, sgd) if rule not in S.ADAM_RULES else (adam,):
            there = S.transfer(hp, 128, 32, rule)
            back = S.transfer(there, 32, 128, rule)
            for key in hp:
                assert np.allclose(back[key], hp[key], rtol=1e-12), (rule, key)


def test_lamb_rule_numbers():
    out = S.transfer(dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01), 256, 1, "lamb")
    assert out["lr"] == pytest.approx(1e-3 / 256)
    assert out["betas"][0] == pytest.approx(math.exp(math.log(0.9) / 256))
    assert out["betas"][1] == pytest.approx(0.99 ** (1 / 256))
    assert out["weight_decay"] == 0.01
    assert set(out) == {"lr", "betas", "weight_decay"} and isinstance(out["betas"], tuple)


def test_adam_sqrt_rule_numbers():
    out = S.transfer(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), 64, 256, "adam-sqrt")
    assert out["lr"] == pytest.approx(2e-3)  # sqrt(4)
    assert out["betas"] == pytest.approx((0.6, 0.996))  # 1 - 4 (1 - beta)
    assert out["eps"] == pytest.approx(0.5e-8)


def test_sgd_linear_and_invariant_adam_numbers():
    sgd = S.transfer(dict(lr=0.1, momentum=0.9, weight_decay=5e-4), 128, 512, "sgd-linear")
    assert sgd == {"lr": pytest.approx(0.4), "momentum": 0.9, "weight_decay": 5e-4}
    inv = S.transfer(dict(lr=1e-3, betas=(0.9, 0.999)), 32, 64, "invariant-adam")
    assert inv["lr"] == pytest.approx(2e-3)
    assert inv["betas"] == pytest.approx((0.81, 0.998001))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.transfer({"lr": 1.0}, 1, 2, "lars"), "unknown rule"),
        (lambda: S.transfer({"lr": 1.0}, 0, 2, "lamb"), "from_batch"),
        (lambda: S.transfer({"lr": 1.0}, 4, -1, "lamb"), "to_batch"),
        (lambda: S.transfer({"betas": (0.9, 1.0)}, 4, 8, "lamb"), r"beta must be in \(0, 1\)"),
        (lambda: S.transfer({"betas": (0.9, 0.99)}, 1, 16, "adam-sqrt"), "1 - beta = 1.6"),
        (lambda: S.transfer({"momentum": 1.2}, 1, 2, "lamb"), r"momentum must be in \[0, 1\)"),
        (lambda: S.transfer({"momentum": 0.9}, 1, 2, "adam-sqrt"), "use 'lamb'"),
        (lambda: S.transfer({"momentum": 0.9}, 1, 2, "invariant-adam"), "not SGD's momentum"),
        (lambda: S.transfer({"learning_rate": 1.0}, 1, 2, "lamb"), "unknown hyperparameters"),
        (lambda: S.scale_beta(0.0, 1, 2), "beta must be"),
    ],
)
def test_errors_say_why(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _sgd_distance(lr, momentum, batch, samples=256 * 40):
    """How far torch's SGD moves a weight under a constant unit gradient over ``samples``."""
    import torch

    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum)
    for _ in range(samples // batch):
        w.grad = torch.ones(1)
        opt.step()
    return -float(w.detach())


def test_lamb_rule_keeps_torch_sgds_step_per_sample():
    """torch's momentum has no 1 - m factor: m -> m^k with lr -> k lr moved (1 - m)/(1 - m^k)
    = 7.6x further per sample from batch 256 to 32 at m = 0.9; the rule's lr keeps it."""
    hp = dict(lr=0.1, momentum=0.9)
    base = _sgd_distance(hp["lr"], hp["momentum"], 256)
    moved = S.transfer(hp, 256, 32, "lamb")
    assert moved["momentum"] == pytest.approx(0.9**0.125)
    assert moved["lr"] == pytest.approx(0.1 * 0.125 * (1 - 0.9**0.125) / 0.1)
    assert _sgd_distance(moved["lr"], moved["momentum"], 32) == pytest.approx(base, rel=0.03)
    naive_lr = hp["lr"] * 0.125  # the old rule: k lr with m^k
    assert _sgd_distance(naive_lr, moved["momentum"], 32) / base == pytest.approx(7.6, rel=0.05)
    assert S.momentum_lr_factor(0.0, 4) == 4  # plain SGD: the linear rule
    assert S.transfer(dict(lr=0.1, momentum=0.0), 32, 128, "lamb")["lr"] == pytest.approx(0.4)


def test_per_sample_weights_staircase():
    w = S.per_sample_weights(0.5, 4, 12)
    assert w[:4] == pytest.approx([0.125] * 4) and w[4:8] == pytest.approx([0.0625] * 4)
    smooth = S.per_sample_weights(S.scale_beta(0.5, 4, 1), 1, 4000)
    assert smooth.sum() == pytest.approx(S.per_sample_weights(0.5, 4, 4000).sum())


def test_quadratic_endpoints_agree_to_first_order():
    gaps = []
    for lr in (1e-4, 1e-3, 1e-2):
        small, big, w0 = S.quadratic_endpoints(lr, 8)
        gaps.append(np.linalg.norm(small - big) / np.linalg.norm(big - w0))
    assert gaps[0] < 1e-3
    assert gaps[1] / gaps[0] == pytest.approx(10, rel=0.1)  # linear in lr


def test_curve_gap():
    x = np.arange(1, 101)
    assert S.curve_gap(x, np.ones(100), x[::4], np.full(25, 1.5)) == pytest.approx(0.5)
    assert S.curve_gap(x, x * 0.0, x, x * 0.0) == 0.0
    with pytest.raises(ValueError, match="overlap"):
        S.curve_gap(x, np.ones(100), x[:10], np.ones(10))


def test_command_line_prints_the_table_with_half_lives():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lessons.scaling",
            "--from-batch",
            "256",
            "--to-batch",
            "1",
            "--rule",
            "lamb",
            "--lr",
            "1e-3",
            "--beta1",
            "0.9",
            "--beta2",
            "0.99",
            "--weight-decay",
            "0.01",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "3.90625e-06" in text and "0.999589" in text
    samples = [line for line in text.splitlines() if "in samples" in line]
    assert samples and all(line.split()[-1] == line.split()[-2] for line in samples)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lessons.scaling",
            "--from-batch",
            "1",
            "--to-batch",
            "16",
            "--rule",
            "adam-sqrt",
            "--beta1",
            "0.9",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "1 - beta = 1.6" in bad.stderr


def test_command_line_prints_each_setting_once_and_sgds_step_per_sample():
    text = S.table(dict(lr=0.1, momentum=0.9, betas=(0.9,)), 256, 32, "lamb")
    rows = [line.split()[0] for line in text.splitlines()[2:]]
    assert rows.count("momentum") == 1 and rows.count("beta1") == 1, text
    step = next(line for line in text.splitlines() if "step/sample" in line).split()
    assert float(step[-1]) == pytest.approx(float(step[-2])) == pytest.approx(0.1 / 0.1 / 256)
    note = S.table(dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01), 32, 128, "adam-sqrt")
    assert "1/sqrt(k) = 0.5" in note and "multiply weight_decay by sqrt(k) = 2" in note
