"""`matelike pretrain`: next-token prediction on packed token files, run by the shared training engine.

The data is a `TokenFile` memmap (see matelike.data.pack). An epoch cuts the file into non-overlapping windows of
seq_len+1 tokens (shifted by a seeded offset per epoch) and visits them in a seeded random order; every rank
computes the same order and takes its own rows of each global batch, so N processes with batch B see exactly
the data of one process with batch N*B. A window is gathered straight from the memmap, so the file is never
loaded whole, and the resume cursor is just the number of windows consumed.

Many processes: `torchrun --nproc_per_node=N -m matelike pretrain ...` (DDP; add --fsdp to shard). Many
machines, each running (with --out on a filesystem that all of them share, for checkpoints and resume):
    torchrun --nnodes=2 --node_rank=K --nproc_per_node=G --master_addr=HOST0 --master_port=29500 \
        -m matelike pretrain ...
or with elastic rendezvous: --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 --rdzv-id=RUN instead of
--node_rank/--master_addr/--master_port.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from matelike.train.config import TrainConfig, add_engine_args

if TYPE_CHECKING:
    import torch
    from torch import nn

    from matelike.cli import CommandTable


class WindowSampler:
    """Seeded epoch-wise order of the non-overlapping (seq_len+1)-token windows of a token array."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int) -> None:
        self.seq_len, self.seed = seq_len, seed
        self.n_windows = (n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{n_tokens} tokens are too few for one window of --seq-len {seq_len} (+1)")
        self.slack = n_tokens - 1 - self.n_windows * seq_len  # room to shift window boundaries per epoch
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._shift = 0

    def starts(self, global_index: np.ndarray) -> np.ndarray:
        """Start offsets of the windows at these positions of the endless (epoch after epoch) sequence."""
        epochs = global_index // self.n_windows
        out = np.empty(len(global_index), dtype=np.int64)
        for epoch in np.unique(epochs):
            self._load_epoch(int(epoch))
            sel = epochs == epoch
            out[sel] = self._order[global_index[sel] % self.n_windows] * self.seq_len + self._shift
        return out

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:  # one permutation per epoch, recomputed only when the epoch changes
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.n_windows)
            self._shift = int(rng.integers(0, self.slack + 1))
            self._epoch = epoch


class PretrainTask:
    """The engine Task of pretraining (protocol in matelike.train.engine)."""

    weight_by_tokens = True

    def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
                 val_tokens: np.ndarray | None = None, val_bytes_per_token: float | None = None,
                 eval_tokens: int = 1 << 17) -> None:
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.sampler = WindowSampler(len(tokens), seq_len, seed)
        self.val_tokens, self.val_bytes_per_token, self.eval_tokens = val_tokens, val_bytes_per_token, eval_tokens
        if val_tokens is None:
            self.evaluate = None  # type: ignore[assignment]  # no held-out file: the engine skips eval

    def _window(self, tokens: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        import torch  # here, not at the top: `matelike --help` and data commands should not pay for torch

        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))

    def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[torch.Tensor, int]]:
        # The cursor counts windows consumed by all ranks together, so a run resumed with another number of
        # processes or another batch size still continues at the same place in the data.
        pos = int(cursor or 0)
        global_batch = self.batch_size * world_size
        while True:
            first = pos + rank * self.batch_size
            starts = self.sampler.starts(np.arange(first, first + self.batch_size, dtype=np.int64))
            pos += global_batch
            yield self._window(self.tokens, starts), pos

    def epoch_size(self, world_size: int) -> int:
        return max(1, self.sampler.n_windows // (self.batch_size * world_size))

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], int]:
        out = model(batch[:, :-1], batch[:, 1:], return_logits=False)
        metrics = {"aux_loss": out.aux_loss.detach()} if out.aux_loss is not None else {}
        return out.loss, metrics, batch.shape[0] * (batch.shape[1] - 1)

    def evaluate(self, model: nn.Module, rank: int, world_size: int) -> dict[str, float]:  # noqa: F811
        """Held-out cross-entropy (without MoE aux loss) over the first `eval_tokens` of the val file, and bits
        per byte = nats per token / ln 2 / UTF-8 bytes per token, comparable across tokenizers."""
        from matelike.eval.heldout import heldout_nll
        from matelike.train.distributed import sum_over_ranks

        assert self.val_tokens is not None
        n_windows = min((len(self.val_tokens) - 1) // self.seq_len, max(1, self.eval_tokens // self.seq_len))
        # Every rank runs the same number of equal batches (FSDP's collectives need that): round the windows
        # down to a multiple of the world size, or, when too few, let every rank do all (the ratio is unchanged).
        if n_windows >= world_size:
            mine = np.arange(rank, n_windows - n_windows % world_size, world_size, dtype=np.int64) * self.seq_len
        else:
            mine = np.arange(n_windows, dtype=np.int64) * self.seq_len
        windows = (self._window(self.val_tokens, mine[k:k + self.batch_size])
                   for k in range(0, len(mine), self.batch_size))
        sums = heldout_nll(model, ({"input_ids": w[:, :-1], "targets": w[:, 1:]} for w in windows))
        nats, count = sum_over_ranks([sums.nats, float(sums.tokens)])
        val_loss = nats / max(count, 1.0)
        out = {"val_loss": val_loss}
        if self.val_bytes_per_token:
            out["val_bpb"] = val_loss / math.log(2) / self.val_bytes_per_token
        return out


def _check_tokens(path: Path, tf: Any, vocab_size: int, tokenizer_sha: str | None) -> None:
    sha = tf.meta.get("tokenizer_sha256") if isinstance(tf.meta, dict) else None
    if sha and tokenizer_sha and sha != tokenizer_sha:
        raise ValueError(f"{path} was packed with another tokenizer (sha256 {sha[:12]}..., "
                         f"--tokenizer has {tokenizer_sha[:12]}...); repack it or pass the right --tokenizer")
    if sha and sha == tokenizer_sha:
        return  # packed by this very tokenizer: every id is in range
    # No tokenizer hash to trust: scan (in chunks, the memmap is never loaded whole) for ids past the vocabulary,
    # which would otherwise crash the embedding somewhere in the middle of the run.
    top = int(max(int(tf.tokens[i:i + (1 << 24)].max()) for i in range(0, len(tf.tokens), 1 << 24)))
    if top >= vocab_size:
        raise ValueError(f"{path} holds token id {top} but the tokenizer has only {vocab_size} tokens")


def run_pretrain(args: argparse.Namespace) -> int:
    from matelike.data.pack import TokenFile
    from matelike.model.transformer import Transformer, get_preset
    from matelike.tokenizer import Tokenizer
    from matelike.train import Trainer, seed_everything

    tokenizer = Tokenizer.load(args.tokenizer)
    preset = get_preset(args.preset, vocab_size=tokenizer.vocab_size)
    if args.seq_len is None:
        args.seq_len = preset.max_seq_len
    if args.seq_len > preset.max_seq_len:
        preset = get_preset(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=args.seq_len)
    config = TrainConfig.from_args(args, preset=args.preset, data=str(args.data))
    data = TokenFile(args.data)
    _check_tokens(args.data, data, tokenizer.vocab_size, tokenizer.sha256)
    val = None
    if args.val is not None:
        val = TokenFile(args.val)
        _check_tokens(args.val, val, tokenizer.vocab_size, tokenizer.sha256)
        if len(val) < args.seq_len + 1:
            raise ValueError(f"{args.val}: {len(val)} tokens, fewer than one window of --seq-len {args.seq_len}")
    task = PretrainTask(data.tokens, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
                        val_tokens=val.tokens if val is not None else None,
                        val_bytes_per_token=val.bytes_per_token if val is not None else None,
                        eval_tokens=args.eval_tokens)
    seed_everything(config.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
    model = Transformer(preset)
    result = Trainer(config, model, tokenizer, task).fit()  # `matelike` ends the process group after return
    if result.stopped_by is None and os.environ.get("RANK", "0") == "0":
        print(f"matelike: pretraining done: {result.step} steps, {result.tokens:,} tokens, model in {config.out}",
              file=sys.stderr)
    return result.exit_code


def _handler(args: argparse.Namespace) -> int:
    try:
        return run_pretrain(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"matelike pretrain: error: {exc}", file=sys.stderr)
        return 2


def add_cli(table: "CommandTable") -> None:
    p = table.command("pretrain", "pretrain a model from zero on packed tokens (torchrun for many processes)",
                      _handler)
    p.add_argument("--preset", required=True, help="model size: tiny, 26m, 0.2b, tiny-moe, 26m-moe")
    p.add_argument("--data", type=Path, required=True, help="packed training tokens (FILE.bin from data pack)")
    p.add_argument("--val", type=Path, help="packed held-out tokens for val_loss and val_bpb")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer dir (saved into the model dir)")
    p.add_argument("--eval-tokens", type=int, default=1 << 17, help="held-out tokens per evaluation")
    add_engine_args(p, lr=2e-4, min_lr=2e-5, seq_len=None, save_every=2000)
