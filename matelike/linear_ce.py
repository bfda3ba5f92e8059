"""Output projection and cross-entropy in one pass over row chunks, without the (tokens, vocab) logits.

Computing `logits = h @ W.T` for a whole batch and then `F.cross_entropy` writes, reads and writes again a
(tokens, vocab) float tensor several times (logits, log-softmax, its gradient, a zero-filled one-hot). For a
small model that memory traffic costs more than the matrix products: the projection and loss took over half of
the tiny model's training step on a 2-core CPU. Here each chunk of rows is projected, reduced to its
log-sum-exp and turned into its gradient while it is still in cache, the way Liger-Kernel's fused linear
cross-entropy does on GPUs: the gradients of `h` and `W` are computed in the forward pass and only scaled by
the incoming gradient in the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100

# Rows per chunk come from a budget of logits elements: about 8 MB of fp32 logits stays in a CPU's cache; a
# GPU wants fewer, larger kernels.
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk for this vocabulary on this device."""
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(1, vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, grad_mode: bool
    ) -> torch.Tensor:
        # needs_input_grad is set under torch.no_grad() too: grad_mode (read by the caller, since forward itself
        # runs with gradients off) keeps evaluation from paying for gradients nobody asked for.
        need_h, need_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        safe = torch.where(valid, targets, 0)
        acc = torch.promote_types(h.dtype, torch.float32)  # at least fp32 (fp64 stays fp64)
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
            grad.mul_(vc[:, None])  # ignored rows contribute nothing
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
        return gh, gw, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets` (-100 ignored), as `F.cross_entropy` gives.

    h: (N, D) hidden states; weight: (V, D); targets: (N,). rows: rows per chunk (default: sized for the
    device). NaN when every target is ignored, like `F.cross_entropy`.
    """
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h (N, D) and targets (N,), got {tuple(h.shape)} and {tuple(targets.shape)}")
    rows = rows or chunk_rows(weight.shape[0], h.device)
    return _LinearCrossEntropy.apply(h, weight, targets, rows, torch.is_grad_enabled())
