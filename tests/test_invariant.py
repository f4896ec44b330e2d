"""InvariantAdamW against AdamW, a hand-computed v, Theorem 1 of Wang & Aitchison, the
micro-batch engine, and lesson 5's widget headless."""

import copy

import numpy as np
import pytest
import torch

from lessons import scaling as S
from lessons.config import TrainConfig, epoch_train_loss
from lessons.optim import InvariantAdamW
from lessons.train import run
from tests.conftest import ops_per_step


def test_one_accumulate_per_step_is_exactly_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    a = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    b = InvariantAdamW(twin.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(60):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        for m, opt in ((model, a), (twin, b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if opt is b:
                opt.accumulate()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):  # same algorithm, op order aside
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_v_is_the_mean_of_squared_micro_batch_gradients():
    """w . x on two micro-batches: the gradients are the micro-batch means of x, by hand."""
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = InvariantAdamW([w], lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.0)
    micro = [
        torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64),
        torch.tensor([[-1.0, 4.0], [-1.0, 0.0]], dtype=torch.float64),
    ]
    for xb in micro:
        (xb @ w).mean().backward()
        opt.accumulate()
        assert w.grad is None
    opt.step()
    g1, g2 = np.array([2.0, 2.0]), np.array([-1.0, 2.0])  # the two micro-batch gradients
    m = 0.5 * (g1 + g2) / 2
    v = 0.25 * (g1**2 + g2**2) / 2  # standard Adam would use ((g1 + g2) / 2) ** 2
    assert opt.state[w]["exp_avg"].numpy() == pytest.approx(m)
    assert opt.state[w]["exp_avg_sq"].numpy() == pytest.approx(v)
    step = -0.1 * (m / 0.5) / np.sqrt(v / 0.25)
    assert w.detach().numpy() == pytest.approx(step)


def test_step_without_accumulate_says_what_to_do():
    w = torch.nn.Parameter(torch.ones(2))
    opt = InvariantAdamW([w])
    w.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="accumulate"):
        opt.step()
    with pytest.raises(ValueError, match="betas"):
        InvariantAdamW([w], betas=(0.9, 1.0))


def theorem_gap(eta: float, kappa: int = 4, c: float = 2.0) -> float:
    """Theorem 1 of Wang & Aitchison, measured: kappa Adam steps on kappa micro-batches (lr
    eta, betas gamma) against one invariant step over the same micro-batches (lr kappa eta,
    betas gamma^kappa), from the same warm state (moments m0, v0; bias correction long gone),
    with 1 - gamma = c eta as in the small-learning-rate limit, on a noisy quadratic. Returns
    the endpoint distance relative to the step."""
    rng = np.random.default_rng(0)
    d = 6
    curv = torch.as_tensor(rng.uniform(0.5, 2.0, d))
    offsets = torch.as_tensor(rng.standard_normal((kappa, d)) * 0.5)  # micro-batch noise
    m0 = torch.as_tensor(rng.standard_normal(d) * 0.3)
    v0 = torch.as_tensor(rng.uniform(0.2, 1.0, d))
    w0 = torch.as_tensor(rng.standard_normal(d))
    g1, g2 = 1 - c * eta, 1 - c * eta / 4
    wa, wb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    adam = torch.optim.Adam([wa], lr=eta, betas=(g1, g2), eps=0.0)
    inv = InvariantAdamW(
        [wb], lr=kappa * eta, betas=(g1**kappa, g2**kappa), eps=0.0, weight_decay=0.0
    )
    adam.state[wa] = {
        "step": torch.tensor(1e9, dtype=torch.float64),
        "exp_avg": m0.clone(),
        "exp_avg_sq": v0.clone(),
    }
    inv.state[wb] = {"step": 10**9, "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
    for j in range(kappa):  # standard Adam: one step per micro-batch, w moving in between
        wa.grad = curv * wa.detach() + offsets[j]
        adam.step()
    for j in range(kappa):  # invariant: every micro-batch gradient at the same w
        wb.grad = curv * wb.detach() + offsets[j]
        inv.accumulate()
    inv.step()
    return float((wa.detach() - wb.detach()).norm() / (wb.detach() - w0).norm())


def test_a_step_with_an_overflowed_micro_batch_is_skipped_when_asked_and_changes_nothing():
    """Under float16 loss scaling (skip_nonfinite): a step whose micro-batch sums hold an inf
    leaves the weights, the moments and the step count as they were; the next step is then
    exactly a fresh optimizer's first. Without the flag the inf reaches the weights."""
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(2)]
    bad = grads[0].clone()
    bad[1, 2] = float("inf")

    def step(opt, p, micro):
        for g in micro:
            p.grad = g.clone()
            opt.accumulate()
        opt.step()

    p = w0.clone().requires_grad_()
    opt = InvariantAdamW([p], lr=0.1, weight_decay=0.1, skip_nonfinite=True)
    step(opt, p, [bad, grads[1]])
    assert torch.equal(p.detach(), w0) and "step" not in opt.state[p]
    assert opt.skipped_steps == 1 and opt.micro_batches == 0
    assert not opt.state[p]["grad_sum"].any() and not opt.state[p]["grad_sq_sum"].any()
    step(opt, p, grads)
    q = w0.clone().requires_grad_()
    step(InvariantAdamW([q], lr=0.1, weight_decay=0.1), q, grads)
    assert torch.equal(p.detach(), q.detach()) and opt.state[p]["step"] == 1
    nan = grads[0].clone()
    nan[0, 0] = float("nan")
    step(opt, p, [nan])
    assert opt.skipped_steps == 2 and opt.state[p]["step"] == 1
    r = w0.clone().requires_grad_()
    step(InvariantAdamW([r], lr=0.1), r, [bad, grads[1]])  # the default: no check, no sync
    assert not torch.isfinite(r.detach()).all()


def test_theorem_1_the_gap_shrinks_with_the_learning_rate():
    etas = (4e-3, 2e-3, 1e-3)
    gaps = [theorem_gap(e) for e in etas]
    orders = [np.log2(gaps[i] / gaps[i + 1]) for i in range(2)]
    print("relative gaps", gaps, "order", orders)  # measured: 0.143, 0.076, 0.039; ~0.9-0.97
    assert gaps[0] > gaps[1] > gaps[2]
    assert all(o > 0.8 for o in orders)  # first order in the learning rate


def test_engine_trains_with_micro_batches(shapes_ci):
    c = TrainConfig.from_profile(
        "ci",
        device="cpu",
        optimizer="invariant-adamw",
        lr=2e-3,
        micro_batch=16,
        epochs=4,
        weight_decay=0.0,
    )
    records = run(c, dataset=shapes_ci)
    losses = [r.loss for r in records if r.kind == "train"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
    with pytest.raises(ValueError, match="whole multiple"):
        run(
            TrainConfig.from_profile(
                "ci", device="cpu", optimizer="invariant-adamw", micro_batch=24
            ),
            dataset=shapes_ci,
        )


def test_micro_batches_of_the_whole_batch_match_adamw_in_the_engine(shapes_ci):
    common = dict(device="cpu", lr=2e-3, max_steps=5, epochs=1, weight_decay=0.01)
    a = run(TrainConfig.from_profile("ci", optimizer="adamw", **common), dataset=shapes_ci)
    b = run(
        TrainConfig.from_profile("ci", optimizer="invariant-adamw", micro_batch=64, **common),
        dataset=shapes_ci,
    )
    la = [r.loss for r in a if r.kind == "train"]
    lb = [r.loss for r in b if r.kind == "train"]
    assert la == pytest.approx(lb, rel=1e-5)


def test_one_torch_func_pass_gives_the_micro_batch_loop_result(shapes_ci):
    common = dict(
        device="cpu",
        optimizer="invariant-adamw",
        lr=2e-3,
        micro_batch=16,
        norm="layer",
        max_steps=6,
        epochs=1,
    )
    loop = run(TrainConfig.from_profile("ci", micro_vmap=False, **common), dataset=shapes_ci)
    fused = run(TrainConfig.from_profile("ci", micro_vmap=True, **common), dataset=shapes_ci)
    a = [r.loss for r in loop if r.kind == "train"]
    b = [r.loss for r in fused if r.kind == "train"]
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a == pytest.approx(b, rel=1e-3)  # float rounding differs, nothing else


def test_accumulate_many_equals_one_accumulate_per_micro_batch():
    torch.manual_seed(1)
    grads = torch.randn(4, 3, 2)  # 4 micro-batches of a 3x2 parameter
    p1, p2 = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3, 2))
    o1, o2 = InvariantAdamW([p1], lr=0.1), InvariantAdamW([p2], lr=0.1)
    for g in grads:
        p1.grad = g.clone()
        o1.accumulate()
    o2.accumulate_many([grads])
    o1.step()
    o2.step()
    assert torch.allclose(p1, p2)
    with pytest.raises(ValueError, match="does not fit"):
        o2.accumulate_many([torch.zeros(4, 2, 2)])


def test_sweep_spread():
    assert S.sweep_spread([[3, 2, 1, 1], [3, 2, 1.5, 2]]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="two runs"):
        S.sweep_spread([[1, 2, 3]])


@pytest.mark.usefixtures("private_run_log")
def test_sweep_widget_trains_both_families_and_measures_spread(tmp_path):
    from widgets import micro_batch as MB

    live = MB.sweep_live(renderer="plotly")
    runs = live.run_blocking(sizes=(32, 64), timeout=300)
    assert list(runs) == [
        f"{MB.ADAM} B=32",
        f"{MB.ADAM} B=64",
        f"{MB.INVARIANT} B=32",
        f"{MB.INVARIANT} B=64",
    ]
    cfg = live.make_config(live.values())
    assert cfg[f"{MB.INVARIANT} B=64"].lr == pytest.approx(2 * cfg[f"{MB.INVARIANT} B=32"].lr)
    assert cfg[f"{MB.ADAM} B=64"].lr == pytest.approx(np.sqrt(2) * cfg[f"{MB.ADAM} B=32"].lr)
    assert cfg[f"{MB.INVARIANT} B=64"].micro_batch == 32
    found = MB.spreads(live)
    assert set(found) == {MB.ADAM, MB.INVARIANT, MB.SEED_SPREAD}
    assert "spread" in live.summary_html.value.lower()
    # the smallest batch's Adam run trains a second seed: the noise the spreads are read against
    adam_small = runs[f"{MB.ADAM} B=32"]
    (twin,) = adam_small.seed_runs
    assert not any(r.seed_runs for r in runs.values() if r is not adam_small)
    noise = S.sweep_spread([epoch_train_loss(r.records) for r in (adam_small, twin)])
    assert found[MB.SEED_SPREAD] == pytest.approx(noise) and noise > 0
    main = {t["uid"]: t["points"] for t in live.traces()}
    inv = runs[f"{MB.INVARIANT} B=32"]
    assert main[f"{inv.id}:loss"] == 0  # invariant runs are drawn in the second panel
    # ... and so the first panel's legend names Adam's runs only
    legend = [t.name for t in live.figure.fig.data if t.showlegend is not False]
    assert len(legend) == 2 and all(n.startswith(MB.ADAM) for n in legend), legend
    assert {t["uid"] for t in live.panel_figure.traces()} == {
        f"{kind}:{MB.INVARIANT} B={b}" for kind in ("inv", "inv-raw") for b in (32, 64)
    }
    # one colour per batch size, in both panels
    main_colors = {t.meta: t.line.color for t in live.figure.fig.data}
    panel_colors = {t.meta: t.line.color for t in live.panel_figure.fig.data}
    adam32 = runs[f"{MB.ADAM} B=32"]
    assert panel_colors[f"inv:{MB.INVARIANT} B=32"] == main_colors[f"{adam32.id}:loss"]
    assert panel_colors[f"inv:{MB.INVARIANT} B=32"] != panel_colors[f"inv:{MB.INVARIANT} B=64"]
    # an export holds every panel the widget shows, as PNG and as HTML
    paths = live.export(tmp_path, stem="sweep")
    assert {"png", "html", "panel_png", "panel_html", "csv"} <= set(paths)
    assert f"{MB.INVARIANT} B=64" in paths["panel_html"].read_text()
    # the panels are compared by eye: both left axes span one range that holds every curve
    shared = live.figure.fig.layout.yaxis.range
    assert shared is not None and tuple(shared) == tuple(live.panel_figure.fig.layout.yaxis.range)
    losses = [m.loss for r in runs.values() for m in r.records if m.kind == "train"]
    assert shared[0] <= min(losses) and max(losses) <= shared[1]
    assert live.controls["norm"].value == "layer"  # no BatchNorm batch effect by default
    assert live.run_blocking(micro_batch=32, sizes=(16, 32), timeout=60) is None
    assert "must divide the smallest batch" in live.status.value
    # below the sweep's smallest batch, the reference micro Adam trains too, drawn dashed
    cfg = live.make_config({**live.values(), "micro_batch": 8, "sizes": (32, 64)})
    reference = cfg[f"{MB.MICRO_ADAM} B=8"]
    assert reference.batch == reference.micro_batch == 8
    assert reference.lr == pytest.approx(cfg[f"{MB.INVARIANT} B=32"].lr / 4)
    assert reference.betas == pytest.approx(tuple(b**0.25 for b in (0.9, 0.999)))


def test_the_default_sweep_stays_under_the_papers_learning_rate_ceiling():
    """Wang & Aitchison's figures are invariant up to lr = 1e-3 B / B_max: the default sweep's
    invariant runs train at that ceiling or below, at every batch."""
    from widgets import micro_batch as MB

    live = MB.sweep_live(renderer="plotly")
    cfg = live.make_config(live.values())
    b_max = max(c.batch for c in cfg.values())
    assert b_max >= 4 * min(c.batch for c in cfg.values())  # a sweep worth the name
    for name, c in cfg.items():
        assert c.lr <= 1e-3 * c.batch / b_max * (1 + 1e-9), (name, c.lr)


def test_a_step_of_eight_micro_batches_issues_as_many_operations_for_forty_tensors_as_for_four():
    """accumulate() and step() take a group's tensors together (torch._foreach_*): for the
    gpu profile's model 40 operations a step of 8 micro-batches, where a loop over its
    tensors issued 896 (on a GPU, each a kernel launch)."""

    def ops(n_tensors: int) -> int:
        return ops_per_step(lambda params: InvariantAdamW(params, lr=1e-3), n_tensors, 8)

    few, many = ops(4), ops(40)
    assert few == many, (few, many)
    assert few <= 40  # 28: two per accumulate(), 12 for the step
