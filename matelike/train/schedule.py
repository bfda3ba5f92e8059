"""Learning-rate schedule: linear warmup from 0, then a cosine down to min_lr."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate after `step` updates: 0 at step 0, `lr` at the end of warmup, `min_lr` at `total_steps`.

    Update number t (1-based) uses lr_at(t), so the very first update already moves the weights and the last
    one uses min_lr.
    """
    if step <= 0:
        return 0.0 if warmup_steps > 0 else lr
    if step < warmup_steps:
        return lr * step / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each param group's lr; groups scale the schedule by their own peak (`group["peak_lr"]`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                 total_steps: int) -> None:
        self.optimizer = optimizer
        self.lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", lr)
        self._apply()

    def factor(self, step: int) -> float:
        """Schedule value at `step` relative to the peak (1.0 at the end of warmup)."""
        if self.lr == 0:
            return 0.0
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps) / self.lr

    def _apply(self) -> None:
        f = self.factor(self.step_count + 1)  # the lr the next update will use
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        """The lr (peak-lr group) the next update uses."""
        return self.lr * self.factor(self.step_count + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # total_steps comes from the current flags, so extending --max-steps on resume reshapes the tail.
        self.step_count = int(state["step_count"])
        self._apply()
