"""lessons.optim.Lamb against a numpy reference written here, over many steps and options."""

import copy
import itertools

import numpy as np
import pytest
import torch

from lessons.optim import LAMB_VARIANTS, Lamb
from tests.conftest import ops_per_step


def reference_lamb(
    ws,
    grads,
    steps,
    lr,
    b1,
    b2,
    eps,
    wd,
    trust_clip=10.0,
    centered=False,
    eps_inside_sqrt=False,
    bias_correction=True,
    weight_norm_clip=None,
    max_grad_norm=None,
    adapt_only_decayed=False,
    wd_outside_trust=False,
    norm="l2",
    wds=None,
):
    """LAMB in float64 numpy, one tensor at a time, straight from the formulas."""
    ws = [w.astype(np.float64).copy() for w in ws]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    wds = wds or [wd] * len(ws)
    trusts = []
    for t in range(1, steps + 1):
        gs = [g(t, w) for g, w in zip(grads, ws)]
        if max_grad_norm is not None:
            total = np.sqrt(sum((g**2).sum() for g in gs))
            gs = [g * min(1.0, max_grad_norm / (total + 1e-12)) for g in gs]
        trusts = []
        for i, (w, g) in enumerate(zip(ws, gs)):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            c1 = 1 - b1**t if bias_correction else 1.0
            c2 = 1 - b2**t if bias_correction else 1.0
            mh, vh = ms[i] / c1, vs[i] / c2
            if centered:
                vh = np.maximum(vh - mh * mh, 0.0)
            r = mh / np.sqrt(vh + eps) if eps_inside_sqrt else mh / (np.sqrt(vh) + eps)
            d = wds[i]
            if d and wd_outside_trust:
                w = w * (1 - lr * d)
                s = r
            else:
                s = r + d * w
            if adapt_only_decayed and d == 0:
                q = 1.0
            else:
                if norm == "l2":
                    wn, sn = np.sqrt((w**2).sum()), np.sqrt((s**2).sum())
                else:
                    wn, sn = np.sqrt((w**2).mean()), np.sqrt((s**2).mean())
                if weight_norm_clip is not None:
                    wn = min(wn, weight_norm_clip)
                q = wn / sn if wn > 0 and sn > 0 else 1.0
                if trust_clip is not None:
                    q = min(q, trust_clip)
            trusts.append(q)
            ws[i] = w - lr * q * s
    return ws, trusts


def gradient_fns(seed):
    """Gradients that depend on the step and the weights (a noisy quadratic pull)."""
    rng = np.random.default_rng(seed)
    noise = [rng.standard_normal((50, 4, 3)), rng.standard_normal((50, 3))]
    targets = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
    return [lambda t, w, i=i: (w - targets[i]) + 0.5 * noise[i][t - 1] for i in range(2)]


def run_torch(ws, grads, steps, **opts):
    wds = opts.pop("wds", None)
    params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in ws]
    if wds is None:
        opt = Lamb(params, **opts)
    else:
        groups = [{"params": [p], "weight_decay": d} for p, d in zip(params, wds)]
        opt = Lamb(groups, **opts)
    for t in range(1, steps + 1):
        gs = [g(t, p.detach().numpy()) for g, p in zip(grads, params)]
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params], opt.trust_ratios().tolist()


def initial_weights(seed=0, zero_bias=False):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 3)), np.zeros(3) if zero_bias else rng.standard_normal(3)]


OPTIONS = [
    dict(),
    dict(trust_clip=None),
    dict(trust_clip=1.0),
    dict(centered=True, b1=0.9, b2=0.9),
    dict(centered=True, b1=0.9, b2=0.999),
    dict(eps_inside_sqrt=True, eps=1e-3),
    dict(bias_correction=False, weight_norm_clip=0.5, trust_clip=None),
    dict(max_grad_norm=1.0, adapt_only_decayed=True, trust_clip=None, wds=[0.01, 0.0]),
    dict(wd_outside_trust=True, norm="rms"),
    dict(wd=0.0),
]


@pytest.mark.parametrize(
    "opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_matches_the_numpy_reference_over_many_steps(opts):
    opts = dict(opts)
    b1, b2 = opts.pop("b1", 0.9), opts.pop("b2", 0.99)
    wd = opts.pop("wd", 0.1)
    eps = opts.pop("eps", 1e-6)
    ws0 = initial_weights(1)
    grads = gradient_fns(2)
    ref_w, ref_q = reference_lamb(ws0, grads, 40, 0.02, b1, b2, eps, wd, **opts)
    got_w, got_q = run_torch(
        ws0, grads, 40, lr=0.02, betas=(b1, b2), eps=eps, weight_decay=wd, **opts
    )
    for a, b in zip(got_w, ref_w):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_q, ref_q, rtol=1e-6)  # trust_ratios() is float32


def test_zero_initialised_bias_gets_trust_one_and_cap_holds():
    ws0 = initial_weights(3, zero_bias=True)
    grads = gradient_fns(4)
    params = [torch.nn.Parameter(torch.tensor(w)) for w in ws0]
    opt = Lamb(params, lr=0.01, weight_decay=0.0, trust_clip=10.0)
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g(1, p.detach().numpy()))
    opt.step()
    q = opt.trust_ratios()
    assert q[1].item() == 1.0  # ||w|| = 0: ratio 1, the bias moves by lr per element-ish
    assert 0 < q[0].item() <= 10.0
    # a tiny update against a large weight: the uncapped ratio is huge, the cap holds it at 10
    big = torch.nn.Parameter(torch.full((5,), 100.0))
    opt = Lamb([big], lr=0.01, trust_clip=10.0)
    big.grad = torch.full((5,), 1.0)
    opt.step()
    assert opt.trust_ratios().item() == 10.0


def test_step_length_is_lr_times_weight_norm():
    w = torch.nn.Parameter(torch.randn(20, 20, dtype=torch.float64))
    before = w.detach().clone()
    opt = Lamb([w], lr=0.01, weight_decay=0.01, trust_clip=None)
    w.grad = torch.randn(20, 20, dtype=torch.float64)
    opt.step()
    assert (w.detach() - before).norm().item() == pytest.approx(0.01 * before.norm().item())


def test_one_accumulated_gradient_scale_does_not_change_the_step():
    """LAMB (like Adam) is invariant to rescaling the gradient: a batch-size proxy."""
    outs = []
    for scale in (1.0, 1000.0):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64))
        opt = Lamb([w], lr=0.05, eps=0.0, weight_decay=0.0)
        for t in range(5):
            w.grad = scale * torch.cos(torch.arange(10.0, dtype=torch.float64) + t)
            opt.step()
        outs.append(w.detach().clone())
    assert torch.allclose(outs[0], outs[1])


def test_param_groups_state_dict_and_closure():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    opt = Lamb([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0

    def closure():
        opt.zero_grad()
        loss = (a * a).sum() + (b * 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(3 + 4)
    state = copy.deepcopy(opt.state_dict())  # as torch.save would: no shared tensors
    a2 = torch.nn.Parameter(a.detach().clone())
    b2 = torch.nn.Parameter(b.detach().clone())
    opt2 = Lamb(
        [{"params": [a2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}], lr=0.1
    )
    opt2.load_state_dict(state)
    for o, (x, y) in ((opt, (a, b)), (opt2, (a2, b2))):
        x.grad, y.grad = torch.full((3,), 0.5), torch.full((2,), -1.0)
        o.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert opt2.state[a2]["step"] == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=-0.1), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(-0.1, 0.9)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(trust_clip=0.0), "trust_clip"),
        (dict(trust_clip=-1.0), "trust_clip"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(norm="l1"), "norm"),
    ],
)
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        Lamb([torch.nn.Parameter(torch.ones(1))], **kw)


def test_centered_needs_aligned_betas():
    """With equal betas v_hat - m_hat^2 is a weighted variance (>= 0); with b2 > b1 it goes
    negative when the gradient grows, and the clamp is what keeps the step finite."""

    def min_variance(b1, b2):
        m = v = 0.0
        worst = np.inf
        for t in range(1, 200):
            g = 0.05 * t  # a steadily growing gradient
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            worst = min(worst, v / (1 - b2**t) - (m / (1 - b1**t)) ** 2)
        return worst

    assert min_variance(0.9, 0.9) >= -1e-12
    assert min_variance(0.9, 0.999) < 0


def test_rms_norms_give_the_same_ratio_as_l2():
    ws0 = initial_weights(5)
    grads = gradient_fns(6)
    l2 = run_torch(ws0, grads, 10, lr=0.01, weight_decay=0.05)
    rms = run_torch(ws0, grads, 10, lr=0.01, weight_decay=0.05, norm="rms")
    for a, b in zip(l2[0], rms[0]):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_every_named_variant_constructs_and_steps():
    for name, opts in LAMB_VARIANTS.items():
        w = torch.nn.Parameter(torch.randn(3, 3))
        opt = Lamb([w], lr=0.01, weight_decay=0.01, **opts)
        w.grad = torch.randn(3, 3)
        opt.step()
        assert torch.isfinite(w).all(), name


def test_variants_differ_only_where_they_should():
    ws0 = initial_weights(7)
    grads = gradient_fns(8)
    base = dict(lr=0.02, weight_decay=0.1)
    results = {k: run_torch(ws0, grads, 20, **base, **v)[0] for k, v in LAMB_VARIANTS.items()}
    for a, b in itertools.combinations(["course", "cybertronai", "timm / NVIDIA"], 2):
        assert not np.allclose(results[a][0], results[b][0]), (a, b)


def test_the_inspector_norms_are_those_of_the_step_taken():
    """keep_norms: each row against what the step did, in closed form at step 1 (where
    m_hat = g and v_hat = g^2), for tensors of several shapes in two groups; a tensor without
    a gradient is left alone."""
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (5, 4), (7,), (2, 6)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
    idle = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    groups = [
        {"params": [params[0], params[1], idle], "weight_decay": 0.1},
        {"params": params[2:], "weight_decay": 0.0},
    ]
    lr, eps = 0.01, 1e-6
    opt = Lamb(groups, lr=lr, eps=eps, trust_clip=None)
    opt.keep_norms = True
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    idle_before = idle.detach().clone()
    opt.step()
    assert torch.equal(idle.detach(), idle_before) and idle not in opt.state
    rows = {id(p): row for p, row in zip([*groups[0]["params"], *params[2:]], opt.norms())}
    assert rows[id(idle)] == {}
    for i, (p, g, w) in enumerate(zip(params, grads, before)):
        row = rows[id(p)]
        wd = 0.1 if i < 2 else 0.0
        r = g / (g.abs() + eps)  # m_hat / (sqrt(v_hat) + eps) at step 1
        s = r + wd * w
        trust = w.norm() / s.norm()
        expected = dict(
            grad=g.norm(),
            m_hat=g.norm(),
            r=r.norm(),
            s=s.norm(),
            w=w.norm(),
            trust=trust,
            update=(w - p.detach()).norm(),
        )
        for key, value in expected.items():
            assert row[key] == pytest.approx(value.item(), rel=1e-6), (shapes[i], key)
        assert row["update"] == pytest.approx(lr * w.norm().item(), rel=1e-6)
        torch.testing.assert_close(p.detach(), w - lr * trust * s)


@pytest.mark.parametrize("variant", ["course", "fastai", "timm / NVIDIA"])
def test_a_step_issues_as_many_operations_for_forty_tensors_as_for_four(variant):
    """One torch._foreach_* operation per line of the algorithm, over all tensors of a group:
    on a GPU each operation is a kernel launch, and a loop over tensors issued ~20 per tensor
    (684 operations a step for the gpu profile's model, 49 in the foreach form)."""

    def ops(n_tensors: int) -> int:
        return ops_per_step(
            lambda params: Lamb(params, lr=0.01, weight_decay=0.1, **LAMB_VARIANTS[variant]),
            n_tensors,
        )

    few, many = ops(4), ops(40)
    assert few == many, (few, many)
    assert few <= 40  # 24 - 34 for the named variants


def test_a_variants_own_betas_and_eps_win_over_the_run_settings():
    """The engine builds LAMB from the run's lr, betas and eps, and a variant that names its own
    (the centred one: aligned betas, a larger eps) keeps them."""
    from lessons.compute import resolve
    from lessons.config import TrainConfig
    from lessons.train import build_model_and_optimizer

    c = TrainConfig.from_profile(
        "ci",
        optimizer="lamb",
        lr=0.02,
        betas=(0.9, 0.999),
        eps=1e-6,
        opt_options=LAMB_VARIANTS["centred"],
    )
    cpu = torch.device("cpu")
    group = build_model_and_optimizer(c, resolve(c, cpu), 10)[1].param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (0.02, (0.9, 0.9), 1e-3)
    assert group["centered"] and group["trust_clip"] == 10.0
    plain = TrainConfig.from_profile("ci", optimizer="lamb", lr=0.02, eps=1e-6)
    group = build_model_and_optimizer(plain, resolve(plain, cpu), 10)[1].param_groups[0]
    assert group["eps"] == 1e-6
