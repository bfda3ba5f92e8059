"""Preference-optimisation losses: DPO (sigmoid), IPO, and the reference-free SimPO and ORPO.

Every function works on per-sequence log-probabilities of the completion tokens (summed over tokens) and
their token counts, so the caller computes one forward pass over chosen and rejected sequences and the
formulas here stay small enough to check by hand (tests/test_dpo.py does).

- sigmoid (DPO, Rafailov et al. 2023): -log σ(β·[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]).
- ipo (Azar et al. 2023, eq. 17): (h - 1/(2β))², h the same log-ratio difference; like TRL, the log-ratios
  are averaged per completion token so that β means the same thing for short and long answers.
- simpo (Meng et al. 2024): -log σ(β·(avg log π(y_w) - avg log π(y_l)) - γ), no reference model.
- orpo (Hong et al. 2024): NLL of the chosen answer (per-token mean) - β·log σ(log odds(y_w) - log odds(y_l)),
  with odds(y) = p/(1-p) on the per-token average probability; no reference model. β is the paper's λ.

Rewards (for reward accuracy and margin) follow TRL: β times the policy/reference log-ratio for DPO and
IPO, β times the average log-probability for SimPO and ORPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions so that `matelike --help` stays fast
    import torch

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo"})
# β defaults per loss: DPO/IPO/ORPO use TRL's 0.1; SimPO's paper works with β around 2 (with γ = 0.5·β
# in TRL's CPO the margin term is γ, here given directly as --simpo-gamma).
DEFAULT_BETA: dict[str, float] = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


@dataclass
class PreferenceLossOutput:
    """Per-pair losses and (detached) rewards; `loss.mean()` is what is minimised."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def needs_reference(loss_type: str) -> bool:
    """True for the losses that compare against a frozen reference model."""
    _check_type(loss_type)
    return loss_type not in REFERENCE_FREE


def _check_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both ends (Mächler 2012)."""
    import torch

    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(
    loss_type: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float,
    simpo_gamma: float = 0.5,
) -> PreferenceLossOutput:
    """Losses for a batch of pairs.

    `policy_*` / `ref_*`: (B,) summed log-probabilities of the completion tokens; `*_tokens`: (B,) how many
    completion tokens each sum covers. Computed in fp32 (or fp64 if given) whatever the inputs are.
    """
    import torch
    import torch.nn.functional as F

    _check_type(loss_type)
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)  # fp32 at least, fp64 kept for tests
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    nc = chosen_tokens.to(pc).clamp(min=1.0)
    nr = rejected_tokens.to(pc).clamp(min=1.0)
    if loss_type in REFERENCE_FREE:
        avg_c, avg_r = pc / nc, pr / nr
        if loss_type == "simpo":
            losses = -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)
        else:  # orpo
            log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
            losses = -avg_c - beta * F.logsigmoid(log_odds)
        return PreferenceLossOutput(losses, (beta * avg_c).detach(), (beta * avg_r).detach())

    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss {loss_type!r} needs reference log-probabilities")
    ratio_c = pc - ref_chosen.to(pc)
    ratio_r = pr - ref_rejected.to(pc)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (ratio_c - ratio_r))
    else:  # ipo
        losses = (ratio_c / nc - ratio_r / nr - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLossOutput(losses, (beta * ratio_c).detach(), (beta * ratio_r).detach())


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of `labels` under `logits` per sequence, and the number of counted tokens.

    `logits`: (B, T, V) predicting the token at each position's `labels` (already shifted: labels[t] is the
    token that follows input t); `labels`: (B, T) with `ignore_index` where nothing counts. fp32 log-softmax,
    because summing hundreds of bf16 log-probs loses the small differences DPO works on.
    """
    import torch

    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    # logsumexp + gather instead of a full log_softmax tensor: one (B, T, V) fp32 copy less.
    logits = logits.float()
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (picked * mask).sum(-1), mask.sum(-1)
