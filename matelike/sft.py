"""`matelike sft`: supervised fine-tuning as a task of the one training engine (matelike/train/).

The stage reads instruction data (matelike.data.sft: every layout, chat template, assistant-only loss,
history-side truncation, packing with segment ids) and computes the masked cross-entropy; precision,
accumulation, clipping, schedule, checkpoints, resume, DDP and metrics.jsonl are the engine's.

Which weights train:
- `--freeze embeddings` (default, as in the original Matelike project's configuration): the token embedding
  is frozen. With tied embeddings (every preset) that is also the output head, so the model keeps the token
  geometry pretraining learnt.
- `--freeze all-but-layers`: only the transformer blocks train (embedding, final norm and head frozen).
- `--freeze none`: everything trains.
- `--lora-rank R`: LoRA adapters (peft) on every linear map of the blocks; the base weights are frozen.
  In MoE models that is attention and the shared expert: routed experts are stored as 3-D tensors, not
  linear modules, and stay frozen (as does the router).
  The adapters are merged into a copy of the model whenever the model directory is written, so OUT is a
  plain Hugging Face model directory with no adapter files. Checkpoints keep the unmerged adapters, so
  `--resume` continues training them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from matelike.data.sft import FORMAT_CHOICES, IGNORE_INDEX, PackedSFTData, SFTSamples, collate, pack_rows

if TYPE_CHECKING:
    import torch
    from torch import nn

    from matelike.cli import CommandTable
    from matelike.tokenizer import Tokenizer

FREEZE_MODES = ("none", "embeddings", "all-but-layers")
# Linear maps of our blocks that get LoRA adapters: attention (fused qkv, output) and the MLP. The MoE router
# and the shared-expert gate stay as they are (tiny, and routing is what pretraining learnt).
LORA_TARGETS = ("wqkv", "wo", "w_gate_up", "w_down")
# SFT defaults that differ from the engine's (the original project's configuration: 1e-4 warming up from 0,
# cosine down to 1e-5).
SFT_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 50, "seq_len": None}


# ---- which weights train -------------------------------------------------------------------------------------

def apply_freeze(model: "nn.Module", mode: str) -> dict[str, int]:
    """Set requires_grad per `mode`; returns trainable and frozen parameter counts (tied weights once)."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"--freeze must be one of {FREEZE_MODES}, got {mode!r}")
    for name, p in model.named_parameters():
        if mode == "none":
            p.requires_grad_(True)
        elif mode == "embeddings":
            # embed.weight is lm_head.weight when tied: named_parameters lists it once, as embed.weight.
            p.requires_grad_(not name.startswith("embed."))
        else:
            p.requires_grad_(name.startswith("layers."))
    return param_counts(model)


def param_counts(model: "nn.Module") -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def add_lora(model: "nn.Module", rank: int, alpha: float, dropout: float = 0.0) -> "nn.Module":
    """Inject LoRA adapters (peft) into the blocks' linear maps, in place; only adapters stay trainable.

    `inject_adapter_in_model` keeps our Transformer class and its forward signature (segment_ids and all),
    which a PeftModel wrapper would hide from the engine.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    # Regex on full module names: only inside the blocks, never the head.
    pattern = r"layers\.\d+\..*(" + "|".join(LORA_TARGETS) + r")"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def merge_lora(model: "nn.Module") -> "nn.Module":
    """A copy of `model` with every LoRA adapter merged into its base weight and the wrappers removed."""
    from peft.tuners.lora import LoraLayer

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, module.get_base_layer())
    return plain


def has_lora(model: "nn.Module") -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


# ---- the engine task -------------------------------------------------------------------------------------

LOSS_MEANS = ("token", "sequence")


def sample_weights(targets: "torch.Tensor", segment_ids: "torch.Tensor") -> tuple["torch.Tensor", int]:
    """Per-position weights that make the weighted token mean a mean over samples: 1/(the sample's answer
    tokens) at each answer token of a packed sample (a segment of a row), 0 elsewhere; and the number of
    samples with an answer token (the sum of the weights)."""
    import torch

    valid = targets != IGNORE_INDEX
    # One id per (row, segment): segments are numbered from 1 within each row, 0 on padding.
    key = torch.arange(targets.shape[0], device=targets.device)[:, None] * (int(segment_ids.max()) + 1) + segment_ids
    counts = torch.bincount(key[valid], minlength=int(key.max()) + 1)
    weights = torch.where(valid, 1.0 / counts[key].clamp(min=1).float(), 0.0)
    return weights, int((counts > 0).sum())


class SFTTask:
    """Engine Task for SFT: packed batches with a resumable cursor, masked cross-entropy.

    loss_mean "token": the mean over every answer token of the batch (each token weighs the same, so a long
    answer weighs more than a short one). "sequence": the mean over samples of each sample's token mean (each
    sample weighs the same: a one-word label counts as much as a paragraph).
    """

    def __init__(self, data: PackedSFTData, val: SFTSamples | None = None, val_batch_size: int = 8,
                 loss_mean: str = "token") -> None:
        if loss_mean not in LOSS_MEANS:
            raise ValueError(f"loss_mean must be one of {LOSS_MEANS}, got {loss_mean!r}")
        self.data = data
        self.val = val
        self.val_batch_size = val_batch_size
        self.loss_mean = loss_mean
        # Micro-batches combine by what the mean runs over: answer tokens, or samples (returned as the weight).
        self.weight_by_tokens = loss_mean == "token"
        self._val_rows = None
        if val is None:
            # The engine evaluates only when the task has an `evaluate`; without held-out data there is none.
            self.evaluate = None  # type: ignore[assignment]
        else:
            self._val_rows = pack_rows(val.lengths, data.seq_len, np.arange(len(val)))

    def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[dict, int]]:
        for next_cursor, batch in self.data.iter_batches(rank, world_size, int(cursor or 0)):
            yield batch, next_cursor

    def epoch_size(self, world_size: int) -> int:
        return self.data.batches_per_epoch(0, world_size)

    def loss(self, model: "nn.Module", batch: dict) -> tuple[Any, ...]:
        """(loss, metrics, answer tokens), plus the number of samples under loss_mean "sequence" (the weight the
        engine combines micro-batches by)."""
        targets = batch["targets"]
        weights, n_samples = None, None
        if self.loss_mean == "sequence":
            weights, n_samples = sample_weights(targets, batch["segment_ids"])
        out = model(batch["input_ids"], targets, segment_ids=batch["segment_ids"],
                    position_ids=batch["position_ids"], target_logits_only=True, return_logits=False,
                    loss_weights=weights)
        n_tokens = int((targets != IGNORE_INDEX).sum())
        metrics: dict[str, Any] = {"padding": batch["padding_fraction"]}
        if out.aux_loss is not None:
            metrics["aux_loss"] = out.aux_loss.detach()
        if n_samples is None:
            return out.loss, metrics, n_tokens
        return out.loss, metrics, n_tokens, n_samples

    def evaluate(self, model: "nn.Module", rank: int, world_size: int) -> dict[str, float]:  # noqa: F811
        """Token-mean cross-entropy on the held-out answers (no MoE aux term), rows split over ranks."""
        from matelike.eval.heldout import heldout_nll
        from matelike.train.distributed import sum_over_ranks

        assert self.val is not None and self._val_rows is not None
        mine = self._val_rows[rank::world_size]
        sums = heldout_nll(model, (collate(self.val, mine[b : b + self.val_batch_size], self.data.pad_id)
                                   for b in range(0, len(mine), self.val_batch_size)))
        total, count = sum_over_ranks([sums.nats, float(sums.tokens)])
        return {"val_loss": total / max(count, 1.0)}


def lora_export(tokenizer: "Tokenizer"):
    """Engine export hook: merge adapters into a copy, then write the plain HF directory."""

    def export(model: "nn.Module", out: Path) -> None:
        from matelike.model.io import save_model

        save_model(merge_lora(model) if has_lora(model) else model, tokenizer, out)

    return export


# ---- command line -------------------------------------------------------------------------------------

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_sft(args: argparse.Namespace) -> int:
    from matelike.data.packed import PackMismatchError, open_sft, packed_kind
    from matelike.data.records import BadRecordReport, DataFileError
    from matelike.data.sft import SFTStats, load_sft_samples
    from matelike.model.io import load_model
    from matelike.train import TrainConfig, Trainer, seed_everything
    from matelike.train.config import stage_seq_len

    main_rank = _rank() == 0
    seed_everything(args.seed)
    model, tokenizer = load_model(args.init)
    if tokenizer is None:
        print(f"matelike sft: {args.init} has no tokenizer.json; SFT needs the model's tokenizer", file=sys.stderr)
        return 2
    try:
        args.seq_len = stage_seq_len(args.seq_len, model.config.max_seq_len, args.init)
    except ValueError as e:
        print(f"matelike sft: {e}", file=sys.stderr)
        return 2
    model.float()  # master weights in fp32; the engine's autocast picks the compute dtype

    quiet = None if main_rank else open(os.devnull, "w")
    report = BadRecordReport(stream=quiet)

    def load(paths: list[Path]) -> tuple[SFTSamples, SFTStats]:
        if not any(packed_kind(p) for p in paths):
            return load_sft_samples(paths, tokenizer, args.seq_len, args.format, report)
        if len(paths) != 1:
            raise PackMismatchError("a packed file must be the only file of --data / --val")
        samples, f = open_sft(paths[0], tokenizer, args.seq_len)
        if args.format != "auto" and f.meta["layout"] != args.format:
            raise PackMismatchError(f"{paths[0]}: packed with --layout {f.meta['layout']}, not --format {args.format}")
        for reason, n in f.meta["bad_records"]["by_reason"].items():  # reported when packed: counted, not reprinted
            report.by_reason[reason] += n
        for name, n in f.meta["bad_records"]["by_file"].items():
            report.by_file[name] += n
        known = {k: v for k, v in f.meta["stats"].items() if k in SFTStats.__dataclass_fields__}
        return samples, SFTStats(**known)

    try:
        samples, stats = load(args.data)
        val, val_stats = load(args.val) if args.val else (None, None)
    except (DataFileError, PackMismatchError) as e:
        print(f"matelike sft: {e}", file=sys.stderr)
        return 2
    if main_rank:
        print(stats.summary(), file=sys.stderr)
        if stats.bad:
            print(f"matelike sft: {report.summary()} (skipped; the good records are all used)", file=sys.stderr)
        if val_stats is not None:
            print("validation " + val_stats.summary(), file=sys.stderr)
        good = stats.records - stats.bad
        if good and stats.dropped_too_long > 0.1 * good:
            print(f"matelike sft: warning: {stats.dropped_too_long} of {good} samples "
                  f"({stats.dropped_too_long / good:.0%}) do not fit --seq-len {args.seq_len} even with their "
                  f"history dropped; a larger --seq-len keeps them", file=sys.stderr)
    if stats.samples == 0:
        print("matelike sft: no usable SFT samples in " + ", ".join(map(str, args.data)), file=sys.stderr)
        return 1

    if args.lora_rank:
        model = add_lora(model, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, args.lora_dropout)
        counts = param_counts(model)
    else:
        counts = apply_freeze(model, args.freeze)
    if main_rank:
        mode = f"LoRA rank {args.lora_rank}" if args.lora_rank else f"freeze {args.freeze}"
        print(f"matelike sft: {mode}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters",
              file=sys.stderr)

    config = TrainConfig.from_args(args, stage="sft", init=str(args.init), data=[str(p) for p in args.data],
                                   format=args.format, freeze=args.freeze, lora_rank=args.lora_rank,
                                   lora_alpha=args.lora_alpha, loss_mean=args.loss_mean)
    if config.fsdp and args.lora_rank:
        print("matelike sft: --lora-rank with --fsdp is not supported; use DDP (the default)", file=sys.stderr)
        return 2
    data = PackedSFTData(samples, config.seq_len, config.batch_size, tokenizer.pad_id, seed=config.seed)
    task = SFTTask(data, val, val_batch_size=config.batch_size, loss_mean=args.loss_mean)
    if main_rank:
        rows = data.rows(0)
        fill = stats.tokens / max(1, len(rows) * config.seq_len)
        print(f"matelike sft: packed into {len(rows)} rows of {config.seq_len} positions ({fill:.1%} filled), "
              f"{task.epoch_size(1)} batches of {config.batch_size} rows per epoch", file=sys.stderr)
        config.out.mkdir(parents=True, exist_ok=True)
        summary = {"train": stats.to_dict(), "val": val_stats.to_dict() if val_stats else None,
                   "bad_records": report.total, "params": counts}
        (config.out / "sft_data.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    trainer = Trainer(config, model, tokenizer, task, export=lora_export(tokenizer))
    result = trainer.fit()
    if main_rank:
        print(f"matelike sft: {result.step}/{result.total_steps} steps, {result.tokens:,} answer tokens; "
              f"model in {config.out}", file=sys.stderr)
    return result.exit_code


def add_cli(table: "CommandTable") -> None:
    from matelike.train import add_engine_args

    p = table.command("sft", "supervised fine-tuning on instruction data (assistant-only loss)", run_sft)
    p.add_argument("--init", type=Path, required=True, help="model directory to start from (pretrained)")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="SFT files or directories (jsonl / parquet / csv), or one file packed by "
                        "`matelike data pack --format sft` (memory-mapped, nothing tokenized at start)")
    p.add_argument("--val", type=Path, nargs="+", default=None, help="held-out SFT files: val_loss on eval")
    p.add_argument("--format", choices=tuple(FORMAT_CHOICES), default="auto",
                   help="record layout; auto detects prompt/response, alpaca or conversations per record")
    p.add_argument("--freeze", choices=FREEZE_MODES, default="embeddings",
                   help="weights kept fixed (ignored with --lora-rank, which freezes every base weight)")
    p.add_argument("--loss-mean", choices=LOSS_MEANS, default="token",
                   help="token: every answer token weighs the same; sequence: every sample weighs the same (a "
                        "one-word answer counts as much as a long one in a mix of tasks)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = off)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    add_engine_args(p, SFT_DEFAULTS)
