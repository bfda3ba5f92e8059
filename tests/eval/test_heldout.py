"""The one held-out evaluator: sums match torch's cross-entropy; ignored and excluded targets are left out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from matelike.data.sft import IGNORE_INDEX
from matelike.eval.heldout import heldout_nll
from matelike.model.transformer import Transformer, get_preset


def test_sums_match_cross_entropy_and_skip_ignored_and_excluded_targets() -> None:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                   hidden_dim=64, max_seq_len=16)).eval()
    x = torch.randint(0, 50, (3, 9))
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    targets[0, :3] = IGNORE_INDEX
    batches = [{"input_ids": inputs[:2], "targets": targets[:2]}, {"input_ids": inputs[2:], "targets": targets[2:]}]
    with torch.no_grad():
        logits = model(inputs).logits.float()
    valid = targets != IGNORE_INDEX
    want = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
    sums = heldout_nll(model, batches)
    assert sums.tokens == int(valid.sum()) == 3 * 8 - 3
    torch.testing.assert_close(torch.tensor(sums.nats), want, rtol=1e-5, atol=1e-4)
    assert (sums.text_nats, sums.text_tokens) == (sums.nats, sums.tokens)

    special = int(targets[1, 0])
    text = valid & (targets != special)
    sums = heldout_nll(model, batches, exclude_ids=[special])
    assert sums.text_tokens == int(text.sum()) < sums.tokens
    torch.testing.assert_close(torch.tensor(sums.text_nats),
                               F.cross_entropy(logits[text], targets[text], reduction="sum"), rtol=1e-5, atol=1e-4)
