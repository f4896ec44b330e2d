"""Batch-size-invariant AdamW (Wang & Aitchison, "Batch size invariant Adam"): v averages the
squared micro-batch gradients instead of squaring their mean, so v does not depend on how many
micro-batches make a mini-batch."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lessons.moments import advance_moments, check_adam_args


class InvariantAdamW(torch.optim.Optimizer):
    """Batch-size-invariant AdamW (Wang & Aitchison): square the micro-batch gradients first,
    then average.

    Call ``loss.backward()`` on each micro-batch (its loss the micro-batch mean) and then
    ``accumulate()``, which adds the gradient and its square to running sums and clears it;
    ``step()`` updates m with the mean gradient and v with the mean of the squared micro-batch
    gradients (standard Adam squares the mean instead), with AdamW's bias correction and
    decoupled weight decay, then resets the sums. With one accumulate() per step this is
    exactly torch.optim.AdamW.

    ``skip_nonfinite`` (set by the engine under float16 loss scaling): a step whose sums hold
    an inf or NaN (a micro-batch's gradients overflowed) is skipped, as torch.amp.GradScaler
    skips other optimizers' steps: the sums are cleared and nothing else changes, the step
    count included; ``skipped_steps`` counts them. The check costs one host sync a step.

    ``process_group`` (for example ``torch.distributed.group.WORLD``): the micro-batches of a
    step live on several ranks. ``step()`` first sums, across the group's ranks, the running
    sums of g and g^2 and the micro-batch counts, in one all_reduce of one flat buffer (per
    device and dtype), so every rank takes the step of one process that accumulated all ranks'
    micro-batches: the mean is over micro-batches, so ranks may hold different numbers of them.
    That is twice the bytes of data-parallel Adam's gradient all-reduce (the squares travel too)
    and one host sync a step (the count). Every parameter that requires grad then takes part in
    every step, so that all ranks reduce the same buffer; a group of one rank is the same as none.

    Beside DDP: DDP averages the gradients across ranks during ``backward()``, and squaring that
    average is standard Adam's v again. Either give the model no DDP wrapper and let this
    optimizer do the reduction (the ranks' replicas stay equal because every rank takes the same
    step from the same start: broadcast the parameters once), or run every micro-batch's
    ``backward()`` under ``model.no_sync()``::

        opt = InvariantAdamW(model.parameters(), lr=1e-3, process_group=dist.group.WORLD)
        for xb, yb in my_micro_batches:  # this rank's share of the batch
            F.cross_entropy(model(xb), yb).backward()
            opt.accumulate()
        opt.step()  # the same step on every rank
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        skip_nonfinite: bool = False,
        process_group=None,
    ):
        check_adam_args(lr, betas, eps, weight_decay)
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )
        self.micro_batches = 0
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.process_group = process_group

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the current gradients (one micro-batch) and their squares; clear them."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        sums, squares = self._sums(params)
        grads = [p.grad for p in params]
        torch._foreach_add_(sums, grads)
        torch._foreach_addcmul_(squares, grads, grads)
        for p in params:
            p.grad = None
        self.micro_batches += 1

    def _sums(self, params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The running sums of the gradients and of their squares, made where missing."""
        for p in params:
            state = self.state[p]
            if "grad_sum" not in state:
                state["grad_sum"] = torch.zeros_like(p)
                state["grad_sq_sum"] = torch.zeros_like(p)
        return (
            [self.state[p]["grad_sum"] for p in params],
            [self.state[p]["grad_sq_sum"] for p in params],
        )

    def _sum_tensors(self) -> list[torch.Tensor]:
        """Every running sum there is, of gradients and of their squares."""
        return [
            self.state[p][key]
            for group in self.param_groups
            for p in group["params"]
            if "grad_sum" in self.state[p]
            for key in ("grad_sum", "grad_sq_sum")
        ]

    def _reduced_count(self) -> int:
        """The micro-batches of this step over the process group's ranks, their sums of g and
        g^2 added up in place on every rank: one all_reduce per device and dtype. Without a
        group, this rank's own count."""
        if self.process_group is None:
            return self.micro_batches
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self._sums(params)  # every rank reduces the same tensors, in the same order
        sums = self._sum_tensors()
        count = torch.tensor([float(self.micro_batches)], device=sums[0].device)
        count = count.to(sums[0].dtype)
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for t in [count, *sums]:  # the count rides with the first bucket
            buckets.setdefault((t.device, t.dtype), []).append(t)
        for tensors in buckets.values():
            flat = _flatten_dense_tensors(tensors)
            dist.all_reduce(flat, group=self.process_group)
            torch._foreach_copy_(tensors, _unflatten_dense_tensors(flat, tensors))
        return round(count.item())

    @staticmethod
    def _all_finite(sums: list[torch.Tensor]) -> bool:
        """Whether none of ``sums`` (at least one) holds an inf or NaN (one host sync)."""
        return bool(torch.stack(torch._foreach_norm(sums, math.inf)).isfinite().all())

    @torch.no_grad()
    def accumulate_many(self, grads) -> None:
        """Add several micro-batches at once: ``grads`` holds, for every parameter in
        param_groups order, a tensor [micro-batches, *parameter shape] (as torch.func.vmap
        gives them)."""
        params = [p for group in self.param_groups for p in group["params"]]
        if len(grads) != len(params):
            raise ValueError(
                f"need one stacked gradient per parameter ({len(params)}), got {len(grads)}"
            )
        for p, g in zip(params, grads):
            if g.shape[1:] != p.shape:
                raise ValueError(
                    f"a stacked gradient of shape {tuple(g.shape)} does not fit a "
                    f"parameter of shape {tuple(p.shape)}"
                )
        sums, squares = self._sums(params)
        torch._foreach_add_(sums, [g.sum(0) for g in grads])
        torch._foreach_add_(squares, [g.square().sum(0) for g in grads])
        self.micro_batches += grads[0].shape[0] if grads else 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.accumulate()
        k = self._reduced_count()
        if k == 0:
            raise RuntimeError(
                "InvariantAdamW.step() needs at least one accumulate(): call loss.backward() "
                "and then opt.accumulate() for every micro-batch, then opt.step()"
            )
        everything = self._sum_tensors() if self.skip_nonfinite else []
        if everything and not self._all_finite(everything):
            torch._foreach_zero_(everything)
            self.micro_batches = 0
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:  # each line one torch._foreach_* op over the group
            params = [p for p in group["params"] if "grad_sum" in self.state[p]]
            if not params:
                continue
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            states, m, v = advance_moments(self, params)
            sums = [state["grad_sum"] for state in states]
            squares = [state["grad_sq_sum"] for state in states]
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m, torch._foreach_div(sums, k), 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_add_(v, torch._foreach_div(squares, k), alpha=1 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1 - b2 ** state["step"]) for state in states])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(
                params, m, denom, [-lr / (1 - b1 ** state["step"]) for state in states]
            )
            torch._foreach_zero_(sums)
            torch._foreach_zero_(squares)
        self.micro_batches = 0
        return loss
