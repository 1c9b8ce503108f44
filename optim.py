"""SimCLR's optimiser: LARS with its parameter groups, and the learning-rate schedule (linear
warm-up, then cosine decay, set every step; SimCLR v1 appendix B.1).

A leaf file: it imports only torch and the standard library, so it can be copied alone into any
project.

    groups = parameter_groups(model, weight_decay=1e-6)
    opt = LARS(groups, lr=scaled_lr(1.0, 256), momentum=0.9, weight_decay=1e-6)
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, total, warmup, scaled_lr(1.0, 256))
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["LARS", "parameter_groups", "learning_rate", "scaled_lr"]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it: SGD with momentum where each weight tensor's step
    is scaled by trust = eta * ||w|| / ||g + wd * w||.

    Groups with `lars=False` (biases and batch-norm parameters) get neither weight decay nor the
    trust ratio, as in SimCLR: their norms say nothing about a good step size, and decaying a BN
    scale only fights the normalisation. The update is vectorised over tensors with torch._foreach.

        g' = g + wd * w;   r = eta * ||w|| / ||g'|| (1 where a norm is 0);   v = m * v + lr * r * g';   w -= v
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"LARS: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got {lr}, {weight_decay}, {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                w_norms = torch._foreach_norm(params)
                g_norms = torch._foreach_norm(grads)
                eta = group["trust_coefficient"]
                trust = [torch.where((w > 0) & (g > 0), eta * w / g, torch.ones_like(w))
                         for w, g in zip(w_norms, g_norms)]
                grads = torch._foreach_mul(grads, trust)
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads, alpha=group["lr"])
            torch._foreach_sub_(params, bufs)
        return loss


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into those that get weight decay and LARS adaptation (weights of conv and
    linear layers) and those that do not (biases and batch-norm parameters: every tensor of ndim <= 1)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay, lars=True),
            dict(params=no_decay, weight_decay=0.0, lars=False)]


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    Evaluated every iteration (SimCLR v1 appendix B.1), never once per epoch."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scaled_lr(base_lr: float, batch_size: int, scaling: str = "linear") -> float:
    """SimCLR's learning-rate scaling: linear base * B/256, or square-root base * sqrt(B)."""
    return base_lr * batch_size / 256 if scaling == "linear" else base_lr * math.sqrt(batch_size)
