"""A tiny synthetic Task and model: a worked example of the engine's Task protocol.

The engine's tests drive it in one process, under torchrun and after kill -9, because it trains in
milliseconds. `python tests/toy.py --out DIR --max-steps 20` (also under torchrun) runs it.
Sequences follow x[t+1] = (a*x[t] + b) mod vocab with a per-row start, so the loss really falls.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matelike.train.config import TrainConfig, add_engine_args
from matelike.train.engine import Trainer, seed_everything


@dataclass
class ToyConfig:
    vocab_size: int = 32
    dim: int = 16


@dataclass
class ToyOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None


class ToyModel(nn.Module):
    """Embedding -> one hidden matrix -> RMSNorm -> head: enough to have every kind of parameter group."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([nn.Linear(config.dim, config.dim, bias=False) for _ in range(2)])
        self.norm = nn.RMSNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ToyOutput:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + F.silu(layer(h))
        logits = self.lm_head(self.norm(h)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return ToyOutput(logits, loss)


class ToyTask:
    """Micro-batch i is rows [i*W*B, (i+1)*W*B) of an endless seeded stream (W processes, batch B); rank r
    takes its B of them. The cursor is the number of micro-batches consumed, so one process with batch 2B or
    with batch B and 2 accumulation steps sees the same rows per update as two processes with batch B."""

    def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int, sleep: float = 0.0,
                 nan_steps: Sequence[int] = (), ignore_tail: bool = False, epoch_batches: int = 16,
                 row_mean: bool = False) -> None:
        self.batch_size, self.seq_len, self.vocab_size, self.seed = batch_size, seq_len, vocab_size, seed
        self.sleep, self.nan_steps, self.ignore_tail = sleep, set(nan_steps), ignore_tail
        # row_mean: the loss is the mean over rows of each row's token mean, returned with the row count as its
        # weight (the engine's fourth loss value), like SFT's per-sample mean.
        self.row_mean = row_mean
        self.epoch_batches = epoch_batches

    def rows(self, first: int, n: int) -> torch.Tensor:
        """Rows first..first+n-1 of the endless data stream; row r depends only on (seed, r)."""
        x = np.empty((n, self.seq_len + 1), dtype=np.int64)
        for j in range(n):
            rng = np.random.default_rng([self.seed, first + j])
            start, mult = int(rng.integers(0, self.vocab_size)), int(rng.integers(1, 4))
            for t in range(self.seq_len + 1):
                x[j, t] = start
                start = (mult * start + 1) % self.vocab_size
        return torch.from_numpy(x)

    def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[dict, int]]:
        i = int(cursor or 0)
        while True:
            first = (i * world_size + rank) * self.batch_size
            rows = self.rows(first, self.batch_size)
            targets = rows[:, 1:].clone()
            if self.ignore_tail:  # uneven token counts per row, to test token-weighted accumulation
                for j in range(len(targets)):
                    targets[j, self.seq_len - (first + j) % self.seq_len:] = -100
            yield {"input_ids": rows[:, :-1], "targets": targets, "index": torch.tensor(i)}, i + 1
            i += 1

    def epoch_size(self, world_size: int) -> int:
        return self.epoch_batches

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        if self.sleep:
            time.sleep(self.sleep)  # lets a test kill the process in the middle of a run
        out = model(batch["input_ids"], batch["targets"])
        loss = out.loss
        if int(batch["index"]) in self.nan_steps:
            loss = loss * float("nan")
        n = int((batch["targets"] != -100).sum())
        metrics = {"acc": float((out.logits.argmax(-1) == batch["targets"]).float().mean())}
        if self.row_mean:
            targets = batch["targets"]
            per_token = F.cross_entropy(out.logits.transpose(1, 2), targets, reduction="none")
            counts = (targets != -100).sum(1)
            return (per_token.sum(1) / counts).mean(), metrics, n, len(targets)
        return loss, metrics, n

    def evaluate(self, model: nn.Module, rank: int, world_size: int) -> dict[str, float]:
        batch = self.rows(10**9, 8)  # fixed held-out rows, the same on every rank
        out = model(batch[:, :-1], batch[:, 1:])
        return {"val_loss": float(out.loss)}


def export_toy(model: nn.Module, out: Path) -> None:
    """The toy's "model directory": its state dict, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "toy_model.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.replace(out / "toy_model.pt")


def main(argv: Sequence[str] | None = None) -> int:
    from matelike.train.distributed import teardown

    try:
        return _train(argv)
    finally:
        teardown()  # after _train's frame (and the model in it) is gone


def _train(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_engine_args(parser, seq_len=16, batch_size=4, warmup_steps=2, lr=1e-2, min_lr=1e-3, log_every=1,
                    dtype="fp32")
    parser.add_argument("--vocab-size", type=int, default=32)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--nan-steps", type=int, nargs="*", default=[])
    parser.add_argument("--ignore-tail", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig.from_args(args)
    seed_everything(config.seed)
    model = ToyModel(ToyConfig(vocab_size=args.vocab_size))
    task = ToyTask(batch_size=config.batch_size, seq_len=config.seq_len, vocab_size=args.vocab_size,
                   seed=config.seed, sleep=args.sleep, nan_steps=args.nan_steps, ignore_tail=args.ignore_tail)
    return Trainer(config, model, None, task, export=export_toy).fit().exit_code


if __name__ == "__main__":
    sys.exit(main())
