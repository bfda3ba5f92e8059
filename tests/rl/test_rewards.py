"""Task rewards and their reward-hack guards, and the TRL-style reward function convention."""

from __future__ import annotations

import sys
import textwrap

import pytest

from matelike.eval.scoring import score_item, score_task
from matelike.rl.rewards import (
    ENTITY_F1,
    check_task_record,
    combine_rewards,
    continuation_reward,
    copied_fraction,
    entity_reward,
    hack_references,
    load_reward,
    sentiment_reward,
    task_reward,
)

GOLD_ENT = "人名：江泽民；地名：北京"


def test_sentiment_only_the_bare_label_earns() -> None:
    assert sentiment_reward("正面", "正面") == 1.0
    assert sentiment_reward("正面", " 正面。") == 1.0
    assert sentiment_reward("负面", "正面") == 0.0
    assert sentiment_reward("正面", "正面，因为物流很快") == 0.0  # longer than the label
    assert sentiment_reward("正面", "正面或负面") == 0.0  # hedging: the eval's first-label rule would count it
    assert score_item("sentiment", "正面", "正面或负面") == 1.0  # ... which is the hack the guard closes


def test_entities_empty_answer_is_not_a_safe_bet() -> None:
    golds = [GOLD_ENT, "无", "机构名：新华社", "无"]
    # the unguarded per-item score pays `无` 0.5 on this half-empty set; the eval's micro-F1 pays 0
    assert sum(score_item("entities", g, "无") for g in golds) / 4 == 0.5
    assert score_task("entities", golds, ["无"] * 4)["f1"] == 0.0
    assert [entity_reward(g, "无") for g in golds] == [0.0] * 4
    # one entity found beats saying nothing; a false positive on an empty item costs
    assert entity_reward(GOLD_ENT, "人名：江泽民") == pytest.approx(2 - ENTITY_F1)
    assert entity_reward("无", "地名：上海") == pytest.approx(-ENTITY_F1)
    # an answer that names nothing and does not say 无 costs one false positive (the format stays)
    assert entity_reward("无", "我不知道") == pytest.approx(-ENTITY_F1)


def test_entity_weights_are_the_eval_micro_f1_gradient() -> None:
    """At micro-F1 = f, turning a missed entity into a found one raises F1 (2 - f)/f times as much as one
    false positive lowers it: the ratio of the reward's weights."""
    f = ENTITY_F1
    c, fp, fn = 1000, 1000, 1000  # F1 = 2c / (2c + fp + fn) = 0.5

    def f1(c: int, fp: int, fn: int) -> float:
        return 2 * c / (2 * c + fp + fn)

    assert f1(c, fp, fn) == f
    gain = f1(c + 1, fp, fn - 1) - f1(c, fp, fn)
    loss = f1(c, fp, fn) - f1(c, fp + 1, fn)
    assert gain / loss == pytest.approx((2 - f) / f, rel=1e-2)
    gold, one_right_one_wrong = GOLD_ENT, "人名：江泽民；地名：上海"
    assert entity_reward(gold, one_right_one_wrong) == pytest.approx((2 - f) - f)


def test_continuation_copying_the_prompt_is_penalised() -> None:
    text = "新华社北京一月一日电今天是新年的第一天首都各界群众举行了隆重的庆祝活动"
    gold = "人们走上街头欢庆节日气氛热烈商场里顾客很多大家都在购买年货"
    prompt = f"续写新闻段落：{text}"
    assert copied_fraction(prompt, text) == 1.0
    assert copied_fraction(prompt, gold) == 0.0
    assert continuation_reward(gold, text, prompt) < 0 < continuation_reward(gold, gold, prompt)
    # a plain news sentence on the topic shares a few characters with the prompt, not runs of them
    other = "今天首都的群众在广场上举行活动庆祝新年"
    assert copied_fraction(prompt, other) < 0.5
    assert continuation_reward(gold, other, prompt) > continuation_reward(gold, text, prompt)


def test_task_reward_dispatches_by_task_and_reports_the_hacks() -> None:
    prompts = ["判断评论情感：很好", "中文分词：我爱北京", "找出人名：江泽民在北京", "续写新闻段落：新华社北京电今天天气很好"]
    fields = [{"task": "sentiment", "answer": "正面"}, {"task": "segmentation", "answer": "我 爱 北京"},
              {"task": "entities", "answer": GOLD_ENT}, {"task": "continuation", "answer": "北京今天天气很好人们出门散步"}]
    completions = ["正面", "我 爱 北京", "人名：江泽民；地名：北京", "新华社北京电今天天气很好"]
    got = task_reward(prompts, completions, task=[f["task"] for f in fields], answer=[f["answer"] for f in fields])
    assert got[:3] == [1.0, 1.0, pytest.approx(2 * (2 - ENTITY_F1))] and got[3] < 0
    assert task_reward(["x"], ["y"], task=[None], answer=[None]) == [None]
    hacks = hack_references(prompts, fields)
    assert hacks["entities_always_none"] == 0.0 and hacks["entities_always_none_unguarded"] == 0.0
    assert hacks["continuation_copy_prompt"] < 0 < hacks["continuation_copy_prompt_unguarded"]


def test_check_task_record_names_the_problem() -> None:
    assert check_task_record({"task": "sentiment", "answer": "正面"}) is None
    assert "missing field: 'task'" in check_task_record({"answer": "正面"})
    assert check_task_record({"task": "chat"}) is None  # no scorer: well formed, the task reward gives None
    assert "must be a string" in check_task_record({"task": 3, "answer": "x"})
    assert "missing field: 'answer'" in check_task_record({"task": "sentiment"})


def test_user_reward_functions_trl_convention_with_weights(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]

        def only_b(prompts, completions, kind, completion_ids):
            return [1.0 if k == "b" else None for k in kind]
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    length, only_b = load_reward("my_rewards:length"), load_reward("my_rewards:only_b")
    assert load_reward("task") is task_reward
    total, per_fn = combine_rewards([length, only_b], [1.0, 10.0], ["p", "q", "r"], ["ab", "c", ""],
                                    [{"kind": "a"}, {"kind": "b"}, {}], [[1, 2], [3], []])
    assert per_fn == [[2.0, 1.0, 0.0], [None, 1.0, None]]
    assert total == [2.0, 11.0, 0.0]
    for bad, msg in [("nope", "module:function"), ("no_such_module_xyz:f", "cannot import"),
                     ("my_rewards:missing", "no function")]:
        with pytest.raises(ValueError, match=msg):
            load_reward(bad)
    with pytest.raises(ValueError, match="2 values for 3"):
        combine_rewards([lambda p, c, **k: [1.0, 2.0]], [1.0], ["p"] * 3, ["c"] * 3, [{}] * 3, [[]] * 3)
    with pytest.raises(ValueError, match="finite"):
        combine_rewards([lambda p, c, **k: [float("nan")]], [1.0], ["p"], ["c"], [{}], [[]])
    sys.modules.pop("my_rewards", None)
