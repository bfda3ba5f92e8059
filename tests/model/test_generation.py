"""Generation: cache == no cache, batches, sampling controls, stop ids, seeds, UTF-8-safe streaming."""

from __future__ import annotations

import pytest
import torch

from matelike.model.generation import (
    apply_repetition_penalty,
    generate,
    iter_generate,
    sample_next,
    stream_generate,
    stream_text,
)
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
