"""The Matelike decoder: a hand-written Llama-style transformer, dense or mixture-of-experts.

Pieces, in the order data flows through them: token embedding, N blocks of
(RMSNorm -> grouped-query attention with rotary positions -> residual, RMSNorm -> SwiGLU or MoE -> residual),
a final RMSNorm and the output projection (tied to the embedding or not).

The maths matches transformers' LlamaForCausalLM (dense), MixtralForCausalLM (routed experts) and
Qwen2MoeForCausalLM (routed experts plus a sigmoid-gated shared expert) exactly, so `matelike.model.io` can save
every model as a Hugging Face directory without permuting weights. Internally q/k/v and gate/up projections
are fused into one matrix each (fewer, larger matmuls make the decode step faster); `matelike.model.io` splits them
into the Hugging Face names on save and fuses them on load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from matelike.train.losses import causal_lm_loss

DeviceLike = torch.device | str | None


@dataclass
class ModelConfig:
    """Every size and switch of the model; presets below are instances of it."""

    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 16
    n_kv_heads: int = 8
    hidden_dim: int = 1408  # SwiGLU inner size of the dense MLP (and of each expert unless moe_hidden_dim is set)
    max_seq_len: int = 512
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int | None = None  # None = dim // n_heads (a transformers-written dir may say otherwise)
    # Mixture of experts: n_experts = 0 means dense.
    n_experts: int = 0
    n_experts_per_tok: int = 2
    moe_hidden_dim: int | None = None  # None = hidden_dim
    shared_expert: bool = False  # an always-on expert whose output is scaled by sigmoid(gate(x)) (Qwen2-MoE)
    shared_hidden_dim: int | None = None  # None = moe hidden size
    aux_loss_coef: float = 0.01
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads and self.head_dim is None:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok {self.n_experts_per_tok} must be in 1..n_experts ({self.n_experts})")
        if self.n_experts == 0 and self.shared_expert:
            raise ValueError("shared_expert needs n_experts > 0")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden_dim or self.hidden_dim

    @property
    def shared_hidden(self) -> int:
        return self.shared_hidden_dim or self.expert_hidden

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # The CPU demo: small enough to see its corpus several times in minutes. At equal CPU time a smaller model
    # that sees more tokens beats a wider one (the README gives the figures).
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=256),
    # The original Matelike project's configuration (MiniMind's 26M): 6400-token vocabulary, tied embeddings.
    "26m": ModelConfig(),
    # About 0.2B parameters (`matelike model info --preset 0.2b` prints the count and weight memory).
    "0.2b": ModelConfig(dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, hidden_dim=2816, max_seq_len=1024),
    # Routed experts only: exports as MixtralForCausalLM.
    "tiny-moe": ModelConfig(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=704, max_seq_len=256, n_experts=4, n_experts_per_tok=2
    ),
    # The original project's MoE layout: 4 routed experts, top-2, plus a shared expert: exports as Qwen2MoeForCausalLM.
    "26m-moe": ModelConfig(n_experts=4, n_experts_per_tok=2, shared_expert=True),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of preset `name` with `overrides` applied (for instance vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


@dataclass
class ModelOutput:
    """What `Transformer.forward` returns. loss already includes aux_loss_coef * aux_loss for MoE models."""

    logits: torch.Tensor | None  # None when the loss was computed with return_logits=False
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers; None for dense models
    expert_load: torch.Tensor | None = None  # (n_layers, n_experts) fraction of routed slots, detached
    hidden: torch.Tensor | None = None  # (B, T, dim) final-norm states, only with hidden_only=True


class KVCache:
    """Keys and values for one generation call, allocated once at full length.

    Lives outside the module (the caller creates it per call and drops it afterwards), so two concurrent
    generations never share state. Layout (layer, batch, kv_head, position, head_dim): a prefix slice is a view.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # number of positions already written
        # Per-layer views made once: a decode step then indexes no layer dimension (eight fewer ops per layer).
        self.layer_k, self.layer_v = list(self.k.unbind(0)), list(self.v.unbind(0))
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope_table(self, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (`fold_sin`) of every cache position, each (max_len, head_dim), made on first use.

        A decode step then slices or indexes its positions instead of computing them; the values are those
        `rope_cos_sin` gives for the same positions (the same fp32 products and kernels).
        """
        if self._rope is None or self._rope[0].dtype != dtype:
            positions = torch.arange(self.max_len, device=inv_freq.device)[None]
            cos, sin = rope_cos_sin(positions, inv_freq, dtype)
            self._rope = cos[0, :, 0], fold_sin(sin[0, :, 0])
        return self._rope

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at the current position; return all keys/values so far (views)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full (needs {end})")
        ck, cv = self.layer_k[layer], self.layer_v[layer]
        ck[:, :, self.pos : end] = k
        cv[:, :, self.pos : end] = v
        return ck[:, :, :end], cv[:, :, :end]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions (every layer) into row `dst`."""
        if src != dst and length:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class CacheRows:
    """Rows [first, first + B) of a KVCache, each written at its own position: continuous batching.

    The batched generation engine keeps one request per cache row; rows hold prompts of different lengths, so
    every row has its own next position (`starts`), its rotary positions count its real tokens only, and it
    attends to its own written positions only (a row's stale positions past its length are masked out).
    Supports B rows of one new token each (a decode step) or one row of T tokens (a prefill chunk).
    """

    def __init__(self, cache: KVCache, first: int, starts: list[int], q_len: int, device: torch.device) -> None:
        if len(starts) > 1 and q_len > 1:
            raise ValueError("CacheRows takes several rows of one token, or one row of several tokens")
        self.cache, self.first, self.q_len = cache, first, q_len
        self.pos = max(starts)  # what Attention's causal check reads: the most positions any row already has
        self.total = self.pos + q_len
        if self.total > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions is full (needs {self.total})")
        self.same = min(starts) == self.pos  # every row at the same position: slice writes, and no mask needed
        self.rows = slice(first, first + len(starts))
        self._start: torch.Tensor | None = None
        self._index = None
        if self.same:
            # One row (or rows in step): plain causal attention, offset by the row's past when it has one.
            self.mask = _offset_causal(q_len, self.pos, device) if self.pos and q_len > 1 else None
        else:
            start = self._start = torch.tensor(starts, device=device)
            self._index = (torch.arange(len(starts), device=device), start)
            self.mask = (torch.arange(self.total, device=device)[None, :] <= start[:, None])[:, None, None]

    @property
    def positions(self) -> torch.Tensor:
        """(B, T) rotary position of each new token."""
        start = self._start if self._start is not None else torch.full((self.rows.stop - self.rows.start,), self.pos,
                                                                    device=self.cache.k.device)
        return start[:, None] + torch.arange(self.q_len, device=start.device)

    def rope(self, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and folded sin for the new tokens, (B|1, 1, T, head_dim), from the cache's table: a slice when the
        rows are in step (no op at all), one gather per tensor otherwise."""
        cos, sin = self.cache.rope_table(inv_freq, dtype)
        if self._start is None:
            return cos[None, None, self.pos : self.total], sin[None, None, self.pos : self.total]
        return cos[self._start][:, None, None], sin[self._start][:, None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at each row's position; return each row's keys/values so far (views)."""
        ck, cv = self.cache.layer_k[layer][self.rows], self.cache.layer_v[layer][self.rows]
        if self._index is None:
            ck[:, :, self.pos : self.total] = k
            cv[:, :, self.pos : self.total] = v
        else:  # one token per row, each at its own position: one indexed write per tensor, no copies
            row, pos = self._index
            ck[row, :, pos] = k[:, :, 0]
            cv[row, :, pos] = v[:, :, 0]
        return ck[:, :, : self.total], cv[:, :, : self.total]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (bf16 squares lose too much), cast back before the weight."""

    def __init__(self, dim: int, eps: float, device: DeviceLike = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel (fewer ops per decode step); same maths as x * rsqrt(mean(x^2) + eps).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The weight inside the call: one op fewer, and the same product (y * w == w * y, bit for bit).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, 1, head_dim) for the rotate-half convention, computed in fp32."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face Llama layout, so saved q/k weights need no permutation)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def fold_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: `rope_folded` then needs no negation per call."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_folded(x: torch.Tensor, cos: torch.Tensor, folded_sin: torch.Tensor) -> torch.Tensor:
    """apply_rope with `fold_sin(sin)`: the same values bit for bit ((-a) * s == a * (-s)), two ops fewer per call
    (a roll instead of negate, two slices and a concatenation)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * folded_sin


class Attention(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention, with an optional external KV cache."""

    def __init__(
        self, config: ModelConfig, layer: int, device: DeviceLike = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_size
        q_out = config.n_heads * self.head_dim
        kv_out = config.n_kv_heads * self.head_dim
        self.split = (q_out, kv_out, kv_out)
        self.wqkv = nn.Linear(config.dim, q_out + 2 * kv_out, bias=False, device=device, dtype=dtype)
        self.wo = nn.Linear(q_out, config.dim, bias=False, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | CacheRows | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # Heads first before anything else: one transpose and two splits instead of a slice and a transpose per
        # tensor (the op count, not the arithmetic, is what a decode step of a small model pays for).
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        qk, v = qkv.split((self.n_heads + self.n_kv_heads, self.n_kv_heads), dim=1)  # (B, H, T, D)
        # One RoPE call over the q and k heads together: half the elementwise ops of the decode step's attention.
        # cos, sin: (B|1, 1, T, D), sin folded (fold_sin), from the model's forward.
        q, k = rope_folded(qk, cos, sin).split((self.n_heads, self.n_kv_heads), dim=1)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # mask None means plain causal attention over all keys; a decode step of one token needs no mask at all.
        is_causal = mask is None and T > 1
        if is_causal and cache is not None and cache.pos > 0:
            raise ValueError("a multi-token step after the first needs an explicit mask")
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """w_down(silu(gate(x)) * up(x)); gate and up share one matrix (w_gate_up = [gate; up])."""

    def __init__(self, dim: int, hidden: int, device: DeviceLike = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.w_down = nn.Linear(hidden, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.hidden, dim=-1)
        return self.w_down(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k softmax routing with renormalised weights over `n_experts` SwiGLU experts (+ optional shared expert).

    Dispatch sorts the (token, slot) assignments by expert and runs each expert once on its contiguous block
    of tokens: the Python loop is over experts, never over tokens.
    """

    def __init__(self, config: ModelConfig, device: DeviceLike = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.n_experts_per_tok
        self.hidden = config.expert_hidden
        self.router = nn.Linear(config.dim, config.n_experts, bias=False, device=device, dtype=dtype)
        # Experts stacked in 3-D parameters: (E, 2H, D) and (E, D, H).
        factory = {"device": device, "dtype": dtype}
        self.w_gate_up = nn.Parameter(torch.empty(config.n_experts, 2 * self.hidden, config.dim, **factory))
        self.w_down = nn.Parameter(torch.empty(config.n_experts, config.dim, self.hidden, **factory))
        self.shared = SwiGLU(config.dim, config.shared_hidden, device, dtype) if config.shared_expert else None
        self.shared_gate = nn.Linear(config.dim, 1, bias=False, **factory) if config.shared_expert else None

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, aux_loss, load); token_mask (B, T) excludes padding from the balance statistics."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        logits = self.router(flat)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(x.dtype)

        # Sort every (token, slot) by expert so each expert sees one contiguous slice.
        flat_experts = top_i.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        out = torch.zeros_like(flat)
        start = 0
        track_grads = torch.is_grad_enabled()
        for e, n in enumerate(counts.tolist()):
            if n == 0 and not track_grads:
                continue  # when training, an idle expert still runs on zero rows so DDP sees (zero) gradients
            idx = token_of[start : start + n]
            gate, up = F.linear(flat[idx], self.w_gate_up[e]).split(self.hidden, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w_down[e])
            w = top_w.reshape(-1)[order[start : start + n]]
            out.index_add_(0, idx, y * w[:, None])
            start += n
        if self.shared is not None and self.shared_gate is not None:
            out = out + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat)

        # Switch-style balance loss: E * sum_e (fraction of slots routed to e) * (mean router prob of e).
        # It is 1 at perfect balance, larger otherwise, and differentiable through the router probabilities.
        one_hot = F.one_hot(top_i, self.n_experts).sum(dim=1).float()  # (N, E) slots per expert
        if token_mask is not None:
            m = token_mask.reshape(-1, 1).to(probs.dtype)
            n_tok = m.sum().clamp(min=1)
            frac = (one_hot * m).sum(0) / (n_tok * self.top_k)
            mean_p = (probs * m).sum(0) / n_tok
        else:
            frac = one_hot.mean(0) / self.top_k
            mean_p = probs.mean(0)
        aux = self.n_experts * (frac * mean_p).sum()
        return out.view(B, T, D), aux, frac.detach()


class Block(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, device: DeviceLike = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, device, dtype)
        self.attn = Attention(config, layer, device, dtype)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, device, dtype)
        self.mlp: SwiGLU | MoE = (
            MoE(config, device, dtype) if config.is_moe else SwiGLU(config.dim, config.hidden_dim, device, dtype)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | CacheRows | None,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if isinstance(self.mlp, MoE):
            y, aux, load = self.mlp(self.mlp_norm(x), token_mask)
            return x + y, aux, load
        return x + self.mlp(self.mlp_norm(x)), None, None


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every segment boundary of a packed row: (B, T) -> (B, T)."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    boundary = torch.ones_like(segment_ids, dtype=torch.bool)
    boundary[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(boundary, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


def build_mask(
    q_len: int,
    past: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B|1, 1, q_len, past+q_len) mask, True = may attend; None when plain causal suffices.

    attention_mask covers past + new positions (1 = real token). Each query may always attend to itself,
    so rows of padding queries never become all -inf (their outputs are ignored anyway).
    """
    total = past + q_len
    if attention_mask is None and segment_ids is None:
        return None
    if attention_mask is not None and segment_ids is None and bool(attention_mask.all()):
        return None
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None]  # (1, q, k)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :total].bool()
    if segment_ids is not None:
        if past:
            raise ValueError("segment_ids are for training on packed rows, not for cached generation")
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


class Transformer(nn.Module):
    """Decoder-only language model. See the module docstring for the layout."""

    def __init__(self, config: ModelConfig, device: DeviceLike = None, dtype: torch.dtype | None = None) -> None:
        """device "meta" builds the structure only (no memory, no init): for loading weights into it; dtype
        None is torch's default dtype.

        On the meta device only ops with C++ meta kernels run here: torch's Python meta kernels (normal_,
        arange) cost about 66 MB of resident memory the first time a process uses them.
        """
        super().__init__()
        self.config = config
        # An explicit (uninitialised) weight skips nn.Embedding's normal_() init, whose meta-device version is
        # implemented in Python; init_weights() below initialises every parameter anyway.
        self.embed = nn.Embedding(config.vocab_size, config.dim,
                                  _weight=torch.empty(config.vocab_size, config.dim, device=device, dtype=dtype))
        self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, device, dtype)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.tie_weights()
        # Computed on the CPU and moved: arange on the meta device would also pull in the Python meta kernels.
        self.register_buffer("inv_freq", rope_inv_freq(config.head_size, config.rope_theta).to(device),
                             persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the embedding (when configured); to_empty() and
        load_state_dict(assign=True) replace parameters one by one and break the tie, so they call this again."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_rope(self) -> None:
        """Recompute the RoPE frequencies (after building on the meta device and loading weights)."""
        device = self.embed.weight.device
        self.inv_freq = rope_inv_freq(self.config.head_size, self.config.rope_theta, device=device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers).

        Each block adds two outputs to the residual stream; shrinking them keeps its variance roughly
        constant with depth (GPT-2), which is what keeps training stable at every preset.
        """
        if self.embed.weight.device.type == "meta":
            return
        # Also valid after meta-device construction + to_empty(), which leaves buffers garbage and unties weights.
        self.tie_weights()
        self.reset_rope()
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("wo.weight", "w_down.weight", "mlp.w_down")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, active: bool = False) -> int:
        """Parameter count (tied weights once). active=True counts only n_experts_per_tok routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.config.is_moe:
            for layer in self.layers:
                assert isinstance(layer.mlp, MoE)
                per_expert = (layer.mlp.w_gate_up.numel() + layer.mlp.w_down.numel()) // self.config.n_experts
                total -= per_expert * (self.config.n_experts - self.config.n_experts_per_tok)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6 * active matmul params + 12 * L * d_attn * seq_len.

        Matmul params exclude the embedding lookup but include the output projection (tied or not),
        the PaLM / nanoGPT accounting used for MFU.
        """
        c = self.config
        matmul = self.num_params(active=True) - self.embed.weight.numel()
        if c.tie_embeddings:
            matmul += self.lm_head.weight.numel()
        matmul -= sum(p.numel() for n, p in self.named_parameters() if p.dim() == 1)
        return 6.0 * matmul + 12.0 * c.n_layers * c.n_heads * c.head_size * seq_len

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | CacheRows | None = None,
        last_only: bool = False,
        target_logits_only: bool = False,
        return_logits: bool = True,
        hidden_only: bool = False,
        loss_weights: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for every position (or only the last with last_only), and the loss when targets are given.

        The loss is `matelike.train.losses.causal_lm_loss`, called here because the output projection's
        weight is only gathered (FSDP2) and hooked for gradient reduction (DDP) inside the model's forward.
        target_logits_only (with targets): run the output projection only where targets != -100 and return
        those (N, V) logits, in row-major order. Same loss; SFT batches, where prompts carry no loss, skip most
        of the projection's cost (about a third of a small model's FLOPs).
        return_logits=False (with targets): compute the loss chunk by chunk without materialising the logits
        (matelike.train.losses; faster and lighter for training); the output's logits are then None.
        hidden_only: skip the output projection and return the final-norm hidden states in `hidden` (logits
        None): what a scalar head (the reward model in matelike.reward) reads, without a vocabulary-sized product.
        loss_weights: (B, T) weights of the targets in the loss's mean (None: each target weighs 1).

        input_ids, targets: (B, T). targets are aligned with input_ids (targets[:, t] is the token that
        should follow input_ids[:, t]); -100 is ignored. attention_mask: (B, past+T), 1 = real token
        (left padding for generation). segment_ids: (B, T) packed-row segments; tokens attend only within
        their segment and positions restart per segment unless position_ids are given. cache: a KVCache
        to read and extend (its .pos advances by T), or CacheRows: rows of one, each at its own position (the
        batched generation engine; positions and mask come from it).
        """
        B, T = input_ids.shape
        rows = cache if isinstance(cache, CacheRows) else None
        past = cache.pos if cache is not None else 0
        if rows is None and position_ids is None:
            if segment_ids is not None:
                position_ids = segment_positions(segment_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        if rows is not None:  # the batched engine: positions from the cache's table, computed once per cache
            cos, sin = rows.rope(self.inv_freq, x.dtype)
        else:
            cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
            cos, sin = cos.transpose(1, 2), fold_sin(sin).transpose(1, 2)  # (B, 1, T, D): Attention's layout
        if rows is not None:
            mask = rows.mask
        else:
            mask = build_mask(T, past, attention_mask, segment_ids, input_ids.device)
        if mask is None and rows is None and cache is not None and past > 0 and T > 1:
            # Several new tokens after a prefix: causal with an offset, which is_causal cannot express.
            mask = _offset_causal(T, past, x.device)
        token_mask = attention_mask[:, past : past + T] if attention_mask is not None else None
        aux_losses, loads = [], []
        for layer in self.layers:
            x, aux, load = layer(x, cos, sin, mask, cache, token_mask)
            if aux is not None:
                aux_losses.append(aux)
                loads.append(load)
        if cache is not None and rows is None:
            cache.pos += T
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        expert_load = torch.stack(loads) if loads else None
        if hidden_only:
            return ModelOutput(logits=None, aux_loss=aux_loss, expert_load=expert_load, hidden=x)
        loss, logits = None, None
        if targets is None:
            logits = self.lm_head(x)
        else:
            loss, logits = causal_lm_loss(x, self.lm_head, targets, skip_ignored=target_logits_only,
                                          fused=not return_logits, weights=loss_weights)
            if aux_loss is not None:
                loss = loss + self.config.aux_loss_coef * aux_loss
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, expert_load=expert_load)


def _offset_causal(q_len: int, past: int, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(past, past + q_len, device=device)[:, None]
    k_pos = torch.arange(past + q_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]
