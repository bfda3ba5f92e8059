"""`matelike rl --algo ppo`: PPO with a value model, as a task of the one training engine.

The conventions are TRL's PPOTrainer's: every completion token is an action; its reward is the k1 KL to the
frozen initial model scaled by -`kl_coef`, and the sequence's score (the reward model's, plus any verifiable
rewards with their weights) is added on the completion's last token: its stop token, or the last sampled token
when it hit --max-new-tokens. GAE (`gamma`, `lam`) over the value model's per-token values gives advantages,
whitened over every trained token of the rollout (all micro-batches, all processes), and returns. Each rollout
is trained for `updates_per_rollout` (--ppo-epochs) optimiser steps with the clipped surrogate and the clipped
value loss (`cliprange_value`, weighted by `vf_coef`). One deliberate difference from TRL: the score sits on
the last real token, not on the padding position after it.

The value model is a Transformer with a scalar head on every position (matelike.reward.model.RewardModel's
layout), initialised from the reward model or from the policy (`--value-init`). Policy and value model are one
module, PolicyAndValue, which the engine trains, wraps in DDP (so both models' gradients are synchronised by
one all-reduce) and checkpoints (so a resume restores the value model and its optimiser state too); the model
directory at --out is the policy alone, as every stage writes it.

Resume, rollout sampling, rewards and their metrics are GRPOTask's (matelike/rl/__init__.py): a checkpoint
taken between two PPO epochs of a rollout stores the rollout, old log-probs, values, advantages and returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from matelike.rl import PPO_DEFAULTS, GRPOTask

if TYPE_CHECKING:
    from matelike.model.transformer import Transformer
    from matelike.reward.model import RewardModel
    from matelike.rl.rewards import RewardFn
    from matelike.rl.rollout import PromptSet
    from matelike.tokenizer import Tokenizer


@dataclass
class PolicyValueOutput:
    logits: torch.Tensor  # (N, V) of the target positions, row-major (the policy's target_logits_only)
    values: torch.Tensor  # (B, T) the value model's estimate at every position
    aux_loss: torch.Tensor | None  # MoE load balancing of both models, already weighted; None for dense models


class PolicyAndValue(nn.Module):
    """The policy (a Transformer) and its value model (a RewardModel read at every position) as one module, so
    the engine's DDP wrapping, optimiser and checkpoints cover both."""

    def __init__(self, policy: "Transformer", value: "RewardModel") -> None:
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def values(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) values of every position and the value backbone's MoE aux loss."""
        out = self.value.model(input_ids, hidden_only=True)
        # sum over the single label: the head's (B, T, 1) as (B, T) in a new tensor (see RewardModel.forward)
        return self.value.score(out.hidden).sum(-1), out.aux_loss

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> PolicyValueOutput:
        out = self.policy(input_ids, targets, target_logits_only=True)
        values, value_aux = self.values(input_ids)
        aux = None
        for a, cfg in ((out.aux_loss, self.policy.config), (value_aux, self.value.config)):
            if a is not None and cfg.aux_loss_coef:
                aux = cfg.aux_loss_coef * a if aux is None else aux + cfg.aux_loss_coef * a
        return PolicyValueOutput(out.logits, values, aux)

    def flops_per_token(self, seq_len: int) -> float:
        return self.policy.flops_per_token(seq_len) + self.value.flops_per_token(seq_len)


def value_model_from_policy(policy: "Transformer") -> "RewardModel":
    """A value model on a copy of the policy's weights, its head at zero: every value starts at 0, a neutral
    baseline, instead of random numbers the first updates would have to unlearn."""
    import copy

    from matelike.reward.model import RewardModel

    value = RewardModel(policy.config, backbone=copy.deepcopy(policy))
    nn.init.zeros_(value.score.weight)
    return value


def policy_export(tokenizer: "Tokenizer") -> Callable[[nn.Module, Path], None]:
    """The engine's export for PolicyAndValue: the model directory holds the policy alone."""

    def export(model: nn.Module, out: Path) -> None:
        from matelike.model.io import save_model

        save_model(model.policy if isinstance(model, PolicyAndValue) else model, tokenizer, out)

    return export


def grpo_only(beta: float, dynamic_sampling: int, scale_rewards: str, baseline: str = "mean",
              positive_only: bool = False, constrained: bool = False) -> str | None:
    """What is wrong with GRPO's settings under PPO (None when they are off)."""
    if beta:
        return "--beta is GRPO's KL in the loss; PPO folds the KL into the reward: use --kl-coef"
    if dynamic_sampling:
        return "--dynamic-sampling is GRPO's (it needs groups); PPO takes every rollout"
    if scale_rewards != "group":
        return "--scale-rewards is GRPO's; PPO whitens its GAE advantages"
    if baseline != "mean" or positive_only:
        return "--baseline and --positive-only are GRPO's; PPO's baseline is its value model"
    if constrained:
        return "--constrained is GRPO's for now; PPO samples free answers"
    return None


class PPOTask(GRPOTask):
    """PPO as an engine Task. `model` is the PolicyAndValue the engine trains (the same object); its policy
    samples. `ref_model`, a frozen copy of the initial policy, is needed when `kl_coef` > 0. The other
    arguments are GRPOTask's (`updates_per_rollout` is the number of PPO epochs; `epsilon`/`epsilon_high` the
    policy's clip range; `loss_type` how the surrogate averages tokens); GRPO-only ones must stay off.

    Metrics per step, besides the rollout's (reward, per task and per function, completion length, truncated):
    `kl` (k1 per completion token), `non_score_reward` (-kl_coef·KL summed over a completion, mean),
    `rlhf_reward` (reward + non_score_reward), `pg_loss`, `value_loss`, `value_clip_fraction`, `value_mean`,
    `return_mean`, and the policy's clip fractions, ratio and entropy.
    """

    min_group = 1
    group_why = ""

    def __init__(self, model: PolicyAndValue, prompts: "PromptSet", rewards: Sequence["RewardFn"], *,
                 ref_model: nn.Module | None = None, kl_coef: float = PPO_DEFAULTS["kl_coef"],
                 gamma: float = PPO_DEFAULTS["gamma"], lam: float = PPO_DEFAULTS["lam"],
                 cliprange_value: float = PPO_DEFAULTS["cliprange_value"], vf_coef: float = PPO_DEFAULTS["vf_coef"],
                 group: int = 1, updates_per_rollout: int = 4, **kwargs: Any) -> None:
        wrong = grpo_only(kwargs.get("beta", 0.0), kwargs.get("dynamic_sampling", 0),
                          kwargs.get("scale_rewards", "group"), kwargs.get("baseline", "mean"),
                          kwargs.get("positive_only", False), kwargs.get("constraint_for") is not None)
        if wrong:
            raise ValueError(wrong)
        if kl_coef < 0 or not 0 <= gamma <= 1 or not 0 <= lam <= 1 or cliprange_value <= 0 or vf_coef < 0:
            raise ValueError("PPO needs --kl-coef >= 0, --gamma and --lam in [0, 1], --cliprange-value > 0 and "
                             "--vf-coef >= 0")
        if kl_coef and ref_model is None:
            raise ValueError("--kl-coef > 0 needs the reference model")
        super().__init__(model.policy, prompts, rewards, ref_model=ref_model, group=group,
                         updates_per_rollout=updates_per_rollout, **kwargs)
        self.pv = model
        self.kl_coef, self.gamma, self.lam = kl_coef, gamma, lam
        self.cliprange_value, self.vf_coef = cliprange_value, vf_coef

    def _rollout(self, start: int, rank: int, world_size: int) -> tuple[list[dict], int]:
        """Sample and score this rank's share of the rollout at stream position `start` (as GRPO lays it out),
        then per micro-batch the old log-probs, reference log-probs and values (one no-grad pass each, under
        the training precision), the per-token rewards and GAE; advantages are whitened over the whole rollout
        on every rank."""
        from matelike.rl.losses import gae, masked_moments, ppo_token_rewards, whiten
        from matelike.train.distributed import sum_over_ranks

        B, A = self.batch_size, self.grad_accum
        groups = self._sample_groups([start + i * world_size + rank for i in range(B * A)])
        stats, _, consumed = self._rollout_stats(groups, groups, len(groups))
        if self.group == 1:  # one completion per prompt: "groups with equal rewards" says nothing
            stats.pop("zero_std_groups", None)
        device = next(self.policy.parameters()).device
        micro: list[dict] = []
        kl_sum = rows = 0.0
        autocast = self.autocast() if self.autocast else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            for mm in range(A):
                part = groups[mm * B:(mm + 1) * B]
                batch = self._collate(part)
                scores = torch.tensor([r for g in part for r in g["rewards"]], dtype=torch.float32, device=device)
                ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
                mask = targets != -100
                old = self._logps(self.policy, ids, targets)[0].float()
                ref = self._logps(self.ref_model, ids, targets)[0].float() if self.kl_coef else None
                values = self.pv.values(ids)[0].float() * mask
                rewards, kl = ppo_token_rewards(scores, old, ref, mask, self.kl_coef)
                adv, returns = gae(rewards, values, mask, self.gamma, self.lam)
                kl_sum += float(kl.sum())
                rows += float(mask.any(dim=1).sum())
                batch.update(old_logps=old.cpu(), values=values.cpu(), returns=returns.cpu(), advantages=adv.cpu())
                micro.append(batch)
        moments = masked_moments([(b["advantages"], b["targets"] != -100) for b in micro])
        n, s, s2, kl_total, n_rows, ret_sum, val_sum = sum_over_ranks(
            moments + [kl_sum, rows, sum(float(b["returns"].sum()) for b in micro),
                       sum(float(b["values"].sum()) for b in micro)])
        mean = s / n if n else 0.0
        var = (s2 - s * s / n) / (n - 1) if n > 1 else 0.0  # unbiased, as TRL's masked_whiten
        for b in micro:
            b["advantages"] = whiten(b["advantages"], b["targets"] != -100, mean, max(var, 0.0))
        non_score = -self.kl_coef * kl_total / max(n_rows, 1.0)
        stats.update(kl=kl_total / max(n, 1.0), non_score_reward=non_score, rlhf_reward=stats["reward"] + non_score,
                     value_mean=val_sum / max(n, 1.0), return_mean=ret_sum / max(n, 1.0))
        for b in micro:
            b["stats"] = stats
        return micro, start + consumed * world_size

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        """Clipped surrogate on the whitened per-token advantages plus vf_coef x the clipped value loss."""
        from matelike.rl.losses import clipped_value_loss, grpo_loss

        targets = batch["targets"]
        out = model(batch["input_ids"], targets)
        logps, entropy = self._target_logps(out.logits, targets, with_entropy=True)
        mask = targets != -100
        # The first epoch's ratio is exactly 1: the rollout's policy is this one, whatever float noise the
        # rollout's separate no-grad forward carries.
        old = logps.detach() if batch["first_update"] else batch["old_logps"]
        res = grpo_loss(logps, old, batch["advantages"], mask, loss_type=self.loss_type, epsilon=self.epsilon,
                        epsilon_high=self.epsilon_high, max_completion_len=self.max_new_tokens)
        vl = clipped_value_loss(out.values.float(), batch["values"], batch["returns"], mask, self.cliprange_value)
        loss = res.loss + self.vf_coef * vl.loss
        if out.aux_loss is not None:  # MoE load balancing stays on
            loss = loss + out.aux_loss
        n = int(mask.sum())
        metrics = dict(batch["stats"])
        metrics.update(pg_loss=float(res.loss.detach()), value_loss=float(vl.loss.detach()),
                       value_clip_fraction=vl.clip_fraction,
                       clip_fraction=res.clip_fraction, clip_low=res.clip_low, clip_high=res.clip_high,
                       ratio=res.ratio_mean if n else 1.0,
                       entropy=float(entropy.sum()) / n if n and entropy is not None else 0.0)
        return loss, metrics, n
