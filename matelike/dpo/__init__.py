"""`matelike dpo`: preference optimisation (DPO, IPO, SimPO, ORPO) as a task of the one training engine.

The stage only says which batches to read and what loss to compute; precision, accumulation, clipping,
schedule, checkpoints, resume, DDP and metrics.jsonl are the engine's (matelike/train/).

Reference model. DPO and IPO compare the policy against the frozen initial weights. By default their
log-probabilities are computed once, before training, with the initial model (split over ranks under
torchrun) and stored in OUT/reference_logps.pt, so no second model sits in memory while training and a
resumed run reuses them; batches carry their pair indices to look them up. `--ref-in-memory` keeps a frozen
copy of the initial model instead and scores every batch with it (the plain way: twice the weights in memory,
one more forward pass per step, no precompute pass). SimPO and ORPO need no reference at all.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np

from matelike.data.preference import PairBatchesTask
from matelike.train.losses import DEFAULT_BETA, LOSS_TYPES, needs_reference, preference_loss, sequence_logps

if TYPE_CHECKING:
    import torch
    from torch import nn

    from matelike.cli import CommandTable
    from matelike.data.preference import PreferenceBatches, PreferencePairs

REFERENCE_FILE = "reference_logps.pt"


# ---- scoring -----------------------------------------------------------------------------------------------

@dataclass
class PairScores:
    """Per-pair summed completion log-probs and completion token counts of one batch, (B,) each."""

    chosen: "torch.Tensor"
    rejected: "torch.Tensor"
    chosen_tokens: "torch.Tensor"
    rejected_tokens: "torch.Tensor"
    aux_loss: "torch.Tensor | None" = None


def score_pairs(model: "nn.Module", batch: dict) -> PairScores:
    """One forward pass over a collated pair batch (chosen rows, then rejected rows)."""
    device = next(model.parameters()).device
    out = model(batch["input_ids"].to(device, non_blocking=True))
    logps, counts = sequence_logps(out.logits, batch["targets"].to(device, non_blocking=True))
    b = batch["input_ids"].shape[0] // 2
    return PairScores(logps[:b], logps[b:], counts[:b], counts[b:], getattr(out, "aux_loss", None))


def compute_reference_logps(
    model: "nn.Module", pairs: "PreferencePairs", batch_size: int, pad_id: int, autocast: ContextManager | None = None,
    rank: int = 0, world_size: int = 1,
) -> "torch.Tensor":
    """(N, 2) fp32 summed log-probs of (chosen, rejected) per pair under `model`, in eval mode without grad.

    Under torchrun every rank scores every world_size-th pair (in length order, so batches pad little) and the
    shares are summed over ranks. `autocast` must be the one training uses, so precomputed values match
    what an in-memory reference would give.
    """
    import contextlib

    import torch
    import torch.distributed as dist

    from matelike.data.preference import collate_pairs

    n = len(pairs)
    out = torch.zeros(n, 2, dtype=torch.float32)
    order = np.argsort(-pairs.lengths(), kind="stable")[rank::world_size]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (autocast or contextlib.nullcontext()):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size].tolist()
                s = score_pairs(model, collate_pairs(pairs, idx, pad_id))
                out[idx, 0] = s.chosen.float().cpu()
                out[idx, 1] = s.rejected.float().cpu()
    finally:
        model.train(was_training)
    if world_size > 1 and dist.is_initialized():
        device = next(model.parameters()).device if dist.get_backend() == "nccl" else torch.device("cpu")
        shared = out.to(device)
        dist.all_reduce(shared)  # each pair was scored by exactly one rank, the others hold zeros
        out = shared.cpu()
    return out


def pairs_fingerprint(pairs: "PreferencePairs") -> str:
    """sha256 of the rendered token ids and masks: the cached reference matches only the same data.

    A packed file's pairs carry the file's sha256 instead, so a start does not read the whole file to hash it.
    """
    if pairs.fingerprint is not None:
        return pairs.fingerprint
    h = hashlib.sha256()
    for side in (pairs.chosen, pairs.rejected):
        for arr in (side.ids, side.mask, side.offsets):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def model_fingerprint(model: "nn.Module") -> str:
    """sha256 over the parameters' bytes (the initial weights the reference must come from)."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- the engine task ---------------------------------------------------------------------------------------

class DPOTask(PairBatchesTask):
    """Preference optimisation as an engine Task (protocol in matelike/train/engine.py).

    Reference log-probs come from `ref_logps` (precomputed (N, 2), looked up by the batch's pair indices, so
    any shuffle order or resume point finds its values) or from `ref_model` (a frozen copy scored on the fly);
    reference-free losses need neither. The loss is a mean over pairs, so micro-batches weigh the same
    (`weight_by_tokens = False`).
    """

    weight_by_tokens = False

    def __init__(
        self, data: "PreferenceBatches", *, loss_type: str = "sigmoid", beta: float | None = None,
        simpo_gamma: float = 0.5, ref_logps: "torch.Tensor | None" = None, ref_model: "nn.Module | None" = None,
        val: "PreferencePairs | None" = None, val_ref_logps: "torch.Tensor | None" = None, eval_batch_size: int = 8,
        aux_loss_coef: float = 0.0, rpo_alpha: float = 0.0,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        self.data = data
        self.loss_type = loss_type
        self.beta = DEFAULT_BETA[loss_type] if beta is None else beta
        self.simpo_gamma = simpo_gamma
        self.ref_logps = ref_logps
        self.ref_model = ref_model
        self.val = val
        self.val_ref_logps = val_ref_logps
        self.eval_batch_size = eval_batch_size
        self.aux_loss_coef = aux_loss_coef
        self.rpo_alpha = rpo_alpha
        if needs_reference(loss_type):
            if ref_model is None and ref_logps is None:
                raise ValueError(f"loss {loss_type!r} needs reference log-probs or a reference model")
            if ref_model is None and val is not None and val_ref_logps is None:
                raise ValueError("held-out pairs need their reference log-probs too")

    # engine protocol (batches and epoch_size: PairBatchesTask) ------------------------------------------
    def loss(self, model: "nn.Module", batch: dict) -> tuple["torch.Tensor", dict[str, float], int]:
        """Mean preference loss over the batch's pairs, its metrics, and the completion tokens it covers."""
        s = score_pairs(model, batch)
        ref_c, ref_r = self._reference(batch, self.ref_logps, s.chosen.device)
        out = preference_loss(
            self.loss_type, s.chosen, s.rejected, s.chosen_tokens, s.rejected_tokens, ref_c, ref_r,
            beta=self.beta, simpo_gamma=self.simpo_gamma,
        )
        loss = out.losses.mean()
        metrics = _pair_metrics(out, s)
        if self.rpo_alpha:
            # RPO (Pang et al. 2024, TRL's rpo_alpha): the chosen answers' per-token NLL keeps their likelihood
            # from sinking along with the rejected ones', a known way DPO degrades generation.
            nll = -(s.chosen / s.chosen_tokens.clamp(min=1)).mean()
            loss = loss + self.rpo_alpha * nll
            metrics["nll_chosen"] = float(nll.detach())
        if s.aux_loss is not None and self.aux_loss_coef:  # MoE load balancing stays on
            loss = loss + self.aux_loss_coef * s.aux_loss
        metrics["padding_fraction"] = float(batch["padding_fraction"])
        if s.aux_loss is not None:
            metrics["aux_loss"] = float(s.aux_loss.detach())
        return loss, metrics, int(s.chosen_tokens.sum().item() + s.rejected_tokens.sum().item())

    def evaluate(self, model: "nn.Module", rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Loss, reward accuracy and margin on the held-out pairs (nothing without --val).

        The engine calls it on every rank under no_grad, autocast and eval mode; each rank scores every
        world_size-th pair and the sums are combined over ranks.
        """
        if self.val is None:
            return {}
        import torch

        from matelike.data.preference import collate_pairs
        from matelike.train.distributed import sum_over_ranks

        order = np.argsort(-self.val.lengths(), kind="stable")[rank::world_size]
        # sums of: loss, correct, margin, chosen logp, rejected logp, pairs
        totals = [0.0] * 6
        with torch.no_grad():
            for start in range(0, len(order), self.eval_batch_size):
                idx = order[start : start + self.eval_batch_size].tolist()
                batch = collate_pairs(self.val, idx, self.data.pad_id)
                s = score_pairs(model, batch)
                ref_c, ref_r = self._reference(batch, self.val_ref_logps, s.chosen.device)
                out = preference_loss(
                    self.loss_type, s.chosen, s.rejected, s.chosen_tokens, s.rejected_tokens, ref_c, ref_r,
                    beta=self.beta, simpo_gamma=self.simpo_gamma,
                )
                margin = out.chosen_rewards - out.rejected_rewards
                for k, v in enumerate((out.losses.sum(), (margin > 0).sum(), margin.sum(), s.chosen.sum(),
                                       s.rejected.sum(), len(idx))):
                    totals[k] += float(v)
        totals = sum_over_ranks(totals)
        n = max(totals[5], 1.0)
        return {
            "val_loss": totals[0] / n,
            "val_reward_accuracy": totals[1] / n,
            "val_reward_margin": totals[2] / n,
            "val_logps_chosen": totals[3] / n,
            "val_logps_rejected": totals[4] / n,
        }

    # helpers ---------------------------------------------------------------------------------------------
    def _reference(self, batch: dict, table: "torch.Tensor | None", device: "torch.device") -> tuple[Any, Any]:
        """Reference (chosen, rejected) log-probs for the batch, or (None, None) for reference-free losses."""
        if not needs_reference(self.loss_type):
            return None, None
        import torch

        if self.ref_model is not None:
            with torch.no_grad():
                r = score_pairs(self.ref_model, batch)
            return r.chosen.detach(), r.rejected.detach()
        assert table is not None
        rows = table[batch["index"].cpu()]
        return rows[:, 0].to(device), rows[:, 1].to(device)


def _pair_metrics(out: Any, s: PairScores) -> dict[str, float]:
    """Per-step numbers: reward accuracy and margin, mean rewards, mean completion log-probs."""
    margin = out.chosen_rewards - out.rejected_rewards
    return {
        "reward_accuracy": (margin > 0).float().mean().item(),
        "reward_margin": margin.mean().item(),
        "rewards_chosen": out.chosen_rewards.mean().item(),
        "rewards_rejected": out.rejected_rewards.mean().item(),
        "logps_chosen": s.chosen.detach().float().mean().item(),
        "logps_rejected": s.rejected.detach().float().mean().item(),
    }


# ---- reference log-probs, once before training --------------------------------------------------------------

def reference_tables(
    model: "nn.Module", pairs: "PreferencePairs", val: "PreferencePairs | None", out: Path, *, batch_size: int,
    pad_id: int, precision: Any, info: Any,
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Reference log-probs of the training (and held-out) pairs under `model` (the initial weights).

    Cached in OUT/reference_logps.pt with fingerprints of the weights, the rendered data and the precision,
    so a resumed run (whose model is loaded from --init again) reuses them and a changed input recomputes.
    Rank 0 reads the cache and shares it; otherwise every rank scores its share and the shares are summed.
    """
    import torch

    from matelike.train.distributed import broadcast_object

    path = out / REFERENCE_FILE
    key = {
        "model": model_fingerprint(model), "pairs": pairs_fingerprint(pairs),
        "val": pairs_fingerprint(val) if val is not None else None, "precision": precision.name,
    }
    cached = None
    if info.is_main and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                cached = (blob["train"], blob.get("val"))
            else:
                print(f"matelike: {path} was made from other weights or data; recomputing", file=sys.stderr)
        except Exception as e:  # a torn or foreign file: recompute rather than fail
            print(f"matelike: cannot read {path} ({e}); recomputing", file=sys.stderr)
    cached = broadcast_object(cached, info)
    if cached is not None:
        return cached[0], cached[1]
    autocast = precision.autocast()
    train = compute_reference_logps(model, pairs, batch_size, pad_id, autocast, info.rank, info.world_size)
    val_t = None
    if val is not None:
        val_t = compute_reference_logps(model, val, batch_size, pad_id, precision.autocast(), info.rank,
                                        info.world_size)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key, "train": train, "val": val_t}, tmp)
        tmp.replace(path)
    return train, val_t


# ---- command line -------------------------------------------------------------------------------------------

# Engine defaults for preference training: a small learning rate (the policy must stay near the reference),
# short warmup, no weight decay (it would pull the weights away from the reference for no reason).
DPO_DEFAULTS: dict[str, Any] = {
    "lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 10, "batch_size": 8, "seq_len": None, "weight_decay": 0.0,
    "save_every": 500, "log_every": 10,
}


def _cmd_dpo(args: argparse.Namespace) -> int:
    import json

    from matelike.data.packed import PackMismatchError
    from matelike.data.preference import NoPairsError, PreferenceBatches, read_pair_sets
    from matelike.data.records import BadRecordReport, DataFileError
    from matelike.train import TrainConfig, Trainer
    from matelike.train.config import StageStartError, follow_small_lr, start_from_init
    from matelike.train.precision import Precision

    beta = DEFAULT_BETA[args.loss] if args.beta is None else args.beta
    follow_small_lr(args, DPO_DEFAULTS["min_lr"])  # common DPO learning rates (5e-7) sit below the floor
    try:
        info, model, tokenizer = start_from_init(args)
    except StageStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq_len = args.seq_len
    config = TrainConfig.from_args(args, stage="dpo", init=str(args.init), loss=args.loss, beta=beta,
                                   simpo_gamma=args.simpo_gamma, ref_in_memory=args.ref_in_memory,
                                   rpo_alpha=args.rpo_alpha)
    report = BadRecordReport() if info.is_main else BadRecordReport(stream=_Null())
    try:
        pairs, val, stats, val_stats = read_pair_sets(args.data, args.val, tokenizer, seq_len, report, info.is_main)
    except NoPairsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataFileError, PackMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info.is_main:
        config.out.mkdir(parents=True, exist_ok=True)
        summary = {"train": stats.to_dict(), "val": val_stats.to_dict() if val_stats else None,
                   "bad_records": report.summary()}
        (config.out / "dpo_data.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")

    ref_model = ref_logps = val_ref = None
    if needs_reference(args.loss):
        if args.ref_in_memory:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        else:
            precision = Precision.create(config.dtype, info.device)
            ref_logps, val_ref = reference_tables(model, pairs, val, config.out, batch_size=2 * config.batch_size,
                                                  pad_id=tokenizer.pad_id, precision=precision, info=info)
    task = DPOTask(
        PreferenceBatches(pairs, config.batch_size, tokenizer.pad_id, seed=config.seed), loss_type=args.loss,
        beta=beta, simpo_gamma=args.simpo_gamma, ref_logps=ref_logps, ref_model=ref_model, val=val,
        val_ref_logps=val_ref, eval_batch_size=2 * config.batch_size, aux_loss_coef=model.config.aux_loss_coef
        if model.config.is_moe else 0.0, rpo_alpha=args.rpo_alpha,
    )
    result = Trainer(config, model, tokenizer, task).fit()
    if info.is_main:
        print(json.dumps({"out": str(config.out), "step": result.step, "tokens": result.tokens,
                          **{k: v for k, v in result.last_metrics.items() if k not in ("step", "tokens")}}))
    return result.exit_code


class _Null:
    """A write-only sink: ranks other than 0 count bad records without printing them again."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def add_cli(table: "CommandTable") -> None:
    from matelike.train import add_engine_args

    p = table.command("dpo", "preference optimisation: DPO / IPO / SimPO / ORPO (also `matelike dpo make-pairs`)",
                      _cmd_dpo)
    p.add_argument("--init", required=True, type=Path, help="model directory to start from (the SFT model)")
    p.add_argument("--data", required=True, nargs="+", help="{prompt, chosen, rejected} jsonl/parquet files or dirs, or one file packed by "
                        "`matelike data pack --format dpo`")
    p.add_argument("--val", nargs="+", default=None, help="held-out pairs: reward accuracy at each evaluation")
    p.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid",
                   help="sigmoid (DPO), ipo; simpo and orpo are reference-free")
    p.add_argument("--beta", type=float, default=None,
                   help="strength: DPO/IPO/ORPO default 0.1 (ORPO's lambda), SimPO 2.0")
    p.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin")
    p.add_argument("--ref-in-memory", action="store_true",
                   help="score the reference on the fly with a frozen copy instead of precomputing once")
    p.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="add this times the chosen answers' per-token NLL to the loss (RPO); 0 = plain loss")
    add_engine_args(p, DPO_DEFAULTS)
