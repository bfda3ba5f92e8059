"""Batched autoregressive generation with a per-call KV cache, sampling controls and UTF-8-safe streaming.

Nothing is stored on the model: each call allocates its own KVCache for prompt + max_new_tokens positions,
so concurrent calls (the API server) never see each other's keys. Prompts of different lengths are left
padded and masked; positions count real tokens only, exactly as transformers' generate does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from matelike.model.transformer import KVCache, Transformer
from matelike.sampling import SamplingParams, check_max_new_tokens

if TYPE_CHECKING:
    from matelike.tokenizer import Tokenizer


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every already-seen token less likely, per row: positive logits are divided, negative multiplied.

    (Dividing a negative logit, as the original project's code does, would *raise* that token's probability.)
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(
    logits: torch.Tensor,
    *,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from (B, V) logits; temperature 0 or top_k 1 is greedy (argmax).
    (The repetition penalty needs the tokens seen so far: iter_generate applies it before this.)"""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    top_k, top_p = sampling.top_k, sampling.top_p
    logits = logits.float() / sampling.temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def iter_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Iterable[int] = (),
) -> Iterator[list[int | None]]:
    """Yield, step by step, each row's new token, or None for a row that has stopped.

    A row stops after emitting one of stop_ids; the stop token itself is reported as None (never as text).
    Stops early when every row has stopped. Closing the iterator drops the cache.
    """
    check_max_new_tokens(max_new_tokens)
    repetition_penalty, seed = sampling.repetition_penalty, sampling.seed
    if not prompts:
        return
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
    cfg = model.config
    device = model.embed.weight.device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    total = P + max_new_tokens
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    mask = torch.zeros(B, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, P - len(p) :] = 1  # left padding; future positions become real as they are generated
    if int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    padded = min(lengths) != P  # without padding no mask is needed at all (the fast causal path)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        # Padding slots point at the row's last (real) token so only real prompt tokens are marked.
        seen.scatter_(1, torch.where(mask[:, :P].bool(), ids, ids[:, -1:]), True)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return
    with torch.inference_mode():
        cache = KVCache(cfg, B, total, device, model.embed.weight.dtype)
        out = model(ids, attention_mask=mask[:, :P] if padded else None, cache=cache, last_only=True)
    logits = out.logits[:, -1].float()
    for step in range(max_new_tokens):
        with torch.inference_mode():
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            tok = sample_next(logits, sampling=sampling, generator=generator)
            is_stop = torch.isin(tok, stops) if len(stops) else torch.zeros_like(finished)
            done_before = finished.clone()
            finished |= is_stop
        emitted = tok.tolist()
        hidden = (done_before | is_stop).tolist()
        yield [None if h else t for t, h in zip(emitted, hidden)]
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        with torch.inference_mode():
            if seen is not None:
                seen[torch.arange(B, device=device), tok] = True
            pos = P + step
            mask[:, pos] = 1
            out = model(tok[:, None], attention_mask=mask[:, : pos + 1] if padded else None, cache=cache, last_only=True)
            logits = out.logits[:, -1].float()


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Iterable[int] = (),
) -> list[list[int]]:
    """New tokens for each prompt (batched, left padded). A row ends at its first stop id, which is not
    included, so `len(out[i]) < max_new_tokens` means that row stopped rather than ran out of length."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in iter_generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
    ):
        for row, t in zip(outs, step):
            if t is not None:
                row.append(t)
    return outs


def default_stop_ids(tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """End of text and end of turn, the ids a chat model stops on."""
    ids = (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "im_end_id", None))
    return tuple(sorted({i for i in ids if i is not None}))


def stream_text(tokenizer: Tokenizer, token_iter: Iterable[int], max_pending: int = 8) -> Iterator[str]:
    """Turn a stream of token ids into text pieces that never end in the middle of a UTF-8 character.

    Byte-level BPE tokens can hold part of a character; the decoder shows an incomplete tail as U+FFFD.
    Tokens are held back until their decoded text no longer ends with U+FFFD (or max_pending tokens pile
    up, which only happens for genuinely invalid bytes: those then come out as U+FFFD once, not silently).
    """
    pending: list[int] = []
    for t in token_iter:
        pending.append(t)
        text = tokenizer.decode(pending, skip_special_tokens=True)
        if text.endswith("\ufffd") and len(pending) < max_pending:
            continue
        pending = []
        if text:
            yield text
    if pending:
        text = tokenizer.decode(pending, skip_special_tokens=True)
        if text:
            yield text


def stream_generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Iterable[int] | None = None,
) -> Iterator[str]:
    """Generate for one prompt and yield text pieces as they come (whole characters only).

    stop_ids defaults to the tokenizer's end-of-text and end-of-turn ids. Closing the generator stops
    generation and frees its cache.
    """

    def tokens() -> Iterator[int]:
        for step in iter_generate(
            model,
            [prompt_ids],
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=default_stop_ids(tokenizer) if stop_ids is None else stop_ids,
        ):
            if step[0] is None:
                return
            yield step[0]

    yield from stream_text(tokenizer, tokens())
