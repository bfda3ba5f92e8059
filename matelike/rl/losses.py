"""The RL objectives: GRPO's group-relative advantages, the clipped surrogate, the k3 KL, the sampling
log-probs, and PPO's per-token rewards, GAE, advantage whitening and clipped value loss.

Notation (per completion token t of completion i of a group): ratio r = π(y_t) / π_old(y_t), A_i the advantage,
ε and ε_high the clip range (clip-higher, DAPO). The per-token loss is

    -min(r·A_i, clip(r, 1-ε, 1+ε_high)·A_i)  (+ β·k3 when a reference is kept)

and `loss_type` says how tokens are averaged:

- grpo (Shao et al. 2024): mean over each completion's tokens, then over completions. A short answer's tokens
  weigh more than a long one's (the length bias Dr. GRPO points out).
- dr_grpo (Liu et al. 2025): the sum over every token divided by a constant, completions x max_new_tokens:
  no length bias, and the loss scale does not move with the answers' lengths.
- dapo (Yu et al. 2025): token-level mean over every token of the batch.

k3 (Schulman's estimator of KL(π || π_ref)): exp(ref - logp) - (ref - logp) - 1, unbiased and never negative.

The log-probabilities are those of the distribution the rollouts were *sampled* from: the logits divided by the
temperature, cut to top-k / top-p, as `matelike.model.generation.sample_next` does. Computing them at
temperature 1 over the full vocabulary (a mistake seen in peers) makes the importance ratio compare two
different policies.

PPO (Schulman et al. 2017, as TRL's PPOTrainer runs it on language models): each completion token t is an
action, the per-token reward is r_t = -kl_coef·(logπ_old(y_t) - logπ_ref(y_t)) (k1, the KL folded into the
reward) plus, on the completion's last token (its stop token, or the last sampled one when it hit the length
limit), the sequence's score. GAE (γ, λ) turns rewards and the value model's V_t into advantages A_t and
returns A_t + V_t; advantages are whitened over every trained token of the rollout. The surrogate above takes
the per-token A_t; the value loss is ½·max((V - R)², (clip(V, V_old ± c) - R)²), a token mean.

torch is imported inside the functions so that `matelike --help` does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
BASELINES: tuple[str, ...] = ("mean", "greedy")
# Added to the standard deviation before dividing: a group whose rewards are all equal has advantages 0, not NaN.
STD_EPS = 1e-4


def group_advantages(rewards: "torch.Tensor", group: int, scale: str = "group",
                     batch_std: float | None = None, baseline: "torch.Tensor | None" = None,
                     positive_only: bool = False) -> "torch.Tensor":
    """(N·G,) advantages of (N·G,) rewards laid out group after group: reward minus its group's mean, divided
    by the group's standard deviation (`group`), the whole batch's (`batch`; `batch_std` when the batch spans
    several processes) or by nothing (`none`, Dr. GRPO). Standard deviations are unbiased (n-1), as TRL's.

    `baseline` (N,), one per group, replaces the group's mean: the reward of the prompt's greedy answer for
    ReMax (Li et al. 2023), so a sample is pushed up exactly when it beats what greedy decoding answers. The
    group's standard deviation then takes the baseline in as one more reward, so a group whose samples agree
    with each other but not with the greedy answer still has a finite scale. `positive_only` keeps only the
    advantages above 0: samples are reinforced, none is pushed down."""
    import torch

    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown --scale-rewards {scale!r}; choose one of {', '.join(SCALE_REWARDS)}")
    if group < 1 or rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group}")
    r = rewards.double().view(-1, group)
    if baseline is None:
        adv = r - r.mean(dim=1, keepdim=True)
        spread = r
    else:
        b = baseline.double().view(-1, 1)
        if b.shape[0] != r.shape[0]:
            raise ValueError(f"{b.shape[0]} baselines for {r.shape[0]} groups")
        adv = r - b
        spread = torch.cat([r, b], dim=1)
    if scale == "group":
        std = spread.std(dim=1, keepdim=True) if spread.shape[1] > 1 else torch.zeros_like(r)
        adv = adv / (std + STD_EPS)
    elif scale == "batch":
        std = batch_std if batch_std is not None else (float(r.std()) if r.numel() > 1 else 0.0)
        adv = adv / (std + STD_EPS)
    if positive_only:
        adv = adv.clamp(min=0)
    return adv.view(-1).float()


def sampling_logits(logits: "torch.Tensor", tokens: "torch.Tensor", *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    allowed: "torch.Tensor | None" = None) -> "torch.Tensor":
    """(N, V) fp32 logits of the distribution `sample_next` draws from: tokens a constraint refused (`allowed`,
    (N, V) bool, as the engine masks them before sampling) at -inf, then divided by the temperature, tokens
    outside top-k / top-p at -inf.

    `tokens` (N,) are the tokens that were sampled; they always stay in the support. The training forward
    recomputes logits without the KV cache, so a token drawn right at the top-k / top-p boundary can fall a
    rounding error outside it; -inf there would make the ratio NaN.
    """
    import torch

    if not temperature > 0:
        raise ValueError(f"RL samples: temperature must be > 0, got {temperature}")
    x = logits.float() / temperature
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, tokens[:, None], True)
    if allowed is not None:
        x = x.masked_fill(~(allowed | keep), float("-inf"))
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill((x < kth) & ~keep, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop & ~keep, float("-inf"))
    return x


def token_logps(logits: "torch.Tensor", tokens: "torch.Tensor", *, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, allowed: "torch.Tensor | None" = None,
                with_entropy: bool = False) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Log-probabilities (N,) of `tokens` under the sampling distribution of (N, V) `logits` (with a
    constraint's `allowed` tokens, see `sampling_logits`), and its entropy (N,) when asked (a diagnostic:
    computed without gradient)."""
    import torch

    x = sampling_logits(logits, tokens, temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed)
    logp_all = torch.log_softmax(x, dim=-1)
    logps = logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = logp_all.exp()
            entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logps, entropy


def k3_kl(logps: "torch.Tensor", ref_logps: "torch.Tensor") -> "torch.Tensor":
    """Per-token k3 estimate of KL(π || π_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    import torch

    d = ref_logps - logps
    return torch.exp(d) - d - 1


@dataclass
class GRPOLoss:
    """The loss (scalar) and per-token diagnostics, each a mean over the loss's tokens."""

    loss: "torch.Tensor"
    clip_fraction: float
    clip_low: float
    clip_high: float
    kl: float | None
    ratio_mean: float


def grpo_loss(
    logps: "torch.Tensor", old_logps: "torch.Tensor", advantages: "torch.Tensor", mask: "torch.Tensor", *,
    loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
    ref_logps: "torch.Tensor | None" = None, max_completion_len: int | None = None,
) -> GRPOLoss:
    """The clipped surrogate over (B, T) per-token log-probs (policy, the policy that sampled, reference),
    (B,) advantages (one per completion: GRPO) or (B, T) (one per token: PPO) and a (B, T) mask of the tokens
    trained on (completion tokens, the stop token included).

    `max_completion_len` is Dr. GRPO's constant (default: T). The clip fraction counts the tokens whose
    gradient the clip removed: ratio below 1-ε with a negative advantage, above 1+ε_high with a positive one.
    """
    import torch

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown --loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl_tok = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl_tok
        kl = kl_tok
    n_tok = m.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (m.shape[0] * (max_completion_len or m.shape[1]))
    else:
        loss = (per_token * m).sum() / n_tok
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(m.dtype) * m
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(m.dtype) * m
        stats = torch.stack([low.sum(), high.sum(), (ratio * m).sum(),
                             (kl * m).sum() if kl is not None else m.new_zeros(())]) / n_tok
        low_f, high_f, ratio_mean, kl_mean = stats.tolist()
    return GRPOLoss(loss=loss, clip_fraction=low_f + high_f, clip_low=low_f, clip_high=high_f,
                    kl=kl_mean if kl is not None else None, ratio_mean=ratio_mean)


# ---- PPO ------------------------------------------------------------------------------------------------------

def last_token_index(mask: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(rows that have a trained token, the column of each such row's last one) of a (B, T) mask."""
    import torch

    rows = torch.nonzero(mask.any(dim=1)).squeeze(1)
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)
    return rows, last[rows]


def ppo_token_rewards(scores: "torch.Tensor", logps: "torch.Tensor", ref_logps: "torch.Tensor | None",
                      mask: "torch.Tensor", kl_coef: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(B, T) per-token rewards and (B, T) k1 KL: -kl_coef·(logps - ref_logps) on every trained token, and each
    row's score (B,) added on its last trained token (the stop token, or the last sampled one). Zero outside
    `mask`; a row without trained tokens gets nothing. Without a reference (kl_coef 0) the KL is 0."""
    import torch

    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m if ref_logps is not None else torch.zeros_like(logps)
    rewards = -kl_coef * kl
    rows, last = last_token_index(mask)
    rewards[rows, last] += scores.to(rewards.dtype)[rows]
    return rewards, kl


def gae(rewards: "torch.Tensor", values: "torch.Tensor", mask: "torch.Tensor", gamma: float = 1.0,
        lam: float = 0.95) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Generalised advantage estimation over (B, T) rows whose trained tokens (`mask`) are contiguous: returns
    (advantages, returns), 0 outside the mask.

    δ_t = r_t + γ·V_{t+1} - V_t with V after the last trained token 0 (the episode ends there), and
    A_t = δ_t + γλ·A_{t+1}; returns are A_t + V_t, the value loss's targets.
    """
    import torch

    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    cols = torch.nonzero(mask.any(dim=0)).squeeze(1)
    if cols.numel() == 0:
        return adv, adv.clone()
    first, end = int(cols[0]), int(cols[-1]) + 1
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(first, end)):  # only the columns that hold completion tokens
        nxt_m = m[:, t + 1] if t + 1 < m.shape[1] else torch.zeros_like(running)
        nxt_v = values[:, t + 1] * nxt_m if t + 1 < m.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        running = (delta + gamma * lam * nxt_m * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


def whiten(x: "torch.Tensor", mask: "torch.Tensor", mean: float, var: float, eps: float = 1e-8) -> "torch.Tensor":
    """(x - mean) / sqrt(var + eps) on the mask, 0 elsewhere; mean and (unbiased) variance come from the caller,
    who computes them over every micro-batch and process of a rollout (`masked_moments`)."""
    return (x - mean) * (var + eps) ** -0.5 * mask.to(x.dtype)


def masked_moments(parts: list[tuple["torch.Tensor", "torch.Tensor"]]) -> list[float]:
    """[count, sum, sum of squares] of the (values, mask) pairs' masked values, in float64, for whitening."""
    n = s = s2 = 0.0
    for x, mask in parts:
        v = x.double()[mask]
        n, s, s2 = n + v.numel(), s + float(v.sum()), s2 + float((v * v).sum())
    return [n, s, s2]


@dataclass
class ValueLoss:
    loss: "torch.Tensor"
    clip_fraction: float  # share of tokens where the clipped prediction gave the larger loss


def clipped_value_loss(values: "torch.Tensor", old_values: "torch.Tensor", returns: "torch.Tensor",
                       mask: "torch.Tensor", clip: float) -> ValueLoss:
    """½·max((V - R)², (V_old + clamp(V - V_old, ±clip) - R)²), the mean over the (B, T) mask's tokens."""
    import torch

    m = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    n = m.sum().clamp(min=1)
    loss = 0.5 * (torch.max(l1, l2) * m).sum() / n
    with torch.no_grad():
        frac = float(((l2 > l1).to(m.dtype) * m).sum() / n)
    return ValueLoss(loss=loss, clip_fraction=frac)
