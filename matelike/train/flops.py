"""FLOP accounting for MFU: the model's training FLOPs per token and the machine's measured matmul peak."""

from __future__ import annotations

import time

import torch
from torch import nn


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward+backward FLOPs per token: the model's own count when it has one, else 6 x parameters."""
    fn = getattr(model, "flops_per_token", None)
    if callable(fn):
        return float(fn(seq_len))
    return 6.0 * sum(p.numel() for p in model.parameters())


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, *, size: int = 2048, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of square matmuls of `size` in `dtype` on `device` (what MFU is measured against)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm up kernels / thread pools
        a @ b
    sync()
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(4):
            a @ b
        n += 4
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * size**3 * n / elapsed
