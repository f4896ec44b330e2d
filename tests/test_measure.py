"""lessons.measure: gradient moments, B_simple and Adam's direction measured on a model."""

import json

import numpy as np
import pytest
import torch

from lessons import measure as M
from lessons.config import TrainConfig
from lessons.models import make_model
from lessons.optim import InvariantAdamW
from lessons.train import run
from tests.conftest import ROOT


def test_noise_probe_measures_on_the_model(shapes_ci):
    probe = M.noise_probe(8, 128, repeats=4, n=512)
    records = run(
        TrainConfig.from_profile("ci", device="cpu", epochs=2, callbacks=[probe]), dataset=shapes_ci
    )
    values = [r.extras["b_simple"] for r in records if r.kind == "eval"]
    assert len(values) == 2 and all(np.isfinite(v) for v in values)


def _softmax_regression(seed=0, n=8192, d=6, k=3):
    """A linear softmax model and a data pool whose per-sample gradients a test can compute
    in closed form: (softmax(Wx) - onehot(y)) x^T."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w_true = torch.randn(k, d, generator=gen)
    y = torch.distributions.Categorical(logits=x @ w_true.T).sample()
    model = torch.nn.Linear(d, k, bias=False)
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(k, d, generator=gen))
    p = torch.softmax(x @ model.weight.detach().T, 1)
    per_sample = (p - torch.nn.functional.one_hot(y, k)).unsqueeze(2) * x.unsqueeze(1)
    per_sample = per_sample.flatten(1).double()
    mean = per_sample.mean(0)
    g2 = float(mean.square().sum())
    trace = float((per_sample - mean).square().sum(1).mean())
    return model, x, y, g2, trace


def test_measured_gradient_moments_match_the_per_sample_closed_form():
    model, x, y, g2, trace = _softmax_regression()
    est_g2, est_trace = M.measure_gradient_moments(model, x, y, 4, 64, repeats=300, seed=1)
    # the pool is the population; sampling without replacement from 8,192 changes E by <1%
    assert est_trace == pytest.approx(trace, rel=0.1)
    assert est_g2 == pytest.approx(g2, rel=0.15)
    assert trace / g2 > 4  # noise-dominated enough that both terms matter above
    assert model.training  # the model measured on is left as it was


def test_paired_batches_never_give_a_negative_trace():
    model, x, y, _, _ = _softmax_regression(seed=2, n=512)
    for seed in range(20):
        _, trace = M.measure_gradient_moments(model, x, y, 8, 64, repeats=1, seed=seed)
        assert trace >= 0
    with pytest.raises(ValueError, match="multiple of b_small"):
        M.measure_gradient_moments(model, x, y, 8, 60)
    with pytest.raises(ValueError, match="larger than the 512 samples"):
        M.measure_gradient_moments(model, x, y, 8, 1024)


def test_the_measurement_copy_is_the_network_that_trains():
    """At initialisation BatchNorm's running statistics are 0 and 1: eval mode there is
    another network. The copy's eval-mode outputs are the training network's on the same
    batch, and the model itself is left untouched."""
    torch.manual_seed(0)
    model = make_model(10, width=8, depth=0)
    x = torch.randn(256, 3, 32, 32) * 2 + 1
    want = model.train()(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = M.measurement_copy(model, x, chunk=256)
    assert not net.training and model.training
    assert torch.allclose(net(x), want, atol=1e-3)  # unbiased against biased variance
    assert not torch.allclose(model.eval()(x), want, atol=1e-2)  # stale statistics differ
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_adams_direction_grows_with_the_batch_where_noise_dominates():
    """With the weights frozen near the optimum (noise-dominated, B_simple >> the batches),
    rms(m_hat / sqrt(v_hat)) grows with the batch although the betas keep their horizon in
    samples, as the closed form from mu and sigma says; far from it (signal-dominated) it
    stays near 1 at every batch."""
    model, x, y, g2, trace = _softmax_regression(n=4096)
    found = M.adam_direction_by_batch(model, x, y, (4, 16, 64), base_batch=4, samples=8192)
    rms = [found[b]["rms_r"] for b in (4, 16, 64)]
    assert rms[0] < rms[1] < rms[2] and rms[2] > 1.5 * rms[0], found
    for b, row in found.items():
        assert row["rms_r"] == pytest.approx(row["predicted"], rel=0.15), (b, row)
    assert found[64]["betas"][0] == pytest.approx(0.9**16)
    # samples that nearly agree (one class, inputs 1 +- 0.05): the mean gradient dominates
    alike = 1 + 0.05 * torch.randn(4096, 6, generator=torch.Generator().manual_seed(3))
    far = M.adam_direction_by_batch(model, alike, y * 0, (4, 64), samples=4096)
    assert all(0.98 < row["rms_r"] < 1.01 for row in far.values()), far


class SquaredMeanAdamW(InvariantAdamW):
    """Invariant AdamW with its idea taken out: v from the squared mean of the micro-batch
    gradients, as standard Adam computes it."""

    @torch.no_grad()
    def step(self, closure=None):
        for state in self.state.values():
            if "grad_sum" in state:
                state["grad_sq_sum"].copy_(state["grad_sum"] ** 2 / self.micro_batches)
        return super().step(closure)


def _notebook_check(name: str, marker: str) -> str:
    """The source of one numbered self-check of a notebook, from its marker comment to the
    next numbered check or the cell's closing print."""
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    cell = next("".join(c["source"]) for c in nb["cells"] if marker in "".join(c["source"]))
    block = cell[cell.index(marker) :]
    ends = [block.find(s) for s in ("\n# 6.", 'print("all checks passed")') if s in block]
    return block[: min(ends)] if ends else block


def test_optimizer_v_follows_the_moments_and_notebook_05s_check_needs_invariance(
    shapes_ci, monkeypatch
):
    """v read from the optimizers' own state: standard Adam's falls with B as |G|^2 + tr
    Sigma / B, invariant Adam's stays at |G|^2 + tr Sigma / micro. Notebook 05's self-check of
    that claim passes, and fails once v is the squared mean gradient again."""
    from lessons.augment import normalize

    torch.manual_seed(0)
    model = TrainConfig.from_profile("ci").model(len(shapes_ci.classes))
    x, y = normalize(shapes_ci.train_x[:1024]), shapes_ci.train_y[:1024]
    moments = {"after 2 epochs": M.measure_gradient_moments(model, x, y, 16, 256, repeats=8)}
    micro, batches_v = 32, [32, 64, 128, 256, 512]
    check = _notebook_check("05_micro_batch_variance.ipynb", "# 5. v as the optimizers")
    assert "assert" in check

    def run_check(v):
        exec(check, {"v_measured": v, "moments": moments, "batches_v": batches_v, "micro": micro})

    run_check(M.optimizer_v_by_batch(model, x, y, batches_v, micro, repeats=32))
    monkeypatch.setattr(M, "InvariantAdamW", SquaredMeanAdamW)
    with pytest.raises(AssertionError):
        run_check(M.optimizer_v_by_batch(model, x, y, batches_v, micro, repeats=32))
