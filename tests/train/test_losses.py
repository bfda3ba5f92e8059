"""The chunked projection + cross-entropy: same loss and gradients as logits then F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matelike.model.transformer import ModelConfig, Transformer
from matelike.train.losses import chunk_rows, linear_cross_entropy

VOCAB = 101


def reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(h @ w.t(), t, ignore_index=-100)


def leaves(n: int = 37, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(VOCAB, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, VOCAB, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("rows", [1, 5, 8, 37, 1000])
def test_loss_and_gradients_match_cross_entropy_for_any_chunking(rows: int) -> None:
    h, w, t = leaves()
    t[[3, 4, 20]] = -100  # ignored rows: no loss, no gradient
    upstream = 2.5  # a scaled loss (accumulation weights, GradScaler) must scale both gradients
    ours = linear_cross_entropy(h, w, t, rows=rows)
    (ours * upstream).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = reference(h, w, t)
    (ref * upstream).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)
    assert gh[[3, 4, 20]].abs().max() == 0


@pytest.mark.parametrize("rows", [1, 8, 1000])
def test_row_weights_give_the_weighted_mean_and_its_gradients(rows: int) -> None:
    from matelike.train.losses import causal_lm_loss

    h, w, t = leaves()
    t[[3, 20]] = -100
    weights = torch.rand(len(t), generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    ours = linear_cross_entropy(h, w, t, rows=rows, row_weights=weights)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    per_row = F.cross_entropy(h @ w.t(), t, ignore_index=-100, reduction="none")
    kept = torch.where(t != -100, weights, 0.0)  # an ignored row's weight counts for nothing
    ref = (per_row * kept).sum() / kept.sum()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)
    # Weights all 1 are the plain mean; the unfused path (a head that is not a plain Linear) weighs the same.
    torch.testing.assert_close(linear_cross_entropy(h, w, t, row_weights=torch.ones_like(weights)),
                               reference(h, w, t), rtol=1e-10, atol=1e-12)
    head = torch.nn.Linear(h.shape[1], VOCAB, bias=False, dtype=torch.float64)
    head.weight.data.copy_(w.detach())
    with torch.no_grad():
        fused, _ = causal_lm_loss(h[None], head, t[None], weights=weights[None], skip_ignored=True)
        unfused, logits = causal_lm_loss(h[None], head, t[None], weights=weights[None], fused=False)
    assert logits is not None
    torch.testing.assert_close(fused, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(unfused.double(), ref.detach(), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"row_weights \(37,\), got \(36,\)"):
        linear_cross_entropy(h, w, t, row_weights=weights[:-1])


def test_only_the_needed_gradients_and_no_grad_mode() -> None:
    h, w, t = leaves()
    frozen = w.detach()  # a frozen head (SFT --freeze embeddings with tied weights)
    linear_cross_entropy(h, frozen, t, rows=7).backward()
    h2 = h.detach().clone().requires_grad_(True)
    reference(h2, frozen, t).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, rows=7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(h, w, t).detach())


def test_no_grad_mode_skips_the_gradient_products() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    h, w, t = leaves()
    projection = 2 * h.shape[0] * h.shape[1] * w.shape[0]
    for grad_on, products in ((False, 1), (True, 3)):  # the projection; then also dh and dW
        with torch.set_grad_enabled(grad_on), FlopCounterMode(display=False) as counter:
            linear_cross_entropy(h, w, t, rows=8)
        assert counter.get_total_flops() == products * projection


def test_every_target_ignored_gives_nan_like_cross_entropy() -> None:
    h, w, _ = leaves(n=4)
    t = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(h, w, t)) and torch.isnan(reference(h, w, t))


def test_bad_shapes_are_named() -> None:
    h, w, t = leaves()
    with pytest.raises(ValueError, match=r"\(N, D\).*\(37, 16\).*\(36,\)"):
        linear_cross_entropy(h, w, t[:-1])


def test_chunk_rows_follow_the_vocabulary_and_device() -> None:
    assert chunk_rows(6400, torch.device("cpu")) == (1 << 21) // 6400
    assert chunk_rows(6400, torch.device("cuda")) > chunk_rows(6400, torch.device("cpu"))
    assert chunk_rows(10**9, torch.device("cpu")) == 1


@pytest.mark.parametrize("tied", [True, False])
def test_model_without_logits_trains_exactly_like_with_logits(tied: bool) -> None:
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                      max_seq_len=32, tie_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, VOCAB, (3, 17))
    targets = x[:, 1:].clone()
    targets[0, :5] = -100
    grads, losses = [], []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(x[:, :-1], targets, return_logits=return_logits)
        out.loss.backward()
        assert (out.logits is None) == (not return_logits)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_stays_close_to_fp32() -> None:
    h, w, t = leaves(n=64, d=32)
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h32, w32, t, rows=16)
    loss.backward()
    assert h32.grad.dtype == torch.float32 and w32.grad.dtype == torch.float32
    ref = reference(h.detach(), w.detach(), t)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    ref_h = h.detach().clone().requires_grad_(True)
    reference(ref_h, w.detach(), t).backward()
    cos = F.cosine_similarity(h32.grad.flatten().double(), ref_h.grad.flatten(), dim=0)
    assert cos > 0.99
