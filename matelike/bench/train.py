"""`matelike bench train`: training tokens/s and MFU through the real engine, plus the 0.2b memory figure.

1. Measures this machine's bf16 and fp32 matmul peak (square matmuls, the ceiling MFU is measured against).
2. Trains the preset (random weights, random tokens in memory) with the shared Trainer for each dtype, with and
   without torch.compile, with the chunked projection + loss the training stages use (`fused`) and with full
   logits then cross-entropy (`logits`); tokens/s is the median of the engine's own per-step figures after
   warmup steps.
   MFU = tokens/s x model FLOPs per token (6N + attention, `Transformer.flops_per_token`) / peak.
3. Peak memory of one training step of the `0.2b` preset at batch 1, context 512, bf16 autocast, AdamW, in a
   fresh subprocess: on GPU torch's max allocated bytes, on CPU the growth of peak RSS over the process's
   baseline after imports (weights + gradients + optimizer state + activations + allocator slack).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from matelike.device import DEVICE_HELP

if TYPE_CHECKING:
    from matelike.cli import CommandTable


class RandomTokens:
    """Engine Task of random token windows kept in memory, so the figure is the model and engine alone."""

    weight_by_tokens = True

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, fused: bool = True) -> None:
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.fused = fused

    def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[Any, int]]:
        import torch

        i = int(cursor or 0)
        g = torch.Generator().manual_seed(rank)
        while True:
            yield torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=g), i + 1
            i += 1

    def loss(self, model: Any, batch: Any) -> tuple[Any, dict, int]:
        out = model(batch[:, :-1], batch[:, 1:], return_logits=not self.fused)
        return out.loss, {}, batch.shape[0] * (batch.shape[1] - 1)


def measure_run(preset: str, dtype: str, compile_: bool, batch_size: int, seq_len: int, steps: int,
                warmup: int, device: str, fused: bool = True) -> dict[str, Any]:
    """Train `warmup + steps` steps through the Trainer; returns tokens/s and step time after warmup."""
    import torch

    from matelike.model.transformer import Transformer, get_preset
    from matelike.train import TrainConfig, Trainer, seed_everything

    with tempfile.TemporaryDirectory(prefix="matelike-bench-train-") as tmp:
        config = TrainConfig(out=Path(tmp), max_steps=warmup + steps, batch_size=batch_size, seq_len=seq_len,
                             dtype=dtype, compile=compile_, log_every=1, save_every=10**9, keep=1,
                             warmup_steps=1, progress=False, device=device)
        seed_everything(0)
        cfg = get_preset(preset, max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
        model = Transformer(cfg)
        trainer = Trainer(config, model, None, RandomTokens(cfg.vocab_size, batch_size, seq_len, fused),
                          export=None)
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        flops = model.flops_per_token(seq_len)
        precision = trainer.precision.name
        del trainer, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tps = statistics.median(m["tokens_per_s"] for m in lines[warmup:])
    return {"dtype": precision, "compile": compile_, "loss": "fused" if fused else "logits",
            "tokens_per_s": round(tps, 1), "step_s": round(batch_size * seq_len / tps, 4),
            "flops_per_token": flops, "wall_s": round(wall, 1)}


def memory_probe(preset: str, batch_size: int, seq_len: int, device: str) -> dict[str, Any]:
    """Peak memory of one bf16-autocast AdamW training step; run it in a fresh process (see module doc)."""
    import resource

    import torch

    from matelike.device import resolve_device
    from matelike.model.transformer import Transformer, get_preset
    from matelike.train import TrainConfig
    from matelike.train.optim import build_optimizer
    from matelike.train.precision import Precision

    dev = resolve_device(device)
    import psutil

    rss0 = psutil.Process().memory_info().rss  # now, after imports; ru_maxrss may hold an import-time peak
    cfg = get_preset(preset, max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
    model = Transformer(cfg).to(dev)
    n_params = model.num_params()
    config = TrainConfig(out=Path("unused"), batch_size=batch_size, seq_len=seq_len, dtype="bf16")
    opt = build_optimizer(model, config)
    prec = Precision.create("bf16", dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step has the optimizer state allocated: the steady-state peak
        x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=dev)
        with prec.autocast():
            loss = model(x[:, :-1], x[:, 1:], return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
        how = "peak RSS growth over the process baseline"
    state = n_params * 4 * 4  # fp32 weights + gradients + AdamW's two moments
    return {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "dtype": "bf16", "device": dev.type,
            "params": n_params, "peak_bytes": int(peak), "peak_gib": round(peak / 2**30, 3), "measured_as": how,
            "weights_grads_adam_gib": round(state / 2**30, 3),
            # A "4 GB" card has 4 GiB, of which the CUDA context and kernels take about half a GiB.
            "fits_4gib_gpu": bool(peak < 3.5 * 2**30)}


def _probe_in_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    code = ("import json,sys; from matelike.bench.train import memory_probe; "
            f"print(json.dumps(memory_probe({args.memory_preset!r}, 1, 512, {args.device!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cmd_bench_train(args: argparse.Namespace) -> int:
    import torch

    from matelike.device import resolve_device
    from matelike.train.flops import measure_matmul_peak

    losses = args.losses.split(",")
    for loss in losses:
        if loss not in ("fused", "logits"):
            raise SystemExit(f"--losses: unknown {loss!r}; use fused and/or logits")
    device = resolve_device(args.device)
    size = 8192 if device.type == "cuda" else 2048
    peaks = {name: measure_matmul_peak(dt, device, size=size, seconds=args.peak_seconds)
             for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    runs = []
    variants = [(dtype, compile_, loss) for dtype in args.dtypes.split(",")
                for compile_ in ((False, True) if args.compile_runs else (False,)) for loss in losses]
    for dtype, compile_, loss in variants:
        try:
            r = measure_run(args.preset, dtype, compile_, args.batch_size, args.seq_len, args.steps,
                            args.warmup, str(device), fused=loss == "fused")
        except Exception as exc:  # noqa: BLE001 - one failed variant (e.g. no compiler) must not hide the rest
            runs.append({"dtype": dtype, "compile": compile_, "loss": loss,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        r["mfu"] = round(achieved / peaks[r["dtype"] if r["dtype"] in peaks else "fp32"], 4)
        r["mfu_vs_bf16_peak"] = round(achieved / peaks["bf16"], 4)
        runs.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    result = {
        "bench": "train", "preset": args.preset, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "steps": args.steps, "warmup_steps": args.warmup,
        "peak_tflops": {k: round(v / 1e12, 3) for k, v in peaks.items()}, "runs": runs,
    }
    if args.memory_preset:
        result["memory"] = _probe_in_subprocess(args)
    print(json.dumps(result))
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("bench", "train", "training tokens/s and MFU (bf16/fp32, +-compile), 0.2b step memory",
                            _cmd_bench_train, group_help="throughput benchmarks (one JSON line each)")
    p.add_argument("--preset", default="26m", help="model preset, randomly initialised (default 26m)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated dtypes to run")
    p.add_argument("--no-compile", dest="compile_runs", action="store_false", help="skip the --compile variants")
    p.add_argument("--losses", default="fused,logits",
                   help="comma-separated: fused (chunked projection + loss, as training runs) and/or logits")
    p.add_argument("--memory-preset", default="0.2b", help="preset of the memory probe ('' skips it)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="seconds per matmul peak measurement")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
