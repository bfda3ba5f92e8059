"""Generation: cache == no cache, batches, sampling controls, stop ids, seeds, UTF-8-safe streaming."""

from __future__ import annotations

import pytest
import torch

from matelike.model.generation import (
    BatchEngine,
    BatchStreams,
    GenerationRequest,
    apply_repetition_penalty,
    generate,
    generate_requests,
    iter_generate,
    sample_next,
    stream_generate,
    stream_text,
)
from matelike.model.quantize import quantize_int8
from matelike.model.transformer import ModelConfig, Transformer
from matelike.sampling import GREEDY, SamplingParams

VOCAB = 97


def make(seed: int = 0, vocab: int = VOCAB, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                init_std=0.2)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(prompt) :].tolist()


PROMPTS = [[3, 14, 15, 92, 65, 35], [8, 9], [79, 32, 38, 46]]


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_with_cache_equals_without_and_batch_equals_one_by_one(moe: bool) -> None:
    model = make(**({"n_experts": 4} if moe else {}))
    batched = generate(model, PROMPTS, max_new_tokens=10, sampling=GREEDY)
    for p, out in zip(PROMPTS, batched):
        assert len(out) == 10  # max_new_tokens counts new tokens only
        assert out == greedy_without_cache(model, p, 10)
        assert generate(model, [p], max_new_tokens=10, sampling=GREEDY)[0] == out


def test_top_k_1_and_temperature_0_are_greedy() -> None:
    model = make()
    greedy = generate(model, PROMPTS, max_new_tokens=8, sampling=GREEDY)
    assert generate(model, PROMPTS, max_new_tokens=8, sampling=SamplingParams(top_k=1, temperature=1.3, seed=5)) == greedy


def test_seed_makes_sampling_reproducible() -> None:
    model = make()
    a = generate(model, PROMPTS, max_new_tokens=12, sampling=SamplingParams(temperature=1.5, seed=123))
    b = generate(model, PROMPTS, max_new_tokens=12, sampling=SamplingParams(temperature=1.5, seed=123))
    c = generate(model, PROMPTS, max_new_tokens=12, sampling=SamplingParams(temperature=1.5, seed=124))
    assert a == b and a != c


def test_stop_ids_end_each_row_and_are_not_returned() -> None:
    model = make()
    free = generate(model, PROMPTS, max_new_tokens=10, sampling=GREEDY)
    stop = free[0][3]
    stopped = generate(model, PROMPTS, max_new_tokens=10, sampling=GREEDY, stop_ids=[stop])
    for f, s in zip(free, stopped):
        expected = f[: f.index(stop)] if stop in f else f
        assert s == expected
    assert len(stopped[0]) == free[0].index(stop) < 10


def test_iter_generate_reports_stopped_rows_as_none_and_stops_when_all_done() -> None:
    model = make()
    first = generate(model, PROMPTS, max_new_tokens=1, sampling=GREEDY)
    steps = list(iter_generate(model, PROMPTS, max_new_tokens=20, sampling=GREEDY, stop_ids=[t[0] for t in first]))
    assert steps == [[None, None, None]]


def test_repetition_penalty_lowers_seen_tokens_whatever_the_sign() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    # row 0 saw a token with a positive logit, row 1 one with a negative logit, row 2 nothing
    seen = torch.tensor([[True, False, False, False], [False, True, False, False], [False] * 4])
    before = torch.softmax(logits, -1)
    after = torch.softmax(apply_repetition_penalty(logits, seen, 1.5), -1)
    assert after[0, 0] < before[0, 0]  # positive logit
    assert after[1, 1] < before[1, 1]  # negative logit (dividing it, as the seed does, would raise it)
    assert torch.equal(after[2], before[2])  # per row: row 2 saw nothing
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_in_generate_covers_prompt_and_generated_tokens() -> None:
    model = make()
    prompt = [1, 2, 3]
    free = generate(model, [prompt], max_new_tokens=12, sampling=GREEDY)[0]
    assert len(set(free)) < len(free)  # this little model loves repeating itself
    out = generate(model, [prompt], max_new_tokens=12, sampling=SamplingParams(temperature=0, repetition_penalty=1e4))[0]
    assert len(set(out)) == len(out) and not set(out) & set(prompt)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, sampling=SamplingParams(top_p=0.7), generator=g)
    assert set(picks.tolist()) == {0, 1}
    assert set(sample_next(logits, sampling=SamplingParams(top_p=0.01), generator=g).tolist()) == {0}
    assert set(sample_next(logits, sampling=SamplingParams(top_k=3), generator=g).tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_sampling_parameters_are_rejected(kw: dict, word: str) -> None:
    max_new = kw.pop("max_new_tokens", 4)
    with pytest.raises(ValueError, match=word):
        generate(make(), PROMPTS, max_new_tokens=max_new, sampling=SamplingParams(**kw))


def test_bad_prompts_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        generate(make(), [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        generate(make(), [[1, VOCAB]], max_new_tokens=2)
    assert generate(make(), [], max_new_tokens=2) == []
    assert generate(make(), [[1]], max_new_tokens=0) == [[]]


def test_generation_leaves_no_state_on_the_module() -> None:
    model = make()
    before = (set(vars(model)), {k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_buffers()])
    generate(model, PROMPTS, max_new_tokens=5, sampling=GREEDY)
    assert set(vars(model)) == before[0]
    assert [n for n, _ in model.named_buffers()] == before[2]
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())
    assert torch.is_grad_enabled()  # generation does not leak inference mode into the caller


def test_stream_text_never_splits_a_utf8_character(tokenizer) -> None:
    text = "鑫龘你好，世界！ok"
    ids = tokenizer.encode(text)
    # precondition: the rare characters are split over several byte tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = list(stream_text(tokenizer, iter(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 1  # it streams, not one blob at the end


def test_stream_text_flushes_invalid_bytes_instead_of_holding_them_forever(tokenizer) -> None:
    ids = tokenizer.encode("鑫")
    lone = ids[:1]  # the first byte of a 3-byte character and then nothing: invalid
    pieces = list(stream_text(tokenizer, iter(lone + tokenizer.encode("好"))))
    assert "".join(pieces).endswith("好")


def test_stream_generate_matches_generate_and_can_be_closed(tokenizer) -> None:
    model = make(vocab=tokenizer.vocab_size)
    prompt = tokenizer.encode("今天天气")
    ids = generate(model, [prompt], max_new_tokens=16, sampling=GREEDY, stop_ids=())[0]
    pieces = list(stream_generate(model, tokenizer, prompt, max_new_tokens=16, sampling=GREEDY, stop_ids=()))
    assert pieces == list(stream_text(tokenizer, iter(ids)))
    stream = stream_generate(model, tokenizer, prompt, max_new_tokens=16, sampling=GREEDY, stop_ids=())
    next(stream)
    stream.close()  # stops generation; nothing left running
    with pytest.raises(StopIteration):
        next(stream)


# --- the batched engine -----------------------------------------------------------------------------------------

MIXED = [[5, 17, 33, 2, 8, 61, 40, 12, 9, 3, 70], [8, 9], [79, 32, 38, 46], [1], [44, 45, 46, 47, 48, 49, 50],
         [3, 14, 15, 92, 65, 35], [20, 21, 22]]


def test_engine_greedy_equals_each_prompt_alone_with_mixed_lengths_and_more_prompts_than_slots() -> None:
    model = make()
    alone = [greedy_without_cache(model, p, 9) for p in MIXED]
    stop = alone[1][2]  # some rows stop early and free their slot for a waiting prompt
    expected = [a[: a.index(stop)] if stop in a else a for a in alone]
    assert any(len(e) < 9 for e in expected) and any(len(e) == 9 for e in expected)
    for max_batch in (1, 2, 3, len(MIXED)):
        got = generate(model, MIXED, max_new_tokens=9, sampling=GREEDY, stop_ids=[stop], max_batch=max_batch)
        assert got == expected, max_batch


def test_engine_requests_keep_their_own_budget_and_chunked_prefill_changes_nothing() -> None:
    model = make()
    reqs = [GenerationRequest(p, n, GREEDY) for p, n in zip(MIXED, (3, 12, 1, 7, 5, 10, 2))]
    alone = [greedy_without_cache(model, r.prompt, r.max_new_tokens) for r in reqs]
    assert generate_requests(model, reqs, max_batch=3) == alone
    assert generate_requests(model, reqs, max_batch=2, prefill_chunk=4) == alone  # 11-token prompt: 3 chunks


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_engine_seeded_sampling_draws_the_same_text_alone_and_batched(penalty: float) -> None:
    model = make()
    reqs = [GenerationRequest(p, 10, SamplingParams(temperature=1.2, top_p=0.95, repetition_penalty=penalty,
                                                    seed=100 + i))
            for i, p in enumerate(MIXED)]
    alone = [generate_requests(model, [r])[0] for r in reqs]
    assert len({tuple(a) for a in alone}) > 1
    assert generate_requests(model, reqs, max_batch=3) == alone
    # generate's rows: row 0 draws with the call's seed, as the same prompt does alone
    rows = generate(model, MIXED, max_new_tokens=10, sampling=reqs[0].sampling)
    assert rows[0] == alone[0]


def test_requests_with_the_same_prompt_share_one_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make()
    prompt = [3, 14, 15, 92, 65, 35]
    reqs = [GenerationRequest(prompt, 8, SamplingParams(temperature=1.0, seed=s)) for s in range(4)]
    reqs.append(GenerationRequest(prompt, 8, GREEDY))
    alone = [generate_requests(model, [r])[0] for r in reqs]
    prefills: list[int] = []
    forward = model.forward

    def counting(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:
            prefills.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    assert generate_requests(model, reqs, max_batch=8) == alone
    assert prefills == [len(prompt)]  # one prefill, copied into the other four slots
    assert alone[-1] == greedy_without_cache(model, prompt, 8)


def test_engine_cancel_frees_the_slot_for_a_waiting_request() -> None:
    model = make()
    engine = BatchEngine(model, max_batch=2, max_len=64)
    a, b, c = (engine.add(GenerationRequest(p, 20, GREEDY)) for p in MIXED[:3])
    first = engine.step()
    assert {o.rid for o in first} == {a, b} and engine.free_slots == 0 and engine.waiting == 1
    engine.cancel(a)
    assert engine.free_slots == 1
    second = engine.step()
    assert {o.rid for o in second} == {b, c}  # c took a's slot
    engine.cancel(c)
    engine.cancel(b)
    assert engine.free_slots == 2 and not engine.has_work()


def test_engine_refuses_what_does_not_fit() -> None:
    engine = BatchEngine(make(), max_batch=1, max_len=8)
    with pytest.raises(ValueError, match="exceed"):
        engine.add(GenerationRequest([1, 2, 3], 6))
    with pytest.raises(ValueError, match="empty"):
        engine.add(GenerationRequest([], 2))
    with pytest.raises(ValueError, match="token ids"):
        engine.add(GenerationRequest([VOCAB], 2))


def test_batch_streams_interleave_requests_and_closing_one_frees_its_slot() -> None:
    model = make()
    streams = BatchStreams(BatchEngine(model, max_batch=2, max_len=64, prefill_per_step=4, prefill_chunk=4))
    its = [streams.stream(GenerationRequest(p, 6, GREEDY)) for p in MIXED[:2]]
    got: list[list[int]] = [[], []]
    while any(len(g) < 6 for g in got):  # round-robin, as the server's worker advances them
        for g, it in zip(got, its):
            if len(g) < 6:
                t = next(it)
                if t is not None:
                    g.append(t)
    assert got == [greedy_without_cache(model, p, 6) for p in MIXED[:2]]
    for it in its:
        assert list(it) == []  # finished
    third = streams.stream(GenerationRequest(MIXED[2], 50, GREEDY))
    next(third)
    assert streams.engine.free_slots == 1
    third.close()
    assert streams.engine.free_slots == 2


def test_engine_compile_runs_decode_steps_of_rows_in_step_through_torch_compile_and_the_rest_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The wiring, without paying a compilation: torch.compile is replaced by a recorder that returns the model.
    from torch._inductor import config as inductor_config

    model = make()
    same_length = [[3, 14, 15, 92], [79, 32, 38, 46]]
    eager = generate(model, PROMPTS, max_new_tokens=6, sampling=GREEDY)
    eager_same = generate(model, same_length, max_new_tokens=6, sampling=GREEDY)
    compiled: list[dict] = []
    calls: list[tuple[int, int]] = []
    frozen: list[bool] = []

    def fake_compile(m, **kwargs):
        compiled.append(kwargs)

        def run(input_ids, **kw):
            calls.append(tuple(input_ids.shape))
            frozen.append(inductor_config.freezing)  # a graph compiled here freezes the weights
            return m(input_ids, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert generate(model, PROMPTS, max_new_tokens=6, sampling=GREEDY, compile=True) == eager
    assert compiled == [{"dynamic": True}]
    assert calls == []  # prompts of three lengths decode at their own positions, eagerly; prefill is eager too
    assert generate(model, same_length, max_new_tokens=6, sampling=GREEDY, compile=True) == eager_same
    assert calls == [(2, 1)] * 5  # rows in step: every decode step compiled (the first token comes from prefill)
    assert set(frozen) == {True} and not inductor_config.freezing  # for the compiled calls only
    assert generate(model, PROMPTS, max_new_tokens=6, sampling=GREEDY) == eager and len(compiled) == 2


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True])
def test_engine_compiled_decode_gives_the_eager_greedy_answers(int8: bool) -> None:
    # Compiled with inductor's freezing: the weights (int8 ones too) are constants of the graph.
    model = quantize_int8(make()) if int8 else make()
    for prompts in ([p] for p in PROMPTS):  # one row: every decode step compiled
        eager = generate(model, prompts, max_new_tokens=8, sampling=GREEDY)
        assert generate(model, prompts, max_new_tokens=8, sampling=GREEDY, compile=True) == eager
