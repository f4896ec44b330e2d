"""Optimizers the lessons open up: LAMB (with the variants of well-known implementations as
options of one class).

LAMB, per parameter tensor w with gradient g at step t (You et al. 2019, in the order of the
"EMA and batch size" blog):

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)
    r = m_hat / (sqrt(v_hat) + eps)  (or / sqrt(v_hat + eps), or the centred v_hat - m_hat^2)
    s = r + weight_decay * w
    trust = ||w|| / ||s||  (1 where a norm is 0; at most trust_clip)
    w = w - lr * trust * s

so the step has length lr * ||w||: the learning rate is a relative change per step.

Variants (each an option here, no copies):
- fastai: trust ratio capped at 10, norms as RMS (the ratio is the same: both tensors have
  the same number of elements), decoupled weight decay applied before the step, outside the
  trust ratio (``wd_outside_trust=True``).
- cybertronai/pytorch-lamb and torch-optimizer: no bias correction
  (``bias_correction=False``), the weight norm (not the ratio) clamped at 10
  (``weight_norm_clip=10``, ``trust_clip=None``): You et al.'s ratio is
  phi(||w||) / ||s|| with phi a clip of the weight norm, whose bounds the paper leaves open.
- timm and NVIDIA FusedLAMB: the global gradient norm clipped at 1 first
  (``max_grad_norm=1.0``) and the trust ratio applied only to parameters with weight decay
  (``adapt_only_decayed=True``); timm's ``trust_clip=True`` caps the ratio at 1.
"""

from __future__ import annotations

import math

import torch

from lessons.moments import advance_moments, check_adam_args

NORMS = ("l2", "rms")

# name -> Lamb options; "course" is the algorithm as written above with the fast.ai cap of 10
LAMB_VARIANTS: dict[str, dict] = {
    "course": dict(trust_clip=10.0),
    "no cap": dict(trust_clip=None),
    # the blog's centred variant: betas aligned, else v_hat - m_hat^2 goes negative; a larger
    # eps, since the variance of a few recent gradients can be ~0 and r = m_hat / eps then
    "centred": dict(trust_clip=10.0, centered=True, betas=(0.9, 0.9), eps=1e-3),
    "fastai": dict(trust_clip=10.0, norm="rms", wd_outside_trust=True),
    "cybertronai": dict(trust_clip=None, bias_correction=False, weight_norm_clip=10.0),
    "timm / NVIDIA": dict(trust_clip=None, max_grad_norm=1.0, adapt_only_decayed=True),
    "timm trust_clip": dict(trust_clip=1.0, max_grad_norm=1.0, adapt_only_decayed=True),
}


class Lamb(torch.optim.Optimizer):
    """LAMB with a per-tensor trust ratio; the last ratio of every parameter is kept in
    ``self.state[p]["trust"]`` (a 0-dim tensor, no host sync) and ``trust_ratios()``.

    A step takes the tensors of a group together (``torch._foreach_*``): on a GPU a loop over
    the tensors would launch a kernel per tensor and operation."""

    DEFAULT_TRUST_CLIP = 10.0  # the fast.ai cap

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_clip: float | None = DEFAULT_TRUST_CLIP,
        centered: bool = False,
        eps_inside_sqrt: bool = False,
        *,
        bias_correction: bool = True,
        weight_norm_clip: float | None = None,
        max_grad_norm: float | None = None,
        adapt_only_decayed: bool = False,
        wd_outside_trust: bool = False,
        norm: str = "l2",
    ):
        check_adam_args(lr, betas, eps, weight_decay)
        for name, value in (
            ("trust_clip", trust_clip),
            ("weight_norm_clip", weight_norm_clip),
            ("max_grad_norm", max_grad_norm),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            trust_clip=trust_clip,
            centered=centered,
            eps_inside_sqrt=eps_inside_sqrt,
            bias_correction=bias_correction,
            weight_norm_clip=weight_norm_clip,
            max_grad_norm=max_grad_norm,
            adapt_only_decayed=adapt_only_decayed,
            wd_outside_trust=wd_outside_trust,
            norm=norm,
        )
        super().__init__(params, defaults)
        self.keep_norms = False  # set True to keep each tensor's norms of the last step

    NORM_KEYS = ("grad", "m_hat", "r", "s", "w", "trust", "update")

    def _grad_scale(self) -> torch.Tensor | None:
        """timm / NVIDIA: one factor for all gradients so that their global norm is <= max."""
        limit = self.param_groups[0]["max_grad_norm"]
        if limit is None:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return torch.clamp(limit / (total + 1e-12), max=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._grad_scale()
        for group in self.param_groups:
            self._step_group(group, scale)
        return loss

    def _step_group(self, group: dict, scale: torch.Tensor | None) -> None:
        """One step of every tensor of a group at once, in torch._foreach_* ops: each line
        below is one operation over the whole list of tensors, where a loop over tensors
        issued about 20 operations per tensor (on a GPU, a kernel launch each)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("Lamb does not support sparse gradients")
        grads = [p.grad for p in params]
        if scale is not None:
            grads = torch._foreach_mul(grads, scale)
        b1, b2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        states, m, v = advance_moments(self, params)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        if group["bias_correction"]:
            m_hat = torch._foreach_div(m, [1 - b1 ** state["step"] for state in states])
            v_hat = torch._foreach_div(v, [1 - b2 ** state["step"] for state in states])
        else:  # the moments themselves: nothing below writes into m_hat or v_hat
            m_hat, v_hat = m, v
        if group["centered"]:  # the variance; negative (clamped) when betas differ
            v_hat = torch._foreach_sub(v_hat, torch._foreach_mul(m_hat, m_hat))
            torch._foreach_clamp_min_(v_hat, 0.0)
        if group["eps_inside_sqrt"]:
            denom = torch._foreach_sqrt(torch._foreach_add(v_hat, eps))
        else:
            denom = torch._foreach_sqrt(v_hat)
            torch._foreach_add_(denom, eps)
        r = torch._foreach_div(m_hat, denom)
        if wd and group["wd_outside_trust"]:
            torch._foreach_mul_(params, 1 - lr * wd)  # fastai: decoupled decay first
            s = r
        else:
            s = torch._foreach_add(r, params, alpha=wd) if wd else r
        if group["adapt_only_decayed"] and not wd:
            trust = torch.ones(len(params), device=params[0].device, dtype=params[0].dtype)
        else:
            w_norm = self._norms(params, group["norm"])
            s_norm = self._norms(s, group["norm"])
            if group["weight_norm_clip"] is not None:
                w_norm = w_norm.clamp(max=group["weight_norm_clip"])
            ok = (w_norm > 0) & (s_norm > 0)
            trust = torch.where(ok, w_norm / torch.where(ok, s_norm, 1.0), 1.0)
            if group["trust_clip"] is not None:
                trust = trust.clamp(max=group["trust_clip"])
        trusts = trust.unbind()  # views: one 0-dim tensor per parameter, no copy
        for state, q in zip(states, trusts):
            state["trust"] = q
        if self.keep_norms:  # for the step inspector: ||g||, ||m_hat||, ... as tensors
            before = [torch.stack(torch._foreach_norm(x)) for x in (grads, m_hat, r, s, params)]
        torch._foreach_mul_(s, trusts)  # s is a new list here (r or r + wd w), never m or v
        if self.keep_norms:
            update = torch.stack(torch._foreach_norm(s)) * lr
            rows = torch.stack([*before, trust, update], dim=1).float()
            for state, row in zip(states, rows.unbind()):
                state["norms"] = row
        torch._foreach_add_(params, s, alpha=-lr)

    @staticmethod
    def _norms(tensors: list[torch.Tensor], kind: str) -> torch.Tensor:
        """The norm of each tensor, as one vector: L2, or RMS (L2 / sqrt(numel))."""
        norms = torch._foreach_norm(tensors)
        if kind == "rms":
            norms = torch._foreach_mul(norms, [1 / math.sqrt(t.numel()) for t in tensors])
        return torch.stack(norms)

    def norms(self) -> list[dict]:
        """Per parameter, the norms of the last step (needs ``keep_norms = True``):
        ||g||, ||m_hat||, ||r||, ||s||, ||w|| (before the step), trust ratio, ||update||."""
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                values = self.state[p]["norms"].tolist() if "norms" in self.state[p] else None
                rows.append(dict(zip(self.NORM_KEYS, values)) if values else {})
        return rows

    def trust_ratios(self) -> torch.Tensor:
        """The last trust ratio of every parameter (in param_groups order; 1 before a step)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                t = self.state[p].get("trust") if p in self.state else None
                out.append(t if t is not None else torch.ones((), device=p.device))
        return torch.stack(out).float()
