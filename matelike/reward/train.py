"""`matelike reward train`: a Bradley-Terry reward model from preference pairs, as a task of the one engine.

Data: `{prompt, chosen, rejected}` records (TRL's columns, strings or message lists; `matelike dpo
make-pairs` writes them), or one file packed by `matelike data pack --format dpo`, read and reported exactly as
`matelike dpo` reads them (matelike.data.preference; --seq-len bounds prompt + answer the same way, and a
scored row adds the template's newline after `<|im_end|>`). Each side is scored as the chat template renders it
(matelike.reward.model), and the loss per pair is
-log σ(r_chosen - r_rejected), plus --center-rewards·(r_chosen + r_rejected)² when asked (TRL's
center_rewards_coefficient), averaged over pairs.

The model starts from --init (the SFT model, as in InstructGPT) with a new scalar head. `--lora-rank R` trains
LoRA adapters (peft, on the blocks' attention and MLP linears, as `matelike sft --lora-rank` does) and the head,
the base weights frozen; the adapters are merged whenever the directory is written, and checkpoints keep them
unmerged so --resume continues training them. Precision, accumulation, checkpoints and exact resume, DDP and
metrics.jsonl are the engine's; with --val every eval line carries the held-out pairwise accuracy
(`val_accuracy`), which the command prints again at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matelike.data.preference import PairBatchesTask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from matelike.cli import CommandTable
    from matelike.data.preference import PreferenceBatches, PreferencePairs
    from matelike.tokenizer import Tokenizer


def pair_rewards(model: "nn.Module", batch: dict) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None"]:
    """(chosen rewards (B,), rejected rewards (B,), MoE aux loss) of one collated batch of reward rows."""
    out = model(batch["input_ids"], batch["last_index"])
    b = batch["input_ids"].shape[0] // 2
    return out.rewards[:b], out.rewards[b:], out.aux_loss


def _accuracy(margin: "torch.Tensor") -> "torch.Tensor":
    """Pairs ranked right, a tie counting half: an untrained head that scores both sides alike is at chance."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


class RewardTask(PairBatchesTask):
    """Reward-model training as an engine Task (protocol in matelike/train/engine.py).

    The loss is a mean over pairs, so micro-batches weigh the same (`weight_by_tokens = False`).
    """

    weight_by_tokens = False

    def __init__(self, data: "PreferenceBatches", *, val: "PreferencePairs | None" = None,
                 center_coef: float = 0.0, eval_batch_size: int = 8, aux_loss_coef: float = 0.0) -> None:
        self.data = data
        self.val = val
        self.center_coef = center_coef
        self.eval_batch_size = eval_batch_size
        self.aux_loss_coef = aux_loss_coef
        if val is None:
            self.evaluate = None  # type: ignore[assignment]  # the engine evaluates only tasks that can

    def loss(self, model: "nn.Module", batch: dict) -> tuple["torch.Tensor", dict[str, float], int]:
        """Mean Bradley-Terry loss over the batch's pairs, its metrics, and the tokens scored."""
        from matelike.train.losses import bradley_terry_loss

        chosen, rejected, aux = pair_rewards(model, batch)
        loss = bradley_terry_loss(chosen, rejected, self.center_coef).mean()
        if aux is not None and self.aux_loss_coef:  # MoE load balancing stays on
            loss = loss + self.aux_loss_coef * aux
        c, r = chosen.detach().float(), rejected.detach().float()
        metrics = {
            "accuracy": _accuracy(c - r).mean().item(),
            "margin": (c - r).mean().item(),
            "rewards_chosen": c.mean().item(),
            "rewards_rejected": r.mean().item(),
            "padding_fraction": float(batch["padding_fraction"]),
        }
        if aux is not None:
            metrics["aux_loss"] = float(aux.detach())
        return loss, metrics, int(batch["real_tokens"])

    def evaluate(self, model: "nn.Module", rank: int = 0, world_size: int = 1) -> dict[str, float]:  # noqa: F811
        """Loss, pairwise accuracy, margin and mean rewards on the held-out pairs.

        The engine calls it on every rank under no_grad, autocast and eval mode; each rank scores every
        world_size-th pair (in length order) and the sums are combined over ranks.
        """
        from matelike.train.distributed import sum_over_ranks
        from matelike.train.losses import bradley_terry_loss

        assert self.val is not None
        order = np.argsort(-self.val.lengths(), kind="stable")[rank::world_size]
        totals = [0.0] * 6  # loss, correct, margin, chosen, rejected, pairs
        for start in range(0, len(order), self.eval_batch_size):
            idx = order[start : start + self.eval_batch_size].tolist()
            c, r, _ = pair_rewards(model, self.data.collate(self.val, idx, self.data.pad_id))
            c, r = c.float(), r.float()
            losses = bradley_terry_loss(c, r, self.center_coef)
            for k, v in enumerate((losses.sum(), _accuracy(c - r).sum(), (c - r).sum(), c.sum(), r.sum(), len(idx))):
                totals[k] += float(v)
        totals = sum_over_ranks(totals)
        n = max(totals[5], 1.0)
        return {"val_loss": totals[0] / n, "val_accuracy": totals[1] / n, "val_margin": totals[2] / n,
                "val_rewards_chosen": totals[3] / n, "val_rewards_rejected": totals[4] / n, "val_pairs": totals[5]}


def reward_export(tokenizer: "Tokenizer"):
    """Engine export hook: LoRA adapters merged into a copy, then the SequenceClassification directory."""

    def export(model: "nn.Module", out: Path) -> None:
        from matelike.reward.model import save_reward_model
        from matelike.sft import has_lora, merge_lora

        save_reward_model(merge_lora(model) if has_lora(model) else model, tokenizer, out)

    return export


# ---- command line -------------------------------------------------------------------------------------------

# As dpo's: a small learning rate for a model that starts from a fine-tuned one, short warmup, no weight decay.
REWARD_DEFAULTS: dict[str, Any] = {
    "lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 10, "batch_size": 8, "seq_len": None, "weight_decay": 0.0,
    "save_every": 500, "log_every": 10,
}


def _cmd_train(args: argparse.Namespace) -> int:
    from matelike.data.packed import PackMismatchError
    from matelike.data.preference import NoPairsError, PreferenceBatches, read_pair_sets
    from matelike.data.records import BadRecordReport, DataFileError
    from matelike.reward.model import RewardModel, reward_collate
    from matelike.sft import add_lora, param_counts
    from matelike.train import TrainConfig, Trainer
    from matelike.train.config import StageStartError, follow_small_lr, start_from_init

    if args.lora_rank < 0:
        print(f"error: --lora-rank must be >= 0, got {args.lora_rank}", file=sys.stderr)
        return 2
    follow_small_lr(args, REWARD_DEFAULTS["min_lr"])
    try:
        info, backbone, tokenizer = start_from_init(args)
    except StageStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq_len = args.seq_len
    try:
        config = TrainConfig.from_args(args, stage="reward", init=str(args.init), lora_rank=args.lora_rank,
                                       lora_alpha=args.lora_alpha, center_rewards=args.center_rewards)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.fsdp and args.lora_rank:
        print("error: --lora-rank with --fsdp is not supported; use DDP (the default)", file=sys.stderr)
        return 2
    report = BadRecordReport(max_shown=20 if info.is_main else 0)  # other ranks count without printing again
    try:
        pairs, val, stats, val_stats = read_pair_sets(args.data, args.val, tokenizer, seq_len, report, info.is_main)
    except NoPairsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataFileError, PackMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    model = RewardModel(backbone.config, backbone=backbone)
    if args.lora_rank:
        add_lora(model.model, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, args.lora_dropout)
    counts = param_counts(model)
    if info.is_main:
        mode = f"LoRA rank {args.lora_rank} and the head" if args.lora_rank else "every weight"
        print(f"matelike reward train: training {mode}: {counts['trainable']:,} trainable, "
              f"{counts['frozen']:,} frozen parameters", file=sys.stderr)
        config.out.mkdir(parents=True, exist_ok=True)
        summary = {"train": stats.to_dict(), "val": val_stats.to_dict() if val_stats else None,
                   "bad_records": report.summary(), "params": counts}
        (config.out / "reward_data.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1),
                                                     encoding="utf-8")
    data = PreferenceBatches(pairs, config.batch_size, tokenizer.pad_id, seed=config.seed,
                             collate=reward_collate(tokenizer))
    task = RewardTask(data, val=val, center_coef=args.center_rewards, eval_batch_size=2 * config.batch_size,
                      aux_loss_coef=model.config.aux_loss_coef if model.config.is_moe else 0.0)
    result = Trainer(config, model, tokenizer, task, export=reward_export(tokenizer)).fit()
    if info.is_main:
        last = result.last_metrics
        if "val_accuracy" in last:
            print(f"matelike reward train: held-out pairwise accuracy {last['val_accuracy']:.4f} over "
                  f"{int(last['val_pairs'])} pairs (margin {last['val_margin']:.4f}) at step {last['step']}",
                  file=sys.stderr)
        print(json.dumps({"out": str(config.out), "step": result.step, "tokens": result.tokens,
                          **{k: v for k, v in last.items() if k not in ("step", "tokens")}}))
    return result.exit_code


def add_cli(table: "CommandTable") -> None:
    from matelike.train import add_engine_args

    p = table.group_command(
        "reward", "train", "Bradley-Terry reward model from preference pairs (a transformers "
        "SequenceClassification directory)", _cmd_train, group_help="reward models")
    p.add_argument("--init", required=True, type=Path, help="model directory to start from (the SFT model)")
    p.add_argument("--data", required=True, nargs="+",
                   help="{prompt, chosen, rejected} jsonl/parquet files or dirs (`matelike dpo make-pairs` writes "
                        "them), or one file packed by `matelike data pack --format dpo`")
    p.add_argument("--val", nargs="+", default=None,
                   help="held-out pairs: pairwise accuracy at each evaluation and at the end")
    p.add_argument("--center-rewards", type=float, default=0.0,
                   help="add this times (r_chosen + r_rejected)^2 to the loss, keeping rewards centred on 0 "
                        "(TRL's center_rewards_coefficient; 0 = off)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank and the head, base weights frozen (0 = every weight)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    add_engine_args(p, REWARD_DEFAULTS)
