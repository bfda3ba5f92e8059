"""Mixed precision for training: the autocast context and the fp16 gradient scaler (the choice of dtype is
matelike.device.training_dtype's)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

from matelike.device import torch_dtype, training_dtype


@dataclass
class Precision:
    """Autocast settings and scaler for one run; master weights always stay fp32."""

    name: str  # fp32 | bf16 | fp16
    device: torch.device
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, dtype: str, device: torch.device) -> "Precision":
        name = training_dtype(dtype, device)
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name=name, device=device, scaler=scaler)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.name)

    def autocast(self) -> ContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.torch_dtype)
