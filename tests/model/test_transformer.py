"""The hand-written transformer: causality, KV cache, padding, segments, parameter counts, MoE routing."""

from __future__ import annotations

import pytest
import torch

from matelike.model.transformer import (
    PRESETS,
    CacheRows,
    KVCache,
    ModelConfig,
    Transformer,
    apply_rope,
    fold_sin,
    get_preset,
    rope_cos_sin,
    rope_folded,
    segment_positions,
)

VOCAB = 97


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def make(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small(**kw)).eval()


CONFIGS = {
    "dense": {},
    "untied": {"tie_embeddings": False},
    "moe": {"n_experts": 4, "n_experts_per_tok": 2},
    "moe-shared": {"n_experts": 4, "n_experts_per_tok": 2, "shared_expert": True},
}


@pytest.mark.parametrize("kind", CONFIGS)
def test_causality_future_tokens_never_change_past_logits(kind: str) -> None:
    model = make(**CONFIGS[kind])
    x = torch.randint(0, VOCAB, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("kind", CONFIGS)
def test_kv_cache_matches_full_forward_over_several_steps(kind: str) -> None:
    model = make(**CONFIGS[kind])
    x = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model.config, 2, 14, "cpu", torch.float32)
        pieces = [model(x[:, :8], cache=cache).logits]  # prefill
        for t in range(8, 11):  # single-token decode steps
            pieces.append(model(x[:, t : t + 1], cache=cache).logits)
        pieces.append(model(x[:, 11:], cache=cache).logits)  # several tokens after a prefix
    assert cache.pos == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_table_and_folded_sin_give_apply_ropes_values_bit_for_bit(dtype: torch.dtype) -> None:
    # The decode step reads cos/sin from the cache's table and rotates with the sign folded into sin: the same
    # numbers as computing them per step, so greedy answers do not change.
    model = make()
    cache = KVCache(model.config, 3, 40, "cpu", dtype)
    x = torch.randn(3, 1, 6, model.config.head_size).to(dtype)  # (B, T, H, D), one new token per row
    for starts in ([5, 5, 5], [0, 17, 39]):
        rows = CacheRows(cache, 0, starts, 1, torch.device("cpu"))
        cos, sin = rope_cos_sin(rows.positions, model.inv_freq, dtype)
        want = apply_rope(x, cos, sin)
        tcos, tsin = rows.rope(model.inv_freq, dtype)  # (B|1, 1, T, D)
        got = rope_folded(x.transpose(1, 2), tcos, tsin).transpose(1, 2)
        assert torch.equal(got, want)
        assert torch.equal(tsin.expand(3, 1, 1, -1)[:, 0], fold_sin(sin)[:, :, 0])


def test_cache_overflow_is_an_error() -> None:
    model = make()
    cache = KVCache(model.config, 1, 4, "cpu", torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_left_padded_batch_equals_one_by_one(kind: str) -> None:
    model = make(**CONFIGS[kind])
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (9, 4, 6)]
    T = 9
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = s
        mask[i, T - len(s) :] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            torch.testing.assert_close(batched[i, T - len(s) :], alone, atol=1e-5, rtol=1e-4)


def test_segment_ids_isolate_packed_documents() -> None:
    model = make()
    a, b = torch.randint(0, VOCAB, (5,)), torch.randint(0, VOCAB, (7,))
    packed = torch.cat([a, b])[None]
    seg = torch.tensor([[0] * 5 + [1] * 7])
    assert segment_positions(seg).tolist() == [list(range(5)) + list(range(7))]
    with torch.no_grad():
        out = model(packed, segment_ids=seg).logits[0]
        torch.testing.assert_close(out[:5], model(a[None]).logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[5:], model(b[None]).logits[0], atol=1e-5, rtol=1e-4)


def test_loss_is_fp32_cross_entropy_ignoring_minus_100() -> None:
    model = make()
    x = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randint(0, VOCAB, (2, 8))
    targets[:, :3] = -100
    out = model(x, targets)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 3:].reshape(-1, VOCAB), targets[:, 3:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss is None and out.expert_load is None
    bf = make().to(torch.bfloat16)
    assert bf(x, targets).loss.dtype == torch.float32


@pytest.mark.parametrize("kind", ["dense", "untied", "moe-shared"])
def test_target_logits_only_gives_the_same_loss_and_gradients(kind: str) -> None:
    """The SFT shortcut (output projection only where a target is set) changes cost, not maths."""
    model = make(**CONFIGS[kind]).train()
    x = torch.randint(0, VOCAB, (3, 10))
    targets = torch.randint(0, VOCAB, (3, 10))
    targets[0, :6] = -100  # a prompt
    targets[1, 2:9] = -100  # two answers in one packed row
    targets[2, :] = -100  # a row of prompt only
    full = model(x, targets)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    part = model(x, targets, target_logits_only=True)
    part.loss.backward()
    keep = targets != -100
    assert part.logits.shape == (int(keep.sum()), VOCAB)
    torch.testing.assert_close(part.logits, full.logits[keep])
    torch.testing.assert_close(part.loss, full.loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("kind", ["untied", "moe"])
def test_hidden_only_returns_the_states_the_head_projects(kind: str) -> None:
    """hidden_only (for scalar heads) skips the projection: the states are exactly what lm_head reads."""
    model = make(**CONFIGS[kind])
    x = torch.randint(0, VOCAB, (2, 9))
    full, states = model(x), model(x, hidden_only=True)
    assert states.logits is None and states.hidden.shape == (2, 9, 32)
    torch.testing.assert_close(model.lm_head(states.hidden), full.logits)
    assert (states.aux_loss is None) == (full.aux_loss is None)


def test_init_gives_unit_scale_loss_and_scaled_residual_projections() -> None:
    model = make(n_layers=4)
    x = torch.randint(0, VOCAB, (4, 16))
    loss = model(x, torch.randint(0, VOCAB, (4, 16))).loss.item()
    assert abs(loss - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5  # near-uniform predictions at init
    wo = model.layers[0].attn.wo.weight.std().item()
    wqkv = model.layers[0].attn.wqkv.weight.std().item()
    assert wo < wqkv / 2  # 1/sqrt(2 * 4) scaling


def test_tied_embeddings_share_storage_and_untied_do_not() -> None:
    tied = make()
    assert tied.lm_head.weight is tied.embed.weight
    untied = make(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def formula_params(c: ModelConfig, active: bool = False) -> int:
    """Closed-form parameter count, written independently of the module code."""
    hd = c.head_dim or c.dim // c.n_heads
    attn = c.dim * hd * (c.n_heads + 2 * c.n_kv_heads) + c.n_heads * hd * c.dim
    norms = 2 * c.dim
    if c.n_experts:
        eh = c.moe_hidden_dim or c.hidden_dim
        n = c.n_experts_per_tok if active else c.n_experts
        ffn = c.dim * c.n_experts + n * 3 * c.dim * eh
        if c.shared_expert:
            ffn += 3 * c.dim * (c.shared_hidden_dim or eh) + c.dim
    else:
        ffn = 3 * c.dim * c.hidden_dim
    emb = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return c.n_layers * (attn + ffn + norms) + emb + c.dim


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_match_formula(name: str) -> None:
    c = get_preset(name)
    with torch.device("meta"):
        model = Transformer(c)
    assert model.num_params() == formula_params(c)
    assert model.num_params(active=True) == formula_params(c, active=True)
    assert model.flops_per_token(c.max_seq_len) > 6 * (formula_params(c, active=True) - c.vocab_size * c.dim)


def test_26m_preset_is_the_seeds_26_9m() -> None:
    c = get_preset("26m")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.max_seq_len) == (
        512, 8, 16, 8, 1408, 6400, 512
    )
    assert formula_params(c) == 26_878_464
    assert 0.18e9 < formula_params(get_preset("0.2b")) < 0.22e9


def test_bad_config_and_unknown_preset_raise() -> None:
    with pytest.raises(ValueError, match="n_kv_heads"):
        small(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="shared_expert"):
        small(shared_expert=True)


@pytest.mark.parametrize("shared", [False, True])
def test_moe_routing_aux_loss_load_and_gradients(shared: bool) -> None:
    model = make(n_experts=4, n_experts_per_tok=2, shared_expert=shared).train()
    x = torch.randint(0, VOCAB, (4, 32))
    out = model(x, x)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert out.aux_loss.requires_grad
    # the aux loss is part of the training loss
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), x.reshape(-1))
    torch.testing.assert_close(out.loss, ce + model.config.aux_loss_coef * out.aux_loss)
    # every expert reached, load is a distribution over experts per layer
    assert out.expert_load.shape == (2, 4)
    assert (out.expert_load > 0).all()
    torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(2))
    out.loss.backward()
    for layer in model.layers:
        assert layer.mlp.router.weight.grad is not None and layer.mlp.router.weight.grad.abs().sum() > 0
        assert layer.mlp.w_gate_up.grad.abs().sum(dim=(1, 2)).gt(0).all()  # every expert trained
    # the aux loss alone also sends gradient to the router
    model.zero_grad()
    model(x).aux_loss.backward()
    assert model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_moe_top1_and_all_experts_route_consistently() -> None:
    for k in (1, 4):
        model = make(n_experts=4, n_experts_per_tok=k)
        out = model(torch.randint(0, VOCAB, (2, 16)))
        assert torch.isfinite(out.logits).all()
        torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(2))
    # with all experts active, the aux loss of a uniform router is exactly 1
    model = make(n_experts=4, n_experts_per_tok=4)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.mlp.router.weight)
    torch.testing.assert_close(model(torch.randint(0, VOCAB, (2, 8))).aux_loss, torch.tensor(1.0))


def test_meta_construction_then_init_weights_is_usable() -> None:
    """The engine may build on the meta device, materialise with to_empty() and call init_weights()."""
    with torch.device("meta"):
        model = Transformer(small())
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(model.inv_freq, make().inv_freq)
    out = model(torch.randint(0, VOCAB, (1, 8)), torch.randint(0, VOCAB, (1, 8)))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", ["dense", "moe-shared"])
def test_bf16_autocast_training_step(kind: str) -> None:
    """The engine trains fp32 weights under bf16 autocast: the loss stays fp32 and finite, gradients flow."""
    model = make(**CONFIGS[kind]).train()
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.randint(0, VOCAB, (2, 12)))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
