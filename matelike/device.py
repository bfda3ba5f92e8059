"""Where and in what precision a command runs: the one owner of `--device`, `--dtype` and `--quantize`.

Every command takes the same two flags with the same spellings and defaults (`auto`). Training reads
`--dtype` as the autocast precision (master weights stay fp32, see matelike.train.precision); inference
commands read it as the dtype the weights are loaded in.

torch is imported inside the functions: the command line imports this module to add the flags.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
QUANTIZE: tuple[str, ...] = ("none", "int8")
DEVICE_HELP = "auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N"


def add_device_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, training: bool = False,
                    compile_decode: bool = False) -> None:
    """Add `--device` and `--dtype`, both defaulting to auto, and for inference `--quantize` (default none);
    `compile_decode`: also `--compile` (decode steps through torch.compile), for the commands that stream
    answers to a user (generate, chat, serve)."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    if training:
        help_ = ("auto: bf16 autocast on bf16 GPUs and on CPUs where bf16 is faster (AMX), fp16 with a gradient "
                 "scaler on older GPUs, else fp32")
    else:
        help_ = ("weights dtype. auto: bf16 on bf16 GPUs and on CPUs where bf16 is faster (AMX), fp16 on older "
                 "GPUs, else fp32")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help=help_)
    if not training:
        parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                            help="int8: weight-only int8 linear layers (one scale per output row) for faster "
                                 "decoding on CPU; answers can differ slightly from the unquantized model's "
                                 "(default none; matelike.model.quantize)")
    if compile_decode:
        parser.add_argument("--compile", action="store_true",
                            help="run decode steps through torch.compile with the weights frozen into the graph: "
                                 "faster steps after compiling for tens of seconds (serve compiles before it takes "
                                 "requests); greedy answers can differ from eager ones in the "
                                 "last bits")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for `--device NAME`; a torchrun process takes GPU `local_rank` for a bare `cuda`.

    Raises ValueError for an unknown name or a GPU that is not there.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device ({DEVICE_HELP})") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} but no GPU is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_bf16_is_faster() -> bool:
    """True when bf16 beats fp32 on this CPU: with AMX tiles.

    With AVX512-BF16 alone the dot-product instructions barely outrun fp32 FMA and autocast adds a cast of
    every weight in every step (`matelike bench train` shows the ratio), so auto keeps fp32 there.
    """
    import torch

    return torch.backends.mkldnn.is_available() and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_description() -> str:
    """The CPU's model name and its bf16 matrix support, e.g. "Intel(R) Xeon(R) Processor (AMX)": figures
    measured on CPU depend on both, and `--dtype auto` chooses by the second."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:  # not Linux: the platform's own name
        pass
    import torch

    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    avx = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return f"{name} ({'AMX' if amx else 'AVX512-BF16, no AMX' if avx else 'no bf16 matrix instructions'})"


def training_dtype(name: str, device: torch.device) -> str:
    """Map --dtype (auto|fp32|bf16|fp16) to the autocast precision for training on `device`.

    auto: bf16 on GPUs that support it, else fp16 with a gradient scaler; on CPU bf16 where it is faster than
    fp32 (AMX), else fp32.
    """
    import torch

    _check(name)
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ValueError("--dtype fp16 needs a GPU; use bf16 or fp32 on CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_is_faster() else "fp32"
    return "fp32"


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype inference commands load weights in under --dtype NAME: auto picks as training does (bf16 on
    GPUs that have it, else fp16; on CPU bf16 where it is faster, else fp32), as vLLM's auto runs fp32
    checkpoints in half precision on GPUs."""
    return torch_dtype(training_dtype(name, device))


def torch_dtype(name: str) -> torch.dtype:
    """fp32|bf16|fp16 as a torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _check(name: str) -> None:
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
