"""Task phrasings, answer formats and scorers on hand-made cases with exact expected numbers."""

from __future__ import annotations

import random

import pytest

from matelike.eval.scoring import (
    PHRASINGS,
    TASKS,
    char_f1,
    format_entities,
    format_segmentation,
    lcs_length,
    make_prompt,
    parse_entities,
    rouge_l_f1,
    score_item,
    score_task,
    segmentation_spans,
    sentiment_label,
    trivial_answers,
)


def test_every_task_has_several_phrasings_that_show_the_text() -> None:
    rng = random.Random(0)
    for task in TASKS:
        assert len(PHRASINGS[task]) >= 3
        assert all("{text}" in p for p in PHRASINGS[task])
        seen = {make_prompt(task, "某某文本", rng) for _ in range(60)}
        assert len(seen) == len(PHRASINGS[task])  # all phrasings get used
        assert all("某某文本" in s for s in seen)


def test_sentiment_label_takes_the_first_label_word() -> None:
    assert sentiment_label("负面。") == "负面"
    assert sentiment_label("正面") == "正面"
    assert sentiment_label("这是正面还是负面") == "正面"
    assert sentiment_label("负面，不是正面") == "负面"
    assert sentiment_label("不知道") is None


def test_sentiment_accuracy_and_invalid_rate() -> None:
    golds = ["正面", "负面", "负面", "正面"]
    preds = ["正面", "正面", "情感：负面", "好评"]
    m = score_task("sentiment", golds, preds)
    assert m == {"n": 4, "accuracy": 0.5, "invalid": 0.25}


def test_segmentation_spans_use_character_offsets() -> None:
    assert segmentation_spans("我 爱  北京\t天安门") == {(0, 1, "我"), (1, 2, "爱"), (2, 4, "北京"), (4, 7, "天安门")}
    assert format_segmentation(["我", "爱", "北京"]) == "我 爱 北京"


def test_segmentation_precision_recall_f1_micro_averaged() -> None:
    golds = ["我 爱 北京 天安门", "你好"]
    preds = ["我 爱 北 京 天安门", "你好"]
    m = score_task("segmentation", golds, preds)
    # item 1: 3 correct of 5 predicted, 4 gold; item 2: 1 of 1, 1 gold -> 4/6 precision, 4/5 recall
    assert m["n"] == 2
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(16 / 22)
    assert m["exact"] == 0.5


def test_segmentation_word_with_wrong_characters_does_not_count() -> None:
    m = score_task("segmentation", ["北京 大学"], ["北京 大雪"])
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    # every boundary moved: no span matches although the characters are the same
    m = score_task("segmentation", ["中国 人民 银行"], ["中 国人 民银行"])
    assert m["f1"] == 0.0


def test_entity_answer_format_orders_types_and_drops_repeats() -> None:
    ents = [("ns", "北京"), ("nr", "江泽民"), ("nt", "新华社"), ("nr", "李鹏"), ("ns", "北京")]
    assert format_entities(ents) == "人名：江泽民、李鹏；地名：北京；机构名：新华社"
    assert format_entities([]) == "无"
    assert format_entities([("ns", "上海")]) == "地名：上海"
    with pytest.raises(ValueError, match="unknown entity tag"):
        format_entities([("n", "东西")])


def test_parse_entities_accepts_half_width_punctuation_and_ignores_junk() -> None:
    assert parse_entities("人名：江泽民、李鹏；地名：北京") == {("人名", "江泽民"), ("人名", "李鹏"), ("地名", "北京")}
    assert parse_entities("人名:江泽民,李鹏;机构名:新华社。") == {("人名", "江泽民"), ("人名", "李鹏"),
                                                              ("机构名", "新华社")}
    assert parse_entities("无") == set()
    assert parse_entities("人名：无") == set()
    assert parse_entities("乱七八糟；动物：熊猫") == set()


def test_entity_precision_recall_f1() -> None:
    golds = ["人名：江泽民；地名：北京", "无", "机构名：新华社", "无", "无"]
    preds = ["人名：江泽民；地名：上海", "地名：北京", "机构名：新华社", "", "无。"]
    m = score_task("entities", golds, preds)
    # correct: 江泽民, 新华社 = 2; predicted 4; gold 3
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["exact"] == pytest.approx(2 / 5)  # 新华社 and the explicit 无; the empty answer is not exact


def test_continuation_rouge_l_and_char_f1() -> None:
    assert lcs_length("甲乙丙丁", "甲戊丙丁") == 3
    assert lcs_length("", "甲") == 0
    assert lcs_length("甲乙丙丁戊", "乙丁") == 2
    assert rouge_l_f1("甲乙丙丁", "甲戊丙丁") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for the bag of characters
    assert rouge_l_f1("甲乙", "乙甲") == pytest.approx(0.5)
    assert char_f1("甲乙", "乙甲") == pytest.approx(1.0)
    assert char_f1("甲乙丙", "甲") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert rouge_l_f1("甲乙", "") == 0.0
    m = score_task("continuation", ["甲乙丙丁", "甲乙"], ["甲戊丙丁", "乙甲"])
    assert m == {"n": 2, "rouge_l": pytest.approx((0.75 + 0.5) / 2), "char_f1": pytest.approx((0.75 + 1.0) / 2)}


def test_score_task_rejects_unknown_task_and_misaligned_lists() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        score_task("translation", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 gold answers but 1 predictions"):
        score_task("sentiment", ["正面", "负面"], ["正面"])


def test_empty_test_set_scores_zero_not_division_error() -> None:
    for task in TASKS:
        m = score_task(task, [], [])
        assert m["n"] == 0
        assert all(v == 0.0 for k, v in m.items() if k != "n")


def test_score_item_is_the_main_metric_per_answer() -> None:
    assert score_item("sentiment", "正面", "正面") == 1.0
    assert score_item("sentiment", "正面", "负面") == 0.0
    assert score_item("segmentation", "北京 大学", "北京 大雪") == 0.5
    assert score_item("entities", "无", "无") == 1.0
    assert score_item("entities", "无", "人名：张三") == 0.0
    assert score_item("entities", "无", "") == 0.0  # silence is not an answer
    assert score_item("entities", "地名：北京", "地名：北京") == 1.0
    assert score_item("continuation", "甲乙丙丁", "甲戊丙丁") == pytest.approx(0.75)


def test_bit_parallel_lcs_matches_the_dynamic_programme() -> None:
    def table(a: str, b: str) -> int:
        prev = [0] * (len(b) + 1)
        for ca in a:
            cur = [0]
            for j, cb in enumerate(b):
                cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(3)
    for _ in range(500):
        a = "".join(rng.choice("甲乙丙丁") for _ in range(rng.randrange(0, 25)))
        b = "".join(rng.choice("甲乙丙丁戊") for _ in range(rng.randrange(0, 25)))
        assert lcs_length(a, b) == table(a, b), (a, b)


def test_trivial_answers_are_the_rule_based_floors() -> None:
    assert trivial_answers("sentiment", ["负面", "正面", "负面"]) == ["负面"] * 3  # the majority label
    assert trivial_answers("segmentation", ["中国 人民 ， 你好", "去"]) == ["中 国 人 民 ， 你 好", "去"]
    assert trivial_answers("entities", ["人名：江泽民", "无"]) == ["无", "无"]
    assert trivial_answers("continuation", ["下文"]) is None  # no other item to borrow from
    assert trivial_answers("continuation", ["甲", "乙", "丙"]) == ["乙", "丙", "甲"]
    # Scored like a model: every character a word finds exactly the one-character gold words.
    golds = ["中国 人民 ， 你好"]
    m = score_task("segmentation", golds, trivial_answers("segmentation", golds))
    assert (m["precision"], m["recall"]) == pytest.approx((1 / 7, 1 / 4))
    assert score_task("entities", ["无", "地名：北京"], trivial_answers("entities", ["无", "地名：北京"]))["exact"] == 0.5
