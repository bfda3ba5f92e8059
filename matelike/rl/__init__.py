"""`matelike rl --algo grpo|ppo`: reinforcement learning as a task of the one training engine.

GRPO is here; PPO (a value model, GAE, the KL in the reward, a reward model's score) is matelike/rl/ppo.py,
a subclass of GRPOTask that shares its rollouts, rewards, cursor and resume.

Each optimiser step's micro-batches are rollouts of the current policy: `--batch-size` prompts per micro-batch
per process, `--group` completions per prompt sampled with the KV cache (a prompt prefilled once for its
group), scored by the rewards (matelike/rl/rewards.py), turned into group-relative advantages and trained with
the clipped surrogate (matelike/rl/losses.py). `--updates-per-rollout U` replays a rollout for U optimiser
steps: the first sees ratio exactly 1, the later ones the importance ratio against the log-probs the rollout
was sampled with, which the clip bounds. `--dynamic-sampling ROUNDS` sets aside groups whose rewards are all
equal (they carry no gradient) and samples more prompts in their place. `--baseline greedy` (ReMax) decodes
each prompt greedily too and compares its samples with that answer's reward instead of the group's mean.
`--constrained` samples segmentation and entity answers under their answer shapes (matelike/model/constraints.py),
and the loss reads the same masked distribution. Precision, accumulation, clipping, schedule, checkpoints,
resume, DDP and metrics.jsonl are the engine's (matelike/train/).

Resume is exact: a rollout's completions depend only on the weights and on the seeds of its prompts' positions
in the data stream (rollout.sample_seed), and the cursor is the next rollout's stream position, so a run
resumed at a rollout boundary draws what the uninterrupted run drew. A checkpoint taken between the updates of
one rollout stores that rollout (every rank's share) in the cursor, since the weights that sampled it are gone.

Under DDP the loss calls the wrapped module (its gradients are synchronised); generation uses the plain module
the task was given, which holds the same weights. FSDP is refused: generation needs whole weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence

import numpy as np

from matelike.rl.losses import BASELINES, LOSS_TYPES, SCALE_REWARDS

# TRL's PPOConfig defaults for `--algo ppo`
PPO_DEFAULTS: dict[str, float] = {"kl_coef": 0.05, "gamma": 1.0, "lam": 0.95, "cliprange_value": 0.2, "vf_coef": 0.1}

if TYPE_CHECKING:
    import torch
    from torch import nn

    from matelike.cli import CommandTable
    from matelike.model.constraints import Constraint
    from matelike.rl.rewards import RewardFn
    from matelike.rl.rollout import PromptSet

ALGOS = ("grpo", "ppo")


class GRPOTask:
    """GRPO as an engine Task (protocol in matelike/train/engine.py).

    `policy` is the plain module the engine trains (the same object), used for sampling; `ref_model` a frozen
    copy of the initial weights, needed only with `beta` > 0. `decode(ids)` turns completion ids into the text
    the rewards read. `autocast()` (the engine's precision) wraps the forwards that score a rollout for later
    updates and for the reference, so they match the training forward; sampling runs in the weights' dtype.
    Metrics per step: reward mean and std overall, per task and per reward function, share of
    groups whose rewards are all equal, completion length, share truncated, entropy of the sampling
    distribution, clip fractions, mean ratio and, with a reference, the k3 KL.
    """

    min_group = 2  # advantages compare a prompt's samples
    group_why = " (advantages compare a prompt's samples)"

    def __init__(
        self, policy: "nn.Module", prompts: "PromptSet", rewards: Sequence["RewardFn"], *,
        decode: Callable[[Sequence[int]], str], stop_ids: Sequence[int], pad_id: int,
        reward_weights: Sequence[float] | None = None, reward_names: Sequence[str] | None = None,
        batch_size: int = 4, grad_accum: int = 1, group: int = 8, max_new_tokens: int = 64,
        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, loss_type: str = "dapo",
        epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
        ref_model: "nn.Module | None" = None, scale_rewards: str = "group", mask_truncated: bool = False,
        updates_per_rollout: int = 1, seed: int = 0, autocast: Callable[[], ContextManager] | None = None,
        generation_batch: int = 64, aux_loss_coef: float = 0.0, dynamic_sampling: int = 0,
        baseline: str = "mean", positive_only: bool = False,
        constraint_for: "Callable[[int], Constraint | None] | None" = None,
    ) -> None:
        from matelike.rl.rewards import reward_name
        from matelike.sampling import SamplingParams

        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown --loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"unknown --scale-rewards {scale_rewards!r}; choose one of {', '.join(SCALE_REWARDS)}")
        if baseline not in BASELINES:
            raise ValueError(f"unknown --baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
        if group < self.min_group:
            raise ValueError(f"--group must be >= {self.min_group}{self.group_why}, got {group}")
        if not temperature > 0:
            raise ValueError(f"--temperature must be > 0 for RL rollouts, got {temperature}")
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # ValueError for --top-k 0 etc.
        if updates_per_rollout < 1 or max_new_tokens < 1:
            raise ValueError("--updates-per-rollout and --max-new-tokens must be >= 1")
        if beta and ref_model is None:
            raise ValueError("--beta > 0 needs the reference model")
        if len(prompts) == 0:
            raise ValueError("no prompts")
        self.policy, self.prompts, self.rewards = policy, prompts, list(rewards)
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.rewards)
        if len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"{len(self.rewards)} rewards but {len(self.reward_weights)} --reward-weights")
        names = list(reward_names) if reward_names is not None else [reward_name(f) for f in self.rewards]
        self.reward_names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
        self.decode, self.stop_ids, self.pad_id = decode, tuple(stop_ids), pad_id
        self.batch_size, self.grad_accum, self.group = batch_size, grad_accum, group
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.loss_type, self.epsilon = loss_type, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.beta, self.ref_model = beta, ref_model
        self.scale_rewards, self.mask_truncated = scale_rewards, mask_truncated
        self.updates = updates_per_rollout
        self.seed, self.autocast, self.generation_batch = seed, autocast, generation_batch
        self.aux_loss_coef = aux_loss_coef
        if dynamic_sampling < 0:
            raise ValueError(f"--dynamic-sampling must be >= 0, got {dynamic_sampling}")
        self.dynamic_sampling = dynamic_sampling
        self.baseline, self.positive_only = baseline, positive_only
        self.constraint_for = constraint_for
        self.tasks = prompts.tasks()
        # dapo is a mean over every token of the step: micro-batches and ranks weigh by their tokens. grpo and
        # dr_grpo are means over completions, and every micro-batch holds batch_size x group of them.
        self.weight_by_tokens = loss_type == "dapo"
        self._orders: dict[int, np.ndarray] = {}
        # (start time, seconds sampling, tokens sampled) per rollout on this rank, for `matelike bench rl`
        self.rollout_log: list[tuple[float, float, int]] = []

    # ---- data stream ---------------------------------------------------------------------------------------
    def _prompt_at(self, position: int) -> int:
        """Index of the prompt at `position` of the stream: a fresh seeded shuffle every epoch."""
        n = len(self.prompts)
        epoch = position // n
        if epoch not in self._orders:
            # a rollout may straddle two epochs: keep the last two orders
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed % 2**63, epoch]).permutation(n)
        return int(self._orders[epoch][position % n])

    def epoch_size(self, world_size: int) -> int:
        return math.ceil(len(self.prompts) / (world_size * self.batch_size)) * self.updates

    def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[dict, dict]]:
        """Micro-batches of rollout after rollout, each replayed `updates_per_rollout` times. The cursor says
        where the next micro-batch is: the rollout's first position in the prompt stream, update, micro-batch,
        and (between two updates of one rollout, where the engine saves) the rollout itself and where the next
        one starts."""
        c = dict(cursor or {})
        pos, u, m = int(c.get("position", 0)), int(c.get("update", 0)), int(c.get("micro", 0))
        saved, nxt_pos = c.get("saved"), c.get("next")
        while True:
            if saved is not None:
                if len(saved) != world_size:
                    raise RuntimeError(f"this checkpoint was taken inside a rollout by {len(saved)} processes; "
                                       f"resume it with as many")
                micro = _from_plain(saved[rank])
            elif u > 0 or m > 0:
                raise RuntimeError("this checkpoint was taken inside a rollout and does not hold it; resume from "
                                   "another one")
            else:
                micro, nxt_pos = self._rollout(pos, rank, world_size)
            plain = None
            for uu in range(u, self.updates):
                for mm in range(m, len(micro)):
                    batch = dict(micro[mm], first_update=uu == 0)
                    if mm + 1 < len(micro):
                        nxt = {"position": pos, "next": nxt_pos, "update": uu, "micro": mm + 1, "saved": saved}
                    elif uu + 1 < self.updates:
                        if plain is None:
                            plain = self._gather_plain(micro, world_size)
                        nxt = {"position": pos, "next": nxt_pos, "update": uu + 1, "micro": 0, "saved": plain}
                    else:
                        nxt = {"position": nxt_pos, "next": None, "update": 0, "micro": 0, "saved": None}
                    yield batch, nxt
                m = 0
            pos, u, saved = int(nxt_pos), 0, None

    def _gather_plain(self, micro: list[dict], world_size: int) -> list:
        """Every rank's rollout as plain values (what a checkpoint's cursor can hold), rank by rank."""
        mine = _to_plain(micro)
        if world_size == 1:
            return [mine]
        import torch.distributed as dist

        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    # ---- rollouts ------------------------------------------------------------------------------------------
    def _sample_groups(self, positions: list[int]) -> list[dict]:
        """Sample and score a group for each stream position: one dict per group."""
        from matelike.rl.rewards import combine_rewards
        from matelike.rl.rollout import sample_completions, sample_seed

        G = self.group
        idx = [self._prompt_at(p) for p in positions]
        seeds = [sample_seed(self.seed, p, g) for p in positions for g in range(G)]
        shapes = [self.constraint_for(i) if self.constraint_for else None for i in idx]
        t0 = time.perf_counter()
        comps = sample_completions(
            self.policy, [self.prompts.ids[i] for i in idx for _ in range(G)], seeds,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            stop_ids=self.stop_ids, max_batch=self.generation_batch, constraints=[c for c in shapes for _ in range(G)],
        )  # in the weights' dtype, not under autocast: the engine's KV cache holds the weights' dtype
        greedy: list = []
        if self.baseline == "greedy":  # each prompt's greedy answer, the baseline its samples must beat
            greedy = sample_completions(
                self.policy, [self.prompts.ids[i] for i in idx], seeds[::G], max_new_tokens=self.max_new_tokens,
                temperature=0.0, top_k=None, top_p=None, stop_ids=self.stop_ids, max_batch=self.generation_batch,
                constraints=shapes)
        self.rollout_log.append((t0, time.perf_counter() - t0, sum(len(c.tokens) for c in comps + greedy)))
        every = comps + greedy
        answers = [c.tokens[:-1] if c.stopped else c.tokens for c in every]
        rows = [i for i in idx for _ in range(G)] + (idx if greedy else [])
        # One call per reward function for the whole rollout, before any training forward.
        total, per_fn = combine_rewards(self.rewards, self.reward_weights, [self.prompts.prompts[i] for i in rows],
                                        [self.decode(a) for a in answers], [self.prompts.fields[i] for i in rows],
                                        answers)
        n = len(idx) * G
        return [{"prompt": self.prompts.ids[i], "task": self.prompts.fields[i].get("task"), "shape": shapes[k],
                 "comps": comps[k * G:(k + 1) * G], "rewards": total[k * G:(k + 1) * G],
                 "greedy": total[n + k] if greedy else None,
                 "per_fn": [vals[k * G:(k + 1) * G] for vals in per_fn]} for k, i in enumerate(idx)]

    def _has_signal(self, group: dict) -> bool:
        """Whether a group's advantages can be non-zero: its rewards differ (from the greedy answer's too, with
        that baseline)."""
        rewards = group["rewards"] + ([group["greedy"]] if group["greedy"] is not None else [])
        return max(rewards) != min(rewards)

    def _rollout(self, start: int, rank: int, world_size: int) -> tuple[list[dict], int]:
        """Sample, score and lay out this rank's share of the rollout starting at stream position `start`:
        grad_accum micro-batches of batch_size groups. Rank r takes positions start + i·world + r, so N
        processes with batch B see the prompts one process with batch N·B sees. With dynamic sampling, groups
        whose rewards are all equal are set aside and more prompts drawn, up to `dynamic_sampling` rounds
        (groups set aside fill what is still missing). Returns the micro-batches and the next rollout's start
        (the same on every rank)."""
        import torch

        from matelike.rl.losses import group_advantages

        B, G, A = self.batch_size, self.group, self.grad_accum
        need = B * A
        used: list[dict] = []
        drawn: list[dict] = []
        i = 0
        for _ in range(max(1, self.dynamic_sampling)):
            groups = self._sample_groups([start + (i + j) * world_size + rank for j in range(need - len(used))])
            i += len(groups)
            drawn += groups
            if not self.dynamic_sampling:
                used = groups
                break
            used += [g for g in groups if self._has_signal(g)][: need - len(used)]
            if len(used) == need:
                break
        if len(used) < need:  # out of rounds: fill with groups that carry no signal (advantage 0)
            spare = [g for g in drawn if all(g is not u for u in used)]
            used += spare[: need - len(used)]
        rewards = torch.tensor([r for g in used for r in g["rewards"]], dtype=torch.float64)
        stats, batch_std, consumed = self._rollout_stats(drawn, used, i)
        baseline = torch.tensor([g["greedy"] for g in used], dtype=torch.float64) \
            if self.baseline == "greedy" else None
        adv = group_advantages(rewards, G, self.scale_rewards, batch_std=batch_std, baseline=baseline,
                               positive_only=self.positive_only)
        micro = []
        for mm in range(A):
            batch = self._collate(used[mm * B:(mm + 1) * B])
            batch["advantages"] = adv[mm * B * G:(mm + 1) * B * G].clone()
            batch["stats"] = stats
            micro.append(batch)
        if self.updates > 1 or self.beta:
            self._score_rollout(micro)
        return micro, start + consumed * world_size

    def _collate(self, groups: list[dict]) -> dict:
        """Training rows of these groups' completions, group after group (truncated ones untrained under
        --mask-truncated)."""
        from matelike.rl.rollout import allowed_targets, collate_rows

        comps = [c for g in groups for c in g["comps"]]
        trained = [c.stopped or not self.mask_truncated for c in comps]
        batch = collate_rows([g["prompt"] for g in groups for _ in range(self.group)], [c.tokens for c in comps],
                             trained, self.pad_id)
        if self.constraint_for is not None:
            batch.update(allowed_targets(comps, trained))
        return batch

    def _score_rollout(self, micro: list[dict]) -> None:
        """Per-token log-probs of the sampling policy (for the ratio of later updates) and of the reference."""
        import contextlib

        import torch

        device = next(self.policy.parameters()).device
        with torch.no_grad(), (self.autocast() if self.autocast else contextlib.nullcontext()):
            for batch in micro:
                ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
                if self.updates > 1:
                    batch["old_logps"] = self._logps(self.policy, ids, targets, batch=batch)[0].cpu()
                if self.beta:
                    assert self.ref_model is not None
                    batch["ref_logps"] = self._logps(self.ref_model, ids, targets, batch=batch)[0].cpu()

    def _rollout_stats(self, drawn: list[dict], used: list[dict], consumed: int
                       ) -> tuple[dict[str, float], float, int]:
        """Rollout metrics over every rank (the same numbers on each), the reward std of the groups trained on
        (for --scale-rewards batch) and the most positions any rank consumed. Rewards, lengths and the share
        of zero-variance groups describe every group sampled (what the policy does); with dynamic sampling
        `dynamic_draws` is groups sampled per group trained on."""
        from matelike.train.distributed import sum_over_ranks

        comps = [c for g in drawn for c in g["comps"]]
        rewards = [r for g in drawn for r in g["rewards"]]
        trained = [r for g in used for r in g["rewards"]]
        vals = [float(len(rewards)), float(sum(rewards)), float(sum(r * r for r in rewards)),
                float(sum(max(g["rewards"]) == min(g["rewards"]) for g in drawn)), float(len(drawn)),
                float(sum(len(c.tokens) for c in comps)), float(sum(not c.stopped for c in comps)),
                float(len(trained)), float(sum(trained)), float(sum(r * r for r in trained)), float(len(used))]
        for t in self.tasks:
            sel = [r for g in drawn if g["task"] == t for r in g["rewards"]]
            vals += [float(len(sel)), float(sum(sel))]
        if len(self.rewards) > 1:
            for k in range(len(self.rewards)):
                got = [v for g in drawn for v in g["per_fn"][k] if v is not None]
                vals += [float(len(got)), float(sum(got))]
        if self.baseline == "greedy":
            vals.append(float(sum(g["greedy"] for g in drawn)))
        vals = sum_over_ranks(vals)
        # ranks may draw different numbers of prompts: the stream moves on by the most any rank drew
        most = _max_over_ranks(consumed) if self.dynamic_sampling else consumed

        def std(n: float, s: float, s2: float) -> float:
            return math.sqrt(max((s2 - s * s / n) / (n - 1), 0.0)) if n > 1 else 0.0

        n, s, s2, zero, ngroups, length, trunc, nt, st, s2t, nused = vals[:11]
        stats = {"reward": s / n, "reward_std": std(n, s, s2), "zero_std_groups": zero / ngroups,
                 "completion_len": length / n, "truncated": trunc / n}
        if self.dynamic_sampling:
            stats["dynamic_draws"] = ngroups / nused
        k = 11
        for t in self.tasks:
            count, total = vals[k], vals[k + 1]
            if count:
                stats[f"reward_{t}"] = total / count
            k += 2
        if len(self.rewards) > 1:
            for name in self.reward_names:
                count, total = vals[k], vals[k + 1]
                if count:
                    stats[f"reward_fn_{name}"] = total / count
                k += 2
        if self.baseline == "greedy":  # what greedy decoding, the way eval answers, earns on these prompts
            stats["reward_greedy"] = vals[k] / ngroups
        return stats, std(nt, st, s2t), most

    # ---- loss ----------------------------------------------------------------------------------------------
    def _logps(self, model: "nn.Module", ids: "torch.Tensor", targets: "torch.Tensor",
               with_entropy: bool = False, batch: dict | None = None
               ) -> tuple["torch.Tensor", "torch.Tensor | None", Any]:
        """(B, T) log-probs of the targets under the sampling distribution (0 where no target), the entropies
        of the target positions and the model output. `batch` carries the constraints' allowed tokens."""
        # The output projection runs on the completion positions only (prompts are most of a row); the logits
        # come back in row-major order of the mask. The model's own cross-entropy comes along and is not used.
        out = model(ids, targets, target_logits_only=True)
        full, ent = self._target_logps(out.logits, targets, with_entropy, batch)
        return full, ent, out

    def _target_logps(self, logits: "torch.Tensor", targets: "torch.Tensor", with_entropy: bool = False,
                      batch: dict | None = None) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        """(B, T) log-probs under the sampling distribution from (N, V) logits of the target positions: with
        constrained rollouts (`batch["allowed_pairs"]`), the masked distribution the engine sampled from."""
        import torch

        from matelike.rl.losses import token_logps

        mask = targets != -100
        allowed = None
        if batch is not None and "allowed_pairs" in batch:
            allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
            allowed[batch["constrained"].to(logits.device)] = False
            pairs = batch["allowed_pairs"].to(logits.device).view(-1, 2)
            allowed[pairs[:, 0], pairs[:, 1]] = True
        lp, ent = token_logps(logits, targets[mask], temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, allowed=allowed, with_entropy=with_entropy)
        return torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp), ent

    def loss(self, model: "nn.Module", batch: dict) -> tuple["torch.Tensor", dict[str, float], int]:
        """The clipped surrogate over this micro-batch's completion tokens, the step's metrics, its tokens."""
        from matelike.rl.losses import grpo_loss

        targets = batch["targets"]
        logps, entropy, out = self._logps(model, batch["input_ids"], targets, with_entropy=True, batch=batch)
        mask = targets != -100
        old = logps.detach() if batch["first_update"] else batch["old_logps"]
        res = grpo_loss(logps, old, batch["advantages"], mask, loss_type=self.loss_type, epsilon=self.epsilon,
                        epsilon_high=self.epsilon_high, beta=self.beta, ref_logps=batch.get("ref_logps"),
                        max_completion_len=self.max_new_tokens)
        loss = res.loss
        aux = getattr(out, "aux_loss", None)
        if aux is not None and self.aux_loss_coef:  # MoE load balancing stays on
            loss = loss + self.aux_loss_coef * aux
        n = int(mask.sum())
        metrics = dict(batch["stats"])
        metrics.update(clip_fraction=res.clip_fraction, clip_low=res.clip_low, clip_high=res.clip_high,
                       ratio=res.ratio_mean if n else 1.0,
                       entropy=float(entropy.sum()) / n if n and entropy is not None else 0.0)
        if self.beta:
            metrics["kl"] = res.kl or 0.0
        return loss, metrics, n


def _max_over_ranks(value: int) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _constraints_of(prompts: "PromptSet", tokenizer: Any) -> "Callable[[int], Constraint | None]":
    """Prompt index -> the shape its answers are sampled in (`eval.answer_constraint`), built on first use."""
    from matelike.eval import answer_constraint
    from matelike.rl.rewards import prompt_text

    made: dict[int, Constraint | None] = {}

    def shape(i: int) -> "Constraint | None":
        if i not in made:
            fields = prompts.fields[i]
            row = {"prompt": prompt_text(prompts.prompts[i]), "input": fields.get("input")}
            made[i] = answer_constraint(fields.get("task"), row, tokenizer)
        return made[i]

    return shape


def _to_plain(micro: list[dict]) -> list[dict]:
    """Micro-batches as lists and floats (a checkpoint cursor holds only plain values)."""
    out = []
    for b in micro:
        out.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in b.items()})
    return out


def _from_plain(plain: list[dict]) -> list[dict]:
    import torch

    dtypes = {"input_ids": torch.long, "targets": torch.long, "advantages": torch.float32,
              "old_logps": torch.float32, "ref_logps": torch.float32, "values": torch.float32,
              "returns": torch.float32, "allowed_pairs": torch.long, "constrained": torch.bool}
    return [{k: torch.tensor(v, dtype=dtypes[k]) if k in dtypes else v for k, v in b.items()} for b in plain]


# ---- command line -------------------------------------------------------------------------------------------

# Engine defaults for RL: a small learning rate (the policy must move a little per rollout), no warmup or
# weight decay, a line of metrics per step (each step is a rollout: slow, and its rewards are the point).
RL_DEFAULTS: dict[str, Any] = {
    "lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 0, "batch_size": 4, "seq_len": None, "weight_decay": 0.0,
    "save_every": 50, "log_every": 1,
}


def _cmd_rl(args: argparse.Namespace) -> int:
    import copy

    import torch

    from matelike.data.records import BadRecordReport, DataFileError
    from matelike.model.generation import default_stop_ids
    from matelike.model.io import ModelDirError
    from matelike.reward.model import load_reward_model, scorer
    from matelike.rl.rewards import check_task_record, hack_references, load_reward, reward_name
    from matelike.rl.rollout import load_prompts
    from matelike.train import TrainConfig, Trainer
    from matelike.train.config import StageStartError, start_from_init
    from matelike.train.precision import Precision

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    ppo = args.algo == "ppo"
    if args.fsdp:
        return fail("matelike rl samples with whole weights; run it with DDP (without --fsdp)")
    ppo_flags = {"--value-init": args.value_init, "--kl-coef": args.kl_coef, "--gamma": args.gamma,
                 "--lam": args.lam, "--cliprange-value": args.cliprange_value, "--vf-coef": args.vf_coef}
    given = [k for k, v in ppo_flags.items() if v is not None]
    if not ppo and given:
        return fail(f"{', '.join(given)} only apply to --algo ppo")
    if ppo:
        from matelike.rl.ppo import grpo_only

        wrong = grpo_only(args.beta, args.dynamic_sampling, args.scale_rewards, args.baseline, args.positive_only,
                          args.constrained)
        if wrong:
            return fail(wrong)
    specs = args.reward if args.reward is not None else ([] if ppo else ["task"])
    if not specs and args.reward_model is None:
        return fail("--algo ppo needs a reward: --reward-model DIR (`matelike reward train`) and/or --reward "
                    "task|module:function")
    value_init = args.value_init or ("reward" if args.reward_model is not None else "policy")
    if ppo and value_init == "reward" and args.reward_model is None:
        return fail("--value-init reward needs --reward-model DIR")
    group = args.group if args.group is not None else (1 if ppo else 8)
    updates = args.updates_per_rollout if args.updates_per_rollout is not None else (4 if ppo else 1)
    try:
        rewards = [load_reward(spec) for spec in specs]
    except ValueError as e:
        return fail(str(e))
    weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(rewards)
    if len(weights) != len(rewards):
        return fail(f"{len(rewards)} --reward but {len(weights)} --reward-weights")
    names = [reward_name(f, spec) for f, spec in zip(rewards, specs)]
    try:
        info, model, tokenizer = start_from_init(args)
    except StageStartError as e:
        return fail(str(e))
    reward_model = None
    if args.reward_model is not None:
        try:
            reward_model, rm_tokenizer = load_reward_model(args.reward_model, info.device, torch.float32)
        except ModelDirError as e:
            return fail(f"--reward-model: {' '.join(str(e).splitlines())} (expected a `matelike reward train` "
                        f"directory)")
        if rm_tokenizer is None:
            return fail(f"--reward-model: {args.reward_model / 'tokenizer.json'}: not found; a reward model needs "
                        f"its tokenizer")
        if rm_tokenizer.sha256 != tokenizer.sha256:
            return fail(f"--reward-model {args.reward_model} has another tokenizer than --init {args.init} "
                        f"(tokenizer.json differs); the value model and the rewards read the policy's token ids: "
                        f"train the reward model from the same base model")
        reward_model.requires_grad_(False)
        # The reward model's score enters like any reward, with weight 1, before the --reward ones.
        rewards, weights, names = [scorer(reward_model, rm_tokenizer)] + rewards, [1.0] + weights, \
            ["reward_model"] + names
    seq_len = args.seq_len
    if args.max_new_tokens < 1 or args.max_new_tokens >= seq_len:
        return fail(f"--max-new-tokens must be between 1 and --seq-len - 1 ({seq_len - 1})")
    ppo_settings = {k: (v if v is not None else PPO_DEFAULTS[k]) for k, v in (
        ("kl_coef", args.kl_coef), ("gamma", args.gamma), ("lam", args.lam),
        ("cliprange_value", args.cliprange_value), ("vf_coef", args.vf_coef))} if ppo else {}
    config = TrainConfig.from_args(
        args, stage="rl", algo=args.algo, init=str(args.init), reward=specs, reward_weights=weights,
        reward_model=str(args.reward_model) if args.reward_model is not None else None, group=group,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, loss=args.loss, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
        beta=args.beta, scale_rewards=args.scale_rewards, mask_truncated=args.mask_truncated,
        updates_per_rollout=updates, dynamic_sampling=args.dynamic_sampling, baseline=args.baseline,
        positive_only=args.positive_only, constrained=args.constrained,
        **({"value_init": value_init, **ppo_settings} if ppo else {}))
    report = BadRecordReport() if info.is_main else BadRecordReport(max_shown=0)
    check = check_task_record if "task" in specs else None
    try:
        prompts = load_prompts(args.data, tokenizer, seq_len - args.max_new_tokens, report, check)
    except DataFileError as e:
        return fail(str(e))
    left_out: dict[str, int] = {}
    if specs == ["task"] and reward_model is None:
        # The task reward alone cannot score a task without a scorer (the demo's `chat` prompts): no reward at
        # all would apply to them, so they are left out, counted by task.
        # (check_task_record has refused the records without a string task)
        from matelike.eval.scoring import TASKS

        left_out = {t: n for t, n in prompts.task_counts().items() if t not in TASKS}
        if left_out:
            prompts = prompts.keep_if(lambda f: f.get("task") in TASKS)
    if info.is_main:
        print(f"rl prompts: {len(prompts)} usable, {report.summary()}", file=sys.stderr)
        if left_out:
            print("rl prompts left out, their task has no task reward: "
                  + ", ".join(f"{t}: {n}" for t, n in sorted(left_out.items())), file=sys.stderr)
    if len(prompts) == 0:
        print("error: no usable prompts in " + ", ".join(map(str, args.data)), file=sys.stderr)
        return 1
    if args.constrained:
        from matelike.model.constraints import TokenTrie

        try:
            TokenTrie.for_tokenizer(tokenizer)
        except ValueError as e:
            return fail(f"--constrained: {args.init / 'tokenizer.json'}: {e}")
    hacks = hack_references(prompts.prompts, prompts.fields) if "task" in specs else {}
    if info.is_main:
        config.out.mkdir(parents=True, exist_ok=True)
        summary = {"prompts": len(prompts), "tasks": prompts.task_counts(),
                   "bad_records": report.summary(), "left_out_by_task": left_out,
                   "reward_hack_references": hacks}
        (config.out / "rl_data.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
        if hacks:
            print("task reward of the known hacks on these prompts (the learned reward should beat them): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in hacks.items()), file=sys.stderr)
    precision = Precision.create(config.dtype, info.device)
    kl_to_ref = ppo_settings["kl_coef"] if ppo else args.beta
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if kl_to_ref else None
    common: dict[str, Any] = dict(
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop_ids=default_stop_ids(tokenizer),
        pad_id=tokenizer.pad_id, reward_weights=weights, reward_names=names, batch_size=config.batch_size,
        grad_accum=config.grad_accum, group=group, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, loss_type=args.loss,
        epsilon=args.epsilon, epsilon_high=args.epsilon_high, beta=args.beta, ref_model=ref_model,
        scale_rewards=args.scale_rewards, mask_truncated=args.mask_truncated, updates_per_rollout=updates,
        seed=config.seed, autocast=precision.autocast, generation_batch=args.generation_batch,
        dynamic_sampling=args.dynamic_sampling, baseline=args.baseline, positive_only=args.positive_only,
        aux_loss_coef=model.config.aux_loss_coef if model.config.is_moe else 0.0,
        constraint_for=_constraints_of(prompts, tokenizer) if args.constrained else None)
    trained: "nn.Module" = model
    export: Any = "default"
    try:
        if ppo:
            from matelike.rl.ppo import PolicyAndValue, PPOTask, policy_export, value_model_from_policy

            if reward_model is not None and value_init == "reward":
                value = copy.deepcopy(reward_model).train().requires_grad_(True)
            else:
                value = value_model_from_policy(model)
            trained, export = PolicyAndValue(model, value), policy_export(tokenizer)
            task: GRPOTask = PPOTask(trained, prompts, rewards, **ppo_settings, **common)  # type: ignore[arg-type]
        else:
            task = GRPOTask(model, prompts, rewards, **common)
    except ValueError as e:
        return fail(str(e))
    result = Trainer(config, trained, tokenizer, task, export=export).fit()
    if info.is_main:
        print(json.dumps({"out": str(config.out), "step": result.step, "tokens": result.tokens,
                          **{k: v for k, v in result.last_metrics.items() if k not in ("step", "tokens")}}))
    return result.exit_code


def add_cli(table: "CommandTable") -> None:
    from matelike.train import add_engine_args

    p = table.command("rl", "reinforcement learning: GRPO or PPO on task rewards, your own reward functions or a "
                            "reward model", _cmd_rl)
    p.add_argument("--init", required=True, type=Path, help="model directory to start from (the SFT or DPO model)")
    p.add_argument("--data", required=True, nargs="+",
                   help="{prompt, ...} jsonl/parquet/csv files or dirs (the demo's tasks_train.jsonl: prompt, "
                        "task, answer), or one file packed by `matelike data pack --format prompts`; the other "
                        "fields go to the reward functions")
    p.add_argument("--algo", choices=ALGOS, default="grpo", help="the RL algorithm")
    p.add_argument("--reward", nargs="+", default=None,
                   help="`task` (the demo tasks' scorers, by each record's task and answer) and/or module:function "
                        "of an importable module (installed or on PYTHONPATH), in TRL's reward_funcs convention: "
                        "f(prompts, completions, **fields) -> list of float or None (default: task for grpo, "
                        "none for ppo)")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, help="one weight per --reward (all 1)")
    p.add_argument("--reward-model", type=Path, default=None,
                   help="a `matelike reward train` directory whose score is added to the rewards with weight 1 "
                        "(PPO's reward; also usable with grpo)")
    p.add_argument("--group", type=int, default=None, help="completions sampled per prompt (grpo 8, ppo 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="rollouts sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="rollouts sample from the nucleus of mass p")
    p.add_argument("--loss", choices=LOSS_TYPES, default="dapo",
                   help="token averaging: grpo (per completion, then over completions), dr_grpo (sum / "
                        "completions x max-new-tokens), dapo (over every token)")
    p.add_argument("--scale-rewards", choices=SCALE_REWARDS, default="group",
                   help="divide advantages by the group's reward std, the batch's, or nothing (Dr. GRPO)")
    p.add_argument("--baseline", choices=BASELINES, default="mean",
                   help="what a sample's reward is compared with: its group's mean (GRPO) or the reward of the "
                        "prompt's greedy answer (ReMax; one greedy answer more per prompt)")
    p.add_argument("--constrained", action="store_true",
                   help="sample the answers of tasks with a fixed shape held to it, as `matelike eval` scores them "
                        "in its constrained rows: segmentation answers spell the prompt's sentence, entity answers "
                        "name spans of it; the loss's log-probs are those of the constrained distribution")
    p.add_argument("--positive-only", action="store_true",
                   help="train only on samples with an advantage above 0 (reinforce, never push down)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range below 1 (and above, unless --epsilon-high)")
    p.add_argument("--epsilon-high", type=float, default=None, help="clip range above 1 (DAPO's clip-higher: 0.28)")
    p.add_argument("--beta", type=float, default=0.0,
                   help="weight of the k3 KL to the initial model; 0 keeps no reference model in memory")
    p.add_argument("--updates-per-rollout", "--ppo-epochs", dest="updates_per_rollout", type=int, default=None,
                   help="optimiser steps on each batch of rollouts, PPO's epochs (grpo 1, ppo 4; above 1 the ratio "
                        "and the clip matter)")
    p.add_argument("--mask-truncated", action="store_true",
                   help="leave completions that hit --max-new-tokens out of the loss")
    p.add_argument("--dynamic-sampling", type=int, default=0, metavar="ROUNDS",
                   help="set aside groups whose rewards are all equal (no signal) and draw more prompts, up to "
                        "ROUNDS rounds of sampling per step (DAPO's dynamic sampling); 0 = off")
    p.add_argument("--generation-batch", type=int, default=64, help="completions decoded together at most")
    ppo = p.add_argument_group("ppo (TRL's PPOTrainer defaults)")
    ppo.add_argument("--value-init", choices=("reward", "policy"), default=None,
                     help="start the value model from the reward model (default with --reward-model) or from the "
                          "policy with a zero head")
    ppo.add_argument("--kl-coef", type=float, default=None,
                     help="weight of the per-token k1 KL to the initial model in the reward (0.05; 0 keeps no "
                          "reference model)")
    ppo.add_argument("--gamma", type=float, default=None, help="GAE discount (1.0)")
    ppo.add_argument("--lam", type=float, default=None, help="GAE lambda (0.95)")
    ppo.add_argument("--cliprange-value", type=float, default=None,
                     help="values move at most this far from the rollout's in the value loss (0.2)")
    ppo.add_argument("--vf-coef", type=float, default=None, help="weight of the value loss (0.1)")
    add_engine_args(p, RL_DEFAULTS)
