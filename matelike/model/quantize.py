"""Weight-only int8 quantization for inference: `--quantize int8` of generate, chat, serve, eval and make-pairs.

Each `nn.Linear` weight becomes int8 with one scale per output row (symmetric, absmax / 127: the layout of
llama.cpp's q8_0 at the granularity of torchao's int8 weight-only). A decode step of a small model is bound
by reading its weights, so a quarter of fp32's bytes makes it faster, and `torch.ops.aten._weight_int8pack_mm`
multiplies bf16 activations by the int8 rows without ever materialising a float copy of the weights.
That kernel is fast for a few rows and slow for many, so longer prefill chunks dequantize the layer's
weight instead and run an ordinary matrix product. Which path a call takes depends only on its own shape, and
the kernel computes every row independently, so a greedy answer is the same alone or batched.

The embedding lookup, the norms and the routed experts of a mixture-of-experts model stay in the loaded
dtype; the router and the shared expert's gate stay too (a rounding there changes which experts run).
Training never sees a quantized model: the weights are not parameters any more. The kernel is a CPU one; on a
GPU every call dequantizes its weight (less memory, no speed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from matelike.device import QUANTIZE

# Rows up to which a multi-token call still takes the int8 kernel: its time grows with every row, while a
# dequantized weight costs the same for any number of rows and then runs the dense product's fast kernels.
KERNEL_MAX_ROWS = 32
# Linear layers kept in the loaded dtype: they decide which experts run.
KEEP = ("router", "shared_gate")


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is int8 with a per-output-row scale; outputs in the input's dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        # The kernel takes its scales in the activation dtype and runs in bf16 (its fp32 path is not vectorised):
        # rows are rounded with the bf16 scale itself, so each weight is off by at most half a step (bf16 rounding
        # lowers a scale by at most 2^-8, so the largest weight stays under 127.5 steps and is never clamped).
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as `dtype`: what the int8 rows and their scales stand for."""
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        decode_step = x.dim() > 1 and x.shape[-2] == 1
        if x.device.type == "cpu" and (decode_step or flat.shape[0] <= KERNEL_MAX_ROWS):
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scale).to(x.dtype)
        else:
            y = F.linear(flat, self.dequantized(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every bias-free `nn.Linear` (but the router and shared gate) by an Int8Linear, in place.

    A tied output projection gets its own int8 copy; the embedding it shares with keeps its dtype. Returns
    the model, in eval mode.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module.bias is None and not name.endswith(KEEP)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module.weight))
    return model.eval()


def apply_quantize(model: nn.Module, name: str) -> nn.Module:
    """The model as `--quantize NAME` asks for it (none: unchanged)."""
    if name not in QUANTIZE:
        raise ValueError(f"--quantize {name!r}: choose one of {', '.join(QUANTIZE)}")
    return quantize_int8(model) if name == "int8" else model
