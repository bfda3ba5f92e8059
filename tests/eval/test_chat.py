"""Chat behaviour metrics: the task-format leak detector on crafted replies, and the open-prompt scores."""

from __future__ import annotations

import pytest

from matelike.eval.chat import leak_kind, score_open


@pytest.mark.parametrize("prompt, reply, kind", [
    ("今天天气怎么样？", "今天 天气 不会再 ？", "segmented_echo"),  # the reflex the demo model had
    ("你好", "你 好", "segmented_echo"),
    ("你是谁？", "你 是 谁 ？", "segmented_echo"),
    ("你好", "正面", "sentiment_label"),
    ("你喜欢什么电影？", "负面。", "sentiment_label"),
    ("你好", "无", "entity_list"),
    ("北京怎么样？", "地名：北京", "entity_list"),
    ("我们聊聊吧", "人名：江泽民；地名：北京", "entity_list"),
    # genuine replies
    ("你好", "你好！很高兴见到你。", None),
    ("你是谁？", "我是 Matelike，一个从零训练的中文小语言模型。", None),  # a space next to Latin letters
    ("今天天气怎么样？", "我不知道今天的天气，我是一个很小的模型。", None),
    ("你觉得这部电影正面吗", "这部电影的评价大多是正面的，很多人喜欢。", None),
    ("讲个笑话", "有 一 天 小明 去 上学", None),  # spaced, but not the prompt echoed
])
def test_leak_detector_on_crafted_replies(prompt: str, reply: str, kind: str | None) -> None:
    assert leak_kind(prompt, reply) == kind


def test_score_open_counts_leaks_identity_and_overlap_with_a_rule_baseline() -> None:
    items = [
        {"messages": [{"role": "user", "content": "你好"}], "reference": "你好！", "category": "greetings"},
        {"messages": [{"role": "user", "content": "你是谁？"}], "reference": "我是 Matelike。", "category": "identity"},
        {"messages": [{"role": "user", "content": "吃了吗"}], "reference": "吃过了。", "category": "food"},
        {"messages": [{"role": "user", "content": "你叫什么？"}], "reference": "我叫 Matelike。",
         "category": "identity"},
    ]
    replies = ["你 好", "我是 Matelike。", "吃过了。", "正面"]
    out = score_open(items, replies)
    assert out["n"] == 4
    assert out["leak"]["rate"] == 0.5 and out["leak"]["by_kind"] == {"segmented_echo": 1, "sentiment_label": 1,
                                                                     "entity_list": 0}
    lo, hi = out["leak"]["ci95"]
    assert lo < 0.5 < hi
    assert out["identity"]["rate"] == 0.5 and out["identity"]["n"] == 2
    assert out["char_f1"]["mean"] > out["baseline"]["char_f1"]["mean"]
