"""Optimizers: AdamW, and Muon for the hidden weight matrices with AdamW for everything else.

Muon (Keller Jordan; used by modded-nanogpt and nanochat) replaces each hidden matrix's momentum by its nearest
semi-orthogonal matrix, computed with a few Newton-Schulz iterations. Embeddings, the output head, norms and biases
keep AdamW, as in those projects: their gradients are not "matrix-shaped" updates of a linear map.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from matelike.train.config import TrainConfig

# Names of parameters that stay on AdamW even when 2-D: token embeddings and the output heads (the LM head, and
# the reward model's (1, dim) `score`, whose Newton-Schulz "orthogonalisation" would only normalise the row).
_ADAM_ONLY_HINTS = ("embed", "lm_head", "output", "wte", "tok_", "score")


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of `g` (quintic iteration of Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """One optimizer with two kinds of groups: `use_muon=True` (Muon) and `use_muon=False` (AdamW).

    Keeping both in one object keeps one state_dict and one schedule for checkpoints and resume.
    """

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        for group in param_groups:
            if group["use_muon"]:
                group.setdefault("momentum", 0.95)
                group.setdefault("ns_steps", 5)
            else:
                group.setdefault("betas", (0.9, 0.95))
                group.setdefault("eps", 1e-8)
            group.setdefault("weight_decay", 0.0)
        super().__init__(param_groups, {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102 - torch API
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if type(p).__name__ == "DTensor":
                    raise RuntimeError("--optimizer muon does not support --fsdp sharded parameters; use adamw")
                state = self.state[p]
                if group["use_muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                    update = newton_schulz(update, group["ns_steps"])
                    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr * scale)
                else:
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    b1, b2 = group["betas"]
                    state["step"] += 1
                    t = float(state["step"])
                    state["exp_avg"].lerp_(p.grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


def _split(named: Iterable[tuple[str, nn.Parameter]]) -> tuple[list, list, list]:
    """(hidden matrices, other matrices (embeddings/head), vectors (norms, biases))."""
    hidden, other_2d, vectors = [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            vectors.append(p)
        elif any(h in name.lower() for h in _ADAM_ONLY_HINTS):
            other_2d.append(p)
        else:
            hidden.append(p)
    return hidden, other_2d, vectors


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decay on matrices, none on vectors) or Muon+AdamW, per `config.optimizer`.

    Each group carries `peak_lr`, which the schedule scales.
    """
    # Tied weights appear once in named_parameters, so nothing is optimized twice.
    hidden, other_2d, vectors = _split(model.named_parameters())
    betas = (config.beta1, config.beta2)
    if config.optimizer == "adamw":
        groups = [
            {"params": hidden + other_2d, "weight_decay": config.weight_decay, "peak_lr": config.lr},
            {"params": vectors, "weight_decay": 0.0, "peak_lr": config.lr},
        ]
        groups = [g for g in groups if g["params"]]
        # The fused kernel (CPU and CUDA) is one pass over each tensor, where the default per-tensor loop is
        # a noticeable share of a small model's training step.
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=True)
    groups = [
        {"params": hidden, "use_muon": True, "weight_decay": config.weight_decay, "peak_lr": config.muon_lr,
         "lr": config.muon_lr},
        {"params": other_2d, "use_muon": False, "weight_decay": config.weight_decay, "peak_lr": config.lr,
         "lr": config.lr, "betas": betas},
        {"params": vectors, "use_muon": False, "weight_decay": 0.0, "peak_lr": config.lr, "lr": config.lr,
         "betas": betas},
    ]
    return Muon([g for g in groups if g["params"]])
