"""Optimizers and learning-rate schedule for `moela train`: AdamW, optionally Muon for the matrices.

    optimizers = build_optimizers(named_params, kind="muon", weight_decay=0.1)
    set_lr(optimizers, lr_at(step, total_steps, peak_lr=3e-3, warmup=100, min_ratio=0.1))

With "muon", every weight matrix inside the blocks (attention, MLPs, the stacked experts treated as
one matrix per expert) is updated by Muon; embedding, output head, router and norms stay on AdamW.
Muon's update is rescaled as in Moonlight (0.2 * sqrt(max(out, in))) so both share one learning rate.
"""

import math
from collections.abc import Iterable

import torch
from torch import nn


def lr_at(step: int, total: int, peak_lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * peak_lr at `total`."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz quintic iteration toward the nearest semi-orthogonal matrix, batched over [..., m, n]."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Jordan et al., 2024), Nesterov momentum, decoupled decay."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"].mul_(mu).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=mu))
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape[-2:])))


def build_optimizers(named_params: Iterable[tuple[str, nn.Parameter]], kind: str, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.95)) -> list[torch.optim.Optimizer]:
    """[AdamW] or [AdamW, Muon]; weight decay on matrices only (not norms)."""
    decay, no_decay, muon = [], [], []
    for name, p in named_params:
        on_adam = p.ndim < 2 or name.endswith(("embed.weight", "head.weight", "gate.weight"))
        if kind == "muon" and not on_adam:
            muon.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, betas=betas, fused=False)]
    if muon:
        optimizers.append(Muon(muon, weight_decay=weight_decay))
    return optimizers
