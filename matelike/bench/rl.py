"""`matelike bench rl`: GRPO throughput through the real stage: rollout tokens/s and optimiser steps/s.

A randomly initialised model of the preset trains with `GRPOTask` on the shared Trainer, on random prompts,
with a dense reward computed from the token ids (so no tokenizer is needed) and no stop ids (every completion
runs to --max-new-tokens: each step samples exactly batch x group x max-new-tokens tokens). Warmup steps are
left out of the figures. `rollout_tokens_per_s` is tokens sampled over the time spent sampling (the batched
engine: prefill shared by each group, then decode), `optimizer_steps_per_s` whole steps (sampling, scoring,
the training forward and backward, the update) per second, `rollout_share` the part of a step spent sampling.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from matelike.device import DEVICE_HELP, DTYPES
from matelike.rl.losses import LOSS_TYPES

if TYPE_CHECKING:
    from matelike.cli import CommandTable


def _even_ids(prompts: Sequence[Any], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
              **fields: Any) -> list[float]:
    """A dense reward from token ids: the share of even ids."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def measure(preset: str, dtype: str, device: str, batch_size: int, group: int, prompt_len: int,
            max_new_tokens: int, steps: int, warmup: int, loss: str) -> dict[str, Any]:
    import numpy as np

    from matelike.model.transformer import Transformer, get_preset
    from matelike.rl import GRPOTask
    from matelike.rl.rollout import Prompts
    from matelike.train import TrainConfig, Trainer, seed_everything

    seq_len = prompt_len + max_new_tokens
    with tempfile.TemporaryDirectory(prefix="matelike-bench-rl-") as tmp:
        config = TrainConfig(out=Path(tmp), max_steps=warmup + steps, batch_size=batch_size, seq_len=seq_len,
                             lr=1e-5, min_lr=1e-6, warmup_steps=0, weight_decay=0.0, dtype=dtype, log_every=1,
                             save_every=10**9, keep=1, progress=False, device=device)
        seed_everything(0)
        cfg = get_preset(preset, max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
        model = Transformer(cfg)
        rng = np.random.default_rng(0)
        n = batch_size * (warmup + steps)
        prompts = Prompts(ids=[rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(n)],
                          prompts=[""] * n, fields=[{} for _ in range(n)], sources=[f"random:{i}" for i in range(n)])
        task = GRPOTask(model, prompts, [_even_ids], decode=lambda ids: "", stop_ids=(), pad_id=0,
                        batch_size=batch_size, group=group, max_new_tokens=max_new_tokens, loss_type=loss, seed=0)
        trainer = Trainer(config, model, None, task, export=None)
        task.autocast = trainer.precision.autocast  # the reference / old log-probs, as `matelike rl` scores them
        trainer.fit()
        end = time.perf_counter()
        precision = trainer.precision.name
        dev = str(trainer.info.device)
    timed = task.rollout_log[warmup:]
    sampled = sum(tokens for _, _, tokens in timed)
    sampling_s = sum(s for _, s, _ in timed)
    wall = end - timed[0][0]
    return {"dtype": precision, "device": dev, "loss": loss,
            "rollout_tokens_per_s": round(sampled / sampling_s, 1),
            "optimizer_steps_per_s": round(steps / wall, 3),
            "step_s": round(wall / steps, 3), "rollout_share": round(sampling_s / wall, 3),
            "trained_tokens_per_step": batch_size * group * max_new_tokens}


def _cmd_bench_rl(args: argparse.Namespace) -> int:
    import torch

    r = measure(args.preset, args.dtype, args.device, args.batch_size, args.group, args.prompt_len,
                args.max_new_tokens, args.steps, args.warmup, args.loss)
    print(json.dumps({"bench": "rl", "preset": args.preset, "threads": torch.get_num_threads(),
                      "batch_size": args.batch_size, "group": args.group, "prompt_len": args.prompt_len,
                      "max_new_tokens": args.max_new_tokens, "steps": args.steps, "warmup_steps": args.warmup,
                      **r}))
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("bench", "rl", "GRPO rollout tokens/s and optimiser steps/s through the real stage",
                            _cmd_bench_rl, group_help="throughput benchmarks (one JSON line each)")
    p.add_argument("--preset", default="tiny", help="model preset, randomly initialised (default tiny)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--loss", choices=LOSS_TYPES, default="dapo", help="the GRPO loss's token averaging")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
