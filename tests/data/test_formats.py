"""formats.py: SFT layouts to messages, preference records, pretraining text; RecordError reasons."""

from __future__ import annotations

import pytest

from matelike.data.formats import (
    Preference,
    RecordError,
    detect_sft_format,
    guess_kind,
    pretrain_text,
    record_chars,
    to_messages,
    to_preference,
)

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


def test_pretrain_text() -> None:
    assert pretrain_text({"text": "你好"}) == "你好"
    assert pretrain_text({"content": "x"}, field="content") == "x"
    for obj, reason in [({}, "missing field: 'text'"), ({"text": None}, "missing field: 'text'"),
                        ({"text": 3}, "wrong type: field 'text' is a number, expected a string"),
                        ({"text": ["a"]}, "wrong type: field 'text' is an array, expected a string"),
                        ({"text": " \n"}, "empty text: field 'text'")]:
        with pytest.raises(RecordError) as e:
            pretrain_text(obj)
        assert e.value.reason == reason


def test_prompt_response() -> None:
    obj = {"prompt": "问题", "response": "回答"}
    assert detect_sft_format(obj) == "prompt_response"
    assert to_messages(obj) == [U("问题"), A("回答")]
    with_sys = {"system": "你是助手", "prompt": "q", "response": "a", "history": [["q0", "a0"]]}
    assert to_messages(with_sys) == [S("你是助手"), U("q0"), A("a0"), U("q"), A("a")]


def test_alpaca() -> None:
    assert detect_sft_format({"instruction": "翻译", "input": "", "output": "x"}) == "alpaca"
    assert to_messages({"instruction": "翻译", "input": "hello", "output": "你好"}) == [U("翻译\nhello"), A("你好")]
    assert to_messages({"instruction": "说你好", "output": "你好"}) == [U("说你好"), A("你好")]


def test_messages_and_sharegpt() -> None:
    msgs = [S("sys"), U("a"), A("b"), U("c"), A("d")]
    assert to_messages({"messages": msgs}) == msgs
    share = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "system": "s"}
    assert detect_sft_format(share) == "messages"
    assert to_messages(share) == [S("s"), U("a"), A("b")]


@pytest.mark.parametrize("obj, reason", [
    ({"foo": 1}, "missing field"),
    ({"prompt": "q"}, "missing field: 'response'"),
    ({"prompt": "q", "response": 5}, "wrong type: field 'response' is a number"),
    ({"prompt": "", "response": "a"}, "empty text: field 'prompt'"),
    ({"instruction": "i", "input": 3, "output": "o"}, "wrong type: field 'input'"),
    ({"messages": "hi"}, "wrong type: field 'messages' is a string"),
    ({"messages": []}, "empty text"),
    ({"messages": ["hi"]}, "wrong type: messages[0] is a string"),
    ({"messages": [{"content": "x"}]}, "missing field: messages[0] has no 'role'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "bad role"),
    ({"messages": [U("a"), {"role": "assistant"}]}, "missing field: messages[1] has no 'content'"),
    ({"messages": [U("a"), {"role": "assistant", "content": 1}]}, "wrong type: messages[1].content"),
    ({"messages": [U("a"), A(" ")]}, "empty text: messages[1].content"),
    ({"messages": [U("a"), U("b"), A("c")]}, "bad turn order: turn 2"),
    ({"messages": [A("a")]}, "bad turn order: turn 1"),
    ({"messages": [U("a")]}, "bad turn order: conversation does not end"),
    ({"messages": [U("a"), A("b"), S("late")]}, "bad turn order"),
    ({"prompt": "q", "response": "a", "history": [["only one"]]}, "wrong type: history[0]"),
])
def test_sft_errors(obj: dict, reason: str) -> None:
    with pytest.raises(RecordError) as e:
        to_messages(obj)
    assert e.value.reason.startswith(reason)


def test_preference_strings_and_messages() -> None:
    p = to_preference({"prompt": "问", "chosen": "好答案", "rejected": "坏答案"})
    assert p == Preference(prompt=[U("问")], chosen=[A("好答案")], rejected=[A("坏答案")])
    conv = {"prompt": [S("s"), U("q")], "chosen": [A("c")], "rejected": [A("r")]}
    assert to_preference(conv) == Preference([S("s"), U("q")], [A("c")], [A("r")])
    # Implicit prompt: whole conversations sharing a prefix.
    implicit = {"chosen": [U("q"), A("c")], "rejected": [U("q"), A("r")]}
    assert to_preference(implicit) == Preference([U("q")], [A("c")], [A("r")])


@pytest.mark.parametrize("obj, reason", [
    ({"chosen": "c", "rejected": "r"}, "missing field: 'prompt'"),
    ({"prompt": "q", "rejected": "r"}, "missing field: 'chosen'"),
    ({"prompt": "q", "chosen": 1, "rejected": "r"}, "wrong type: field 'chosen' is a number"),
    ({"prompt": "q", "chosen": "", "rejected": "r"}, "empty text: field 'chosen'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical pair"),
    ({"prompt": [U("q"), A("a")], "chosen": "c", "rejected": "r"}, "bad turn order: prompt does not end"),
    ({"prompt": "q", "chosen": [U("x")], "rejected": "r"}, "bad turn order: 'chosen'"),
])
def test_preference_errors(obj: dict, reason: str) -> None:
    with pytest.raises(RecordError) as e:
        to_preference(obj)
    assert e.value.reason.startswith(reason)


def test_guess_kind_and_chars() -> None:
    assert guess_kind({"text": "x"}) == "pretrain"
    assert guess_kind({"prompt": "q", "response": "a"}) == "sft"
    assert guess_kind({"prompt": "q", "chosen": "a", "rejected": "b"}) == "dpo"
    assert record_chars({"prompt": "q", "response": "ab"}, "sft") == 3
    assert record_chars({"prompt": "q", "chosen": "a", "rejected": "bc"}, "dpo") == 4


def test_forced_messages_format_on_other_layout_is_a_record_error() -> None:
    import pytest

    from matelike.data.formats import RecordError, to_messages

    with pytest.raises(RecordError, match="missing field: 'messages' or 'conversations'"):
        to_messages({"prompt": "你好", "response": "你好！"}, fmt="messages")
