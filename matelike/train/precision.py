"""Mixed precision: which dtype `--dtype auto` picks, the autocast context and the fp16 gradient scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_bf16_is_faster() -> bool:
    """True when bf16 autocast beats fp32 on this CPU: with AMX tiles (about 3x in oneDNN's matmuls).

    With AVX512-BF16 alone the dot-product instructions barely outrun fp32 FMA and autocast adds a cast of every
    weight in every step: measured on a 2-core AVX512-BF16 Xeon without AMX, the 26m preset trained at 42 tok/s
    in bf16 against 67 in fp32 (`matelike bench train`), so auto keeps fp32 there.
    """
    return torch.backends.mkldnn.is_available() and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_dtype(name: str, device: torch.device) -> str:
    """Map --dtype (auto|fp32|bf16|fp16) to the concrete choice for `device`.

    auto: bf16 on GPUs that support it, else fp16 with a gradient scaler; on CPU bf16 where it is faster than
    fp32 (AMX), else fp32.
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ValueError("--dtype fp16 needs a GPU; use bf16 or fp32 on CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_is_faster() else "fp32"
    return "fp32"


@dataclass
class Precision:
    """Autocast settings and scaler for one run; master weights always stay fp32."""

    name: str  # fp32 | bf16 | fp16
    device: torch.device
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, dtype: str, device: torch.device) -> "Precision":
        name = resolve_dtype(dtype, device)
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name=name, device=device, scaler=scaler)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self) -> ContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.torch_dtype)
