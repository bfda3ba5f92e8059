"""Generation: one batched engine with continuous batching, sampling controls and UTF-8-safe streaming.

`BatchEngine` owns a pool of KV-cache rows ("slots"). Every request holds one slot while it runs; one step
runs one batched forward over every decoding request, each at its own position (rotary positions count its
own tokens only, and it attends to its own cache row only), so requests of different prompt lengths decode
together and a greedy answer does not depend on its batch mates. A request that stops frees its slot at once
and a waiting one is prefilled into it, so a batch never runs until its longest member stops. Requests with
the same prompt share one prefill (the prefilled cache row is copied). Each request has its own sampling
parameters, stop ids, token budget and torch.Generator, so a seeded request draws the same text alone or
batched; a request with a constraint (`matelike.model.constraints`) samples only the tokens it allows, so its
answer keeps a required shape. Prompts are prefilled in chunks of `prefill_chunk` tokens at fixed offsets (the
same chunks alone or batched); the server lets one chunk run per step, so a long prompt never stalls the
others for longer.

`generate` / `iter_generate` run a list of prompts through an engine; `BatchStreams` gives the server one
token iterator per request over one shared engine. Nothing is stored on the model: each engine allocates its
own cache, so engines (and calls) never see each other's keys.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from matelike.model.transformer import CacheRows, KVCache, Transformer
from matelike.sampling import SamplingParams, check_max_new_tokens

if TYPE_CHECKING:
    from matelike.model.constraints import Constraint
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


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: its prompt ids, token budget, sampling parameters (the seed seeds its own
    generator), the ids that end it (the stop id is not part of the answer) and optionally a constraint on the
    answer's shape (`matelike.model.constraints`: only the tokens it allows are sampled)."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    constraint: Constraint | None = None


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: a token, or None when it emitted a stop id; `finished` on its
    last output (stop id, or the token budget reached)."""

    rid: int
    token: int | None
    finished: bool


@dataclass(eq=False)
class _Seq:
    rid: int
    request: GenerationRequest
    prompt: tuple[int, ...]
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (V,) tokens in the context, for the repetition penalty
    cached: int = 0  # positions written to the cache row
    next_token: int = -1  # the token the next decode step feeds
    produced: int = 0
    first_logits: torch.Tensor | None = None  # the prompt's last logits, for requests with the same prompt
    state: object = None  # the constraint's state, when the request has one


class BatchEngine:
    """Continuous batching over a pool of `max_batch` KV-cache rows of `max_len` positions each.

    Decoding requests occupy rows [0, n) (a finished one's row is refilled by moving the last row into it, so a
    decode step always reads one contiguous view); a request being prefilled in chunks sits in row n.
    Not thread-safe: one thread drives it (`BatchStreams` adds the lock the server needs).
    """

    def __init__(self, model: Transformer, *, max_batch: int, max_len: int | None = None,
                 prefill_chunk: int = 256, prefill_per_step: int | None = None, compile: bool = False) -> None:
        """`prefill_per_step`: prompt tokens prefilled per step at most (None: every waiting prompt that has a
        slot, the offline choice; the server passes one chunk to keep other requests' tokens flowing).
        `compile`: run decode steps of rows in step (one request, or requests at the same position) through
        `torch.compile(model, dynamic=True)` with the weights frozen into the graph (fused elementwise kernels,
        pre-packed weights); the first such steps compile for tens of seconds, and greedy answers may differ
        from eager ones in the last bits of the logits, so it is off by default."""
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.max_len = int(max_len or model.config.max_seq_len)
        self.prefill_chunk = prefill_chunk
        self.prefill_per_step = prefill_per_step
        self.device = model.embed.weight.device
        # Decode steps only: prefill chunks vary in length and run once per prompt, not worth a compiled graph.
        self._decode_model: Callable[..., Any] = _frozen_compile(model) if compile else model
        self.vocab = model.config.vocab_size
        self.cache = KVCache(model.config, max_batch, self.max_len, self.device, model.embed.weight.dtype)
        self._rows: list[_Seq] = []  # decoding, row i in cache row i
        self._filling: _Seq | None = None  # partly prefilled, in cache row len(self._rows)
        self._waiting: deque[_Seq] = deque()
        self._next_rid = 0

    # --- requests ---------------------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> int:
        """Queue a request; returns its id. ValueError for an empty or out-of-vocabulary prompt, or one that
        with its budget does not fit a cache row."""
        check_max_new_tokens(request.max_new_tokens)
        prompt = tuple(int(t) for t in request.prompt)
        if not prompt:
            raise ValueError("prompt is empty: generation needs at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab})")
        if len(prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) exceed "
                             f"the {self.max_len} positions of a cache row")
        seed = request.sampling.seed
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            seen[list(prompt)] = True
        rid = self._next_rid
        self._next_rid += 1
        state = request.constraint.start() if request.constraint is not None else None
        self._waiting.append(_Seq(rid, request, prompt, generator, seen, state=state))
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request wherever it is, freeing its slot (no-op for an unknown or finished one)."""
        for s in self._waiting:
            if s.rid == rid:
                self._waiting.remove(s)
                return
        if self._filling is not None and self._filling.rid == rid:
            self._filling = None
            return
        for i, s in enumerate(self._rows):
            if s.rid == rid:
                self._remove([i])
                return

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return len(self._rows) + (self._filling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.running

    def has_work(self) -> bool:
        return bool(self._rows or self._filling or self._waiting)

    # --- one step ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One batched decode forward over the decoding requests, then prefill of waiting ones into free slots
        (each prefilled request samples its first token). Returns what each request produced."""
        out: list[StepOutput] = []
        if self._rows:
            self._decode(out)
        self._prefill(out)
        return out

    def _decode(self, out: list[StepOutput]) -> None:
        rows = self._rows
        ids = torch.tensor([[s.next_token] for s in rows], dtype=torch.long, device=self.device)
        view = CacheRows(self.cache, 0, [s.cached for s in rows], 1, self.device)
        # Rows at their own positions write the cache with indexed stores, which a compiled graph turns into
        # copies of whole cache tensors (slower than eager, measured): only steps of rows in step are compiled.
        model = self._decode_model if view.same else self.model
        logits = model(ids, cache=view, last_only=True).logits[:, -1].float()
        for s in rows:
            s.cached += 1
        tokens = self._sample(rows, logits)
        done = [i for i, (s, t) in enumerate(zip(rows, tokens)) if self._emit(s, t, out)]
        if done:
            self._remove(done)

    def _prefill(self, out: list[StepOutput]) -> None:
        budget = self.prefill_per_step
        while budget is None or budget > 0:
            if self._filling is None:
                if not self._waiting or len(self._rows) >= self.max_batch:
                    return
                s = self._waiting.popleft()
                donor = next((i for i, r in enumerate(self._rows) if r.prompt == s.prompt), None)
                if donor is not None:
                    # Same prompt as a running request: copy its prefilled cache row instead of recomputing it.
                    self.cache.copy_row(donor, len(self._rows), len(s.prompt))
                    s.cached = len(s.prompt)
                    self._start(s, self._rows[donor].first_logits, out)
                    continue
                self._filling = s
            s = self._filling
            row = len(self._rows)
            end = min(len(s.prompt), (s.cached // self.prefill_chunk + 1) * self.prefill_chunk)
            chunk = torch.tensor([s.prompt[s.cached : end]], dtype=torch.long, device=self.device)
            view = CacheRows(self.cache, row, [s.cached], end - s.cached, self.device)
            logits = self.model(chunk, cache=view, last_only=True).logits[0, -1].float()
            if budget is not None:
                budget -= end - s.cached
            s.cached = end
            if end == len(s.prompt):
                self._filling = None
                self._start(s, logits, out)

    def _start(self, s: _Seq, logits: torch.Tensor, out: list[StepOutput]) -> None:
        """A prefilled request samples its first token and joins the decoding rows (or ends right there)."""
        s.first_logits = logits
        self._rows.append(s)
        if s.request.max_new_tokens == 0:
            out.append(StepOutput(s.rid, None, True))
            self._remove([len(self._rows) - 1])
            return
        token = self._sample([s], logits[None].clone())[0]
        if self._emit(s, token, out):
            self._remove([len(self._rows) - 1])

    def _sample(self, rows: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Next token per row, each with its own parameters and generator; greedy rows share one argmax. A
        constrained row's disallowed tokens are masked first, so sampling draws from what the constraint allows."""
        for i, s in enumerate(rows):
            c = s.request.constraint
            if c is not None:
                # Nothing allowed (a text no token spells): the answer ends there, or with no stop ids it goes on
                # as the model likes, scored as it is.
                allowed = c.allowed(s.state, s.request.stop_ids) or list(s.request.stop_ids)
                if allowed:
                    keep = torch.full_like(logits[i], float("-inf"))
                    keep[allowed] = 0.0
                    logits[i] += keep
            if s.seen is not None:
                logits[i] = apply_repetition_penalty(logits[i], s.seen, s.request.sampling.repetition_penalty)
        tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(rows):
            if not s.request.sampling.greedy:
                tokens[i] = int(sample_next(logits[i : i + 1], sampling=s.request.sampling, generator=s.generator))
        return tokens

    def _emit(self, s: _Seq, token: int, out: list[StepOutput]) -> bool:
        """Record a sampled token; True when the request is finished."""
        if token in s.request.stop_ids:
            out.append(StepOutput(s.rid, None, True))
            return True
        s.produced += 1
        s.next_token = token
        if s.request.constraint is not None:
            s.state = s.request.constraint.advance(s.state, token)
        if s.seen is not None:
            s.seen[token] = True
        finished = s.produced >= s.request.max_new_tokens
        out.append(StepOutput(s.rid, token, finished))
        return finished

    def _remove(self, indices: list[int]) -> None:
        """Free decoding rows: the last row moves into each hole, a partly prefilled request follows the end."""
        for i in sorted(indices, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                self.cache.copy_row(last, i, self._rows[last].cached)
                self._rows[i] = self._rows[last]
            self._rows.pop()
            if self._filling is not None:
                self.cache.copy_row(last + 1, last, self._filling.cached)


def _frozen_compile(model: Transformer) -> Callable[..., Any]:
    """`torch.compile(model, dynamic=True)` run with inductor's freezing: the weights become constants of the
    graph, pre-packed for the CPU's matrix kernels (the bench's decode figures). Freezing is read when a graph
    compiles, which happens at a call (a first one, or a new batch size), so every call sets it, for that
    call only; `options={"freezing": True}` of torch.compile did not reach it. Duck shaping is off for the
    same calls: it would tie the batch size to any other size that happened to equal it while compiling (the
    number of layers), and recompile when they differ. A model whose weights change later needs a new engine."""
    from torch._inductor import config as inductor_config
    from torch.fx.experimental import _config as fx_config

    compiled = torch.compile(model, dynamic=True)

    def run(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(freezing=True), fx_config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)

    return run


def _row_seed(seed: int | None, row: int) -> int | None:
    """Row `row`'s seed in a call seeded with `seed`: row 0 keeps it, so one prompt alone draws what it draws first
    in a batch."""
    if seed is None:
        return None
    return (seed + row * 0x9E3779B97F4A7C15) % (2**63)


def iter_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Iterable[int] = (),
    max_batch: int | None = None,
    prefill_chunk: int = 256,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, step by step, each row's new token, or None for a row that has stopped (or waits for a slot).

    A row stops after emitting one of stop_ids; the stop token itself is reported as None (never as text).
    Stops early when every row has stopped. Each row samples with its own generator, seeded from
    `sampling.seed` and the row (row 0 with the seed itself). `max_batch` (default: every row) caps the rows
    decoded together; the others wait for a free slot. Closing the iterator drops the cache. `compile`: see
    BatchEngine.
    """
    check_max_new_tokens(max_new_tokens)
    if not prompts:
        return
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
    if max_new_tokens == 0:
        return
    stops = tuple(sorted(set(stop_ids)))
    engine = BatchEngine(model, max_batch=max_batch or len(prompts), prefill_chunk=prefill_chunk,
                         max_len=max(len(p) for p in prompts) + max_new_tokens, compile=compile)
    row_of = {engine.add(GenerationRequest(p, max_new_tokens, sampling.with_seed(_row_seed(sampling.seed, i)),
                                           stops)): i for i, p in enumerate(prompts)}
    while engine.has_work():
        step: list[int | None] = [None] * len(prompts)
        for o in engine.step():
            step[row_of[o.rid]] = o.token
        yield step


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Iterable[int] = (),
    max_batch: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt (see iter_generate). A row ends at its first stop id, which is not included,
    so `len(out[i]) < max_new_tokens` means that row stopped rather than ran out of length."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in iter_generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                              max_batch=max_batch, compile=compile):
        for row, t in zip(outs, step):
            if t is not None:
                row.append(t)
    return outs


def generate_requests(model: Transformer, requests: Sequence[GenerationRequest], *, max_batch: int = 32,
                      prefill_chunk: int = 256, progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """New tokens for each request (stop id excluded), each with its own budget, sampling and seed, through one
    engine of `max_batch` slots: a request that ends frees its slot for the next waiting one. `progress(1)` is
    called as each request finishes."""
    if not requests:
        return []
    engine = BatchEngine(model, max_batch=max_batch, prefill_chunk=prefill_chunk,
                         max_len=max(len(r.prompt) + r.max_new_tokens for r in requests))
    row_of = {engine.add(r): i for i, r in enumerate(requests)}
    outs: list[list[int]] = [[] for _ in requests]
    while engine.has_work():
        for o in engine.step():
            if o.token is not None:
                outs[row_of[o.rid]].append(o.token)
            if o.finished and progress is not None:
                progress(1)
    return outs


class BatchStreams:
    """One token iterator per request over one shared BatchEngine: what the server's worker interleaves.

    The worker advances its requests' iterators in turn; an iterator with no token waiting runs one engine step,
    which advances every request by a token (buffered for the others). Each `next` takes at most one step and
    yields the request's token, or None while it waits for a slot or its prompt is being prefilled, so one
    request's long prompt never holds back the others' tokens for more than one step. The lock makes the engine
    safe to drive from more than one thread (one at a time).
    """

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self._buffers: dict[int, deque[StepOutput]] = {}
        self._lock = threading.Lock()

    def stream(self, request: GenerationRequest) -> Iterator[int | None]:
        """Tokens of `request` (None: nothing yet); ends after its last token or its stop id. Closing the
        iterator cancels the request and frees its slot. The request is queued on the first `next`."""
        with self._lock:
            rid = self.engine.add(request)
            buf: deque[StepOutput] = deque()
            self._buffers[rid] = buf
        try:
            while True:
                if not buf:
                    with self._lock:
                        for o in self.engine.step():
                            target = self._buffers.get(o.rid)
                            if target is not None:
                                target.append(o)
                if not buf:
                    yield None
                    continue
                o = buf.popleft()
                if o.token is not None:
                    yield o.token
                if o.finished:
                    return
        finally:
            with self._lock:
                self._buffers.pop(rid, None)
                self.engine.cancel(rid)


def default_stop_ids(tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """End of text and end of turn, the ids a chat model stops on."""
    ids = (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "im_end_id", None))
    return tuple(sorted({i for i in ids if i is not None}))


class TextDecoder:
    """Token ids in, text out, never ending in the middle of a UTF-8 character.

    Byte-level BPE tokens can hold part of a character; the decoder shows an incomplete tail as U+FFFD.
    Tokens are held back until their decoded text no longer ends with U+FFFD (or max_pending tokens pile
    up, which only happens for genuinely invalid bytes: those then come out as U+FFFD once, not silently).
    """

    def __init__(self, tokenizer: Tokenizer, max_pending: int = 8) -> None:
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self._pending: list[int] = []

    def push(self, token: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        self._pending.append(token)
        text = self.tokenizer.decode(self._pending, skip_special_tokens=True)
        if text.endswith("\ufffd") and len(self._pending) < self.max_pending:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """Whatever is held back at the end."""
        text = self.tokenizer.decode(self._pending, skip_special_tokens=True) if self._pending else ""
        self._pending = []
        return text


def stream_text(tokenizer: Tokenizer, token_iter: Iterable[int], max_pending: int = 8) -> Iterator[str]:
    """Turn a stream of token ids into text pieces that never end in the middle of a UTF-8 character
    (see TextDecoder)."""
    decoder = TextDecoder(tokenizer, max_pending)
    for t in token_iter:
        text = decoder.push(t)
        if text:
            yield text
    text = decoder.flush()
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
    compile: bool = False,
) -> Iterator[str]:
    """Generate for one prompt and yield text pieces as they come (whole characters only).

    stop_ids defaults to the tokenizer's end-of-text and end-of-turn ids. Closing the generator stops
    generation and frees its cache. compile: see BatchEngine.
    """

    def tokens() -> Iterator[int]:
        for step in iter_generate(
            model,
            [prompt_ids],
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=default_stop_ids(tokenizer) if stop_ids is None else stop_ids,
            compile=compile,
        ):
            if step[0] is None:
                return
            yield step[0]

    yield from stream_text(tokenizer, tokens())
