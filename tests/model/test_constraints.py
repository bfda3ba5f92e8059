"""Constrained decoding: the allowed tokens by hand, and answers of a random model that always spell the text."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matelike.model.constraints import EntityList, SpacedCopy, TokenTrie
from matelike.model.generation import GenerationRequest, generate_requests
from matelike.model.transformer import ModelConfig, Transformer
from matelike.sampling import GREEDY, SamplingParams

STOP = 9
# ids 0..8 spell these bytes; 9 is a stop id (no bytes); "你" is e4 bd a0, split over ids 6 and 7.
TABLE = [b"a", b"b", b"ab", b" a", b" ", b"b ", b"\xe4\xbd", b"\xa0", b"  ", None]


def names(ids: list[int]) -> set[bytes | None]:
    return {TABLE[i] for i in ids}


def test_allowed_tokens_by_hand() -> None:
    c = SpacedCopy(TokenTrie(TABLE), "ab")
    s = c.start()
    assert names(c.allowed(s, (STOP,))) == {b"a", b"ab"}  # no space before the first character
    after_a = c.advance(s, 0)
    assert names(c.allowed(after_a, (STOP,))) == {b"b", b" "}  # "b " would leave a space after the last one
    after_space = c.advance(after_a, 4)
    # never two spaces in a row
    assert after_space == (("copy", 1, True),) and names(c.allowed(after_space, (STOP,))) == {b"b"}
    assert c.allowed(c.advance(after_space, 1), (STOP,)) == [STOP]  # spelled: only a stop id may follow
    assert c.allowed(c.advance(s, 2), (STOP,)) == [STOP]


def test_spaces_only_between_whole_characters() -> None:
    c = SpacedCopy(TokenTrie(TABLE), "你a")
    mid = c.advance(c.start(), 6)  # the first two bytes of 你
    assert names(c.allowed(mid, (STOP,))) == {b"\xa0"}  # no space inside the character
    whole = c.advance(mid, 7)
    assert names(c.allowed(whole, (STOP,))) == {b"a", b" a", b" "}


def test_whitespace_in_the_text_is_not_part_of_what_must_be_spelled() -> None:
    c = SpacedCopy(TokenTrie(TABLE), " a b\n")
    assert c.target == b"ab"


def _random_model(vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                   max_seq_len=128, init_std=0.5)).eval()


@pytest.fixture(scope="module")
def model_and_trie(tokenizer) -> tuple[Transformer, TokenTrie]:
    return _random_model(tokenizer.vocab_size), TokenTrie.for_tokenizer(tokenizer)


@settings(max_examples=25, deadline=None)
@given(text=st.text(alphabet="我们去公园北京人民日报abc１６。，“”é", min_size=1, max_size=12),
       seed=st.integers(0, 3))
def test_a_random_model_always_spells_the_text(tokenizer, model_and_trie, text: str, seed: int) -> None:
    """Greedy and sampled answers of an untrained model (which left alone writes anything): under the
    constraint each spells the text exactly, with single spaces between characters only, and stops."""
    model, trie = model_and_trie
    prompt = tokenizer.encode("中文分词：" + text)
    stops = tuple(tokenizer.stop_ids)
    budget = 3 * len(text.encode("utf-8")) + 2
    requests = [GenerationRequest(prompt, budget, sampling, stops, SpacedCopy(trie, text))
                for sampling in (GREEDY, SamplingParams(temperature=1.5, seed=seed))]
    for new in generate_requests(model, requests, max_batch=2):
        assert len(new) < budget  # ended with a stop id, not by running out
        answer = tokenizer.decode(new)
        assert answer.replace(" ", "") == text
        assert "  " not in answer and answer == answer.strip()


def test_the_constraint_changes_only_what_it_must(tokenizer, model_and_trie) -> None:
    """A greedy constrained answer picks, at each step, the model's most likely allowed token: recomputed here
    from the full logits without the engine."""
    model, trie = model_and_trie
    text = "北京人民日报"
    prompt = tokenizer.encode(text)
    c = SpacedCopy(trie, text)
    stops = tuple(tokenizer.stop_ids)
    expected, state, x = [], c.start(), torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(40):
            logits = model(x).logits[0, -1]
            allowed = c.allowed(state, stops)
            t = allowed[int(logits[allowed].argmax())]
            if t in stops:
                break
            expected.append(t)
            state = c.advance(state, t)
            x = torch.cat([x, torch.tensor([[t]])], dim=1)
    got = generate_requests(model, [GenerationRequest(prompt, 40, GREEDY, stops, c)])[0]
    assert got == expected and tokenizer.decode(got).replace(" ", "") == text


def accepts(c, tokenizer, answer: str) -> bool:
    """Whether constrained decoding can produce exactly `answer` (by the tokenizer's own tokens) and stop."""
    state, stops = c.start(), tuple(tokenizer.stop_ids)
    for t in tokenizer.encode(answer):
        if t not in c.allowed(state, stops):
            return False
        state = c.advance(state, t)
    return stops[0] in c.allowed(state, stops)


ENTITY_TEXT = "江泽民在北京会见新华社社长，随后前往上海。"


@pytest.mark.parametrize("answer", ["无", "人名：江泽民", "人名：江泽民；地名：北京、上海；机构名：新华社", "地名：上海、北京",
                                    "机构名：新华社社长"])
def test_entity_answers_of_the_format_naming_spans_are_accepted(tokenizer, answer: str) -> None:
    assert accepts(EntityList(TokenTrie.for_tokenizer(tokenizer), ENTITY_TEXT), tokenizer, answer)


@pytest.mark.parametrize("answer", [
    "人名：李鹏",  # not in the text
    "地名：北京；人名：江泽民",  # types out of order
    "地名：北京、北京",  # named twice
    "无；地名：北京",  # nothing after 无
    "人名：",  # an empty part
    "地名：北京、",  # a dangling separator
    "人名：江泽民；人名：新华社",  # a type twice
    "人名 江泽民",  # not the format
])
def test_entity_answers_outside_the_grammar_are_refused(tokenizer, answer: str) -> None:
    assert not accepts(EntityList(TokenTrie.for_tokenizer(tokenizer), ENTITY_TEXT), tokenizer, answer)


def test_a_text_with_nothing_to_name_allows_only_none(tokenizer) -> None:
    c = EntityList(TokenTrie.for_tokenizer(tokenizer), "。，")
    assert accepts(c, tokenizer, "无") and not accepts(c, tokenizer, "人名：。")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50))
def test_a_random_model_lists_spans_of_the_text_in_the_format(tokenizer, model_and_trie, seed: int) -> None:
    from matelike.eval.scoring import ENTITY_TYPES as NAMES
    from matelike.eval.scoring import parse_entities

    model, trie = model_and_trie
    prompt = tokenizer.encode("找出句子中的人名、地名、机构名：" + ENTITY_TEXT)
    stops = tuple(tokenizer.stop_ids)
    c = EntityList(trie, ENTITY_TEXT)
    for new in generate_requests(model, [GenerationRequest(prompt, 200, SamplingParams(temperature=2.0, seed=seed),
                                                           stops, c)]):
        assert len(new) < 200
        answer = tokenizer.decode(new)
        if answer == "无":
            continue
        parts = answer.split("；")
        types = [p.split("：")[0] for p in parts]
        assert types == [t for t in NAMES.values() if t in types]  # the format's order, each type once
        names = [n for p in parts for n in p.split("：", 1)[1].split("、")]
        assert len(names) == len(set(names)) and all(n and n in ENTITY_TEXT for n in names)
        assert len(parse_entities(answer)) == len(names)
