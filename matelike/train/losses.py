"""The training losses, all in one place.

1. Causal-LM cross-entropy (pretraining and SFT), over the output projection in row chunks.
2. The preference-optimisation family (DPO and its variants).
3. The reward model's Bradley-Terry loss (matelike.reward).

torch is imported inside the functions: the command line imports this module for the loss names and the
defaults of its flags, and `matelike --help` must not pay for loading torch.

## 1. Causal-LM cross-entropy
The output projection and cross-entropy run in one pass over row chunks, without the (tokens, vocab) logits.
Computing `logits = h @ W.T` for a whole batch and then `F.cross_entropy` writes, reads and writes again a
(tokens, vocab) float tensor several times (logits, log-softmax, its gradient, a zero-filled one-hot). For a
small model that memory traffic costs more than the matrix products: the projection and loss took over half of
the tiny model's training step on a 2-core CPU. Here each chunk of rows is projected, reduced to its
log-sum-exp and turned into its gradient while it is still in cache, the way Liger-Kernel's fused linear
cross-entropy does on GPUs: the gradients of `h` and `W` are computed in the forward pass and only scaled by
the incoming gradient in the backward pass.

`Transformer.forward(input_ids, targets)` calls `causal_lm_loss` from inside the model's forward: under DDP and
FSDP2 the output projection's weight is only usable (gathered, hooked for gradient reduction) there.

## 2. Preference losses
DPO (sigmoid), IPO, and the reference-free SimPO and ORPO.
Every function works on per-sequence log-probabilities of the completion tokens (summed over tokens) and
their token counts, so the caller computes one forward pass over chosen and rejected sequences and the
formulas here stay small enough to check by hand (tests/dpo/test_dpo.py does).

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

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matelike.data.sft import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from torch import nn

# 1. Causal-LM cross-entropy

# Rows per chunk come from a budget of logits elements: about 8 MB of fp32 logits stays in a CPU's cache; a
# GPU wants fewer, larger kernels.
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk for this vocabulary on this device."""
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(1, vocab_size))


@functools.cache
def _linear_cross_entropy_fn() -> Any:
    """The autograd Function, built on first use: importing this module must not load torch, since the
    command line reads the preference losses' names from it."""
    import torch

    class _LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(  # type: ignore[override]
            ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, grad_mode: bool,
            row_weights: torch.Tensor | None,
        ) -> torch.Tensor:
            # needs_input_grad is set under torch.no_grad() too: grad_mode (read by the caller, since forward itself
            # runs with gradients off) keeps evaluation from paying for gradients nobody asked for.
            need_h, need_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
            valid = targets != IGNORE_INDEX
            safe = torch.where(valid, targets, 0)
            acc = torch.promote_types(h.dtype, torch.float32)  # at least fp32 (fp64 stays fp64)
            # Each row's weight in the mean: 1 for a target, 0 for an ignored row, or the caller's weights.
            valid = valid.to(acc) if row_weights is None else torch.where(valid, row_weights.to(acc), 0.0)
            count = valid.sum()
            total = torch.zeros((), dtype=acc, device=h.device)
            # Unscaled gradients (softmax minus one-hot, entries in [-1, 1]): dividing by the token count before the
            # backward pass would underflow in fp16 before a GradScaler could scale it up.
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            w = weight.to(h.dtype)  # once, not per chunk (a no-op when the dtypes already agree)
            for start in range(0, h.shape[0], rows):
                hc, tc, vc = h[start : start + rows], safe[start : start + rows], valid[start : start + rows]
                logits = (hc @ w.t()).to(acc)  # fp32 log-sum-exp: bf16 is too coarse over thousands of classes
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, tc[:, None]).squeeze(1)
                total += ((lse - target_logit) * vc).sum()
                if not (need_h or need_w):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, tc[:, None], -torch.ones_like(lse)[:, None])
                grad.mul_(vc[:, None])  # ignored rows contribute nothing, the others by their weight
                grad = grad.to(hc.dtype)
                if grad_h is not None:
                    grad_h[start : start + rows] = grad @ w
                if grad_w is not None:
                    grad_w += (grad.t() @ hc).to(acc)
            ctx.save_for_backward(grad_h, grad_w, count)
            ctx.weight_dtype = weight.dtype
            return total / count

        @staticmethod
        def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
            grad_h, grad_w, count = ctx.saved_tensors
            scale = grad_out / count
            gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
            gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
            return gh, gw, None, None, None, None

    return _LinearCrossEntropy


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets` (-100 ignored), as `F.cross_entropy` gives.

    h: (N, D) hidden states; weight: (V, D); targets: (N,). rows: rows per chunk (default: sized for the
    device). row_weights: (N,) weights of a weighted mean, sum(w·loss) / sum(w) over the rows with a target
    (None: every target weighs 1). NaN when every target is ignored, like `F.cross_entropy`.
    """
    import torch

    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h (N, D) and targets (N,), got {tuple(h.shape)} and {tuple(targets.shape)}")
    if row_weights is not None and row_weights.shape != targets.shape:
        raise ValueError(f"expected row_weights {tuple(targets.shape)}, got {tuple(row_weights.shape)}")
    rows = rows or chunk_rows(weight.shape[0], h.device)
    return _linear_cross_entropy_fn().apply(h, weight, targets, rows, torch.is_grad_enabled(), row_weights)


def causal_lm_loss(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, *, skip_ignored: bool = False, fused: bool = True,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean next-token cross-entropy of `head(hidden)` against `targets` (IGNORE_INDEX ignored), and the logits.

    hidden: (..., D) final hidden states; targets: the same leading shape. skip_ignored: project only the
    rows with a target (SFT batches, where prompt tokens carry no loss, skip most of the projection); the
    logits returned are then those rows', in row-major order. fused: the chunked projection + loss without
    logits (returned logits are None) when `head` is a plain Linear; a LoRA-wrapped or other head always
    goes through its own forward. weights: the targets' shape; the loss is then the weighted mean
    sum(w·loss) / sum(w) over the targets (SFT's per-sequence mean gives each token 1/its answer's length).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    if skip_ignored:
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
        weights = weights[keep] if weights is not None else None
    if fused and type(head) is nn.Linear:
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1),
                                    row_weights=weights.reshape(-1) if weights is not None else None), None
    logits = head(hidden)
    # fp32 cross-entropy: bf16 log-softmax over thousands of classes is too coarse for the loss.
    flat, flat_targets = logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if weights is None:
        return F.cross_entropy(flat, flat_targets, ignore_index=IGNORE_INDEX), logits
    per_token = F.cross_entropy(flat, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    w = torch.where(flat_targets != IGNORE_INDEX, weights.reshape(-1).float(), 0.0)
    return (per_token * w).sum() / w.sum(), logits


# 2. Preference losses
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
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
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


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair reward-model losses, fp32 at least: -log σ(r_w - r_l) (Bradley-Terry, as InstructGPT trains its
    reward model) plus `center_coef`·(r_w + r_l)².

    The second term is TRL's center_rewards_coefficient (Eisenstein et al. 2023): the Bradley-Terry loss sees
    only differences, so without it the rewards' mean drifts freely; its batch mean is TRL's mean of squares.
    """
    import torch
    import torch.nn.functional as F

    dtype = torch.promote_types(chosen.dtype, torch.float32)
    rc, rr = chosen.to(dtype), rejected.to(dtype)
    losses = -F.logsigmoid(rc - rr)
    if center_coef:
        losses = losses + center_coef * (rc + rr) ** 2
    return losses
