"""The held-out evaluator: summed next-token cross-entropy over batches, used by pretraining's and SFT's
periodic evaluation and by `matelike eval`.

Each caller builds its own batches (token windows, packed SFT rows, documents) and turns the sums into
its figure (nats per token, bits per byte); the forward pass and the loss are computed here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from matelike.data.sft import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class NLLSums:
    """Summed negative log-likelihood (nats) and target counts; `text_*` leave out the excluded ids."""

    nats: float = 0.0
    tokens: int = 0
    text_nats: float = 0.0
    text_tokens: int = 0

    @property
    def mean(self) -> float:
        return self.nats / max(self.tokens, 1)


def heldout_nll(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                exclude_ids: Sequence[int] = ()) -> NLLSums:
    """Sum the cross-entropy of every target that is not IGNORE_INDEX over `batches`.

    A batch holds `input_ids` and `targets` (B, T), targets[:, t] following input_ids[:, t], and optionally
    `segment_ids` / `position_ids` for packed rows; tensors move to the model's device here. The aux loss of
    MoE models is not included. `exclude_ids` (special tokens) are left out of the `text_*` sums, which
    bits per byte divide by the text's UTF-8 bytes.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sums = NLLSums()
    excluded = torch.tensor(sorted(set(exclude_ids)), dtype=torch.long, device=device)
    with torch.no_grad():  # no_grad, not inference_mode: the model may be wrapped by DDP or FSDP
        for batch in batches:
            targets = batch["targets"].to(device)
            extra = {k: batch[k].to(device) for k in ("segment_ids", "position_ids") if k in batch}
            logits = model(batch["input_ids"].to(device), **extra).logits
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="none").view_as(targets)
            valid = targets != IGNORE_INDEX
            sums.nats += float(nll[valid].sum())
            sums.tokens += int(valid.sum())
            if len(excluded):
                valid &= ~torch.isin(targets, excluded)
                sums.text_nats += float(nll[valid].sum())
                sums.text_tokens += int(valid.sum())
            else:
                sums.text_nats, sums.text_tokens = sums.nats, sums.tokens
    return sums
