"""Intervals against known values: Wilson for rates, the seeded bootstrap, and each task's main metric."""

from __future__ import annotations

import pytest

from matelike.eval.intervals import bootstrap, task_interval, wilson


def test_wilson_matches_published_values() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662; 0/10 -> 0 to 0.2775; 10/10 -> 0.7225 to 1.
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_bootstrap_brackets_the_mean_narrows_with_n_and_is_reproducible() -> None:
    small = [0.0, 1.0] * 10
    big = [0.0, 1.0] * 500
    lo_s, hi_s = bootstrap(small, lambda xs: sum(xs) / len(xs))
    lo_b, hi_b = bootstrap(big, lambda xs: sum(xs) / len(xs))
    assert lo_s < 0.5 < hi_s and lo_b < 0.5 < hi_b
    assert hi_b - lo_b < (hi_s - lo_s) / 4  # about 1/sqrt(50) as wide
    assert bootstrap(small, lambda xs: sum(xs) / len(xs)) == (lo_s, hi_s)
    assert bootstrap([0.3] * 5, lambda xs: sum(xs) / len(xs)) == pytest.approx((0.3, 0.3))


def test_task_intervals_hold_the_metric() -> None:
    golds = ["正面", "负面"] * 50
    assert task_interval("sentiment", golds, golds) == pytest.approx(wilson(100, 100))
    seg_gold = ["我们 去 北京", "今天 天气 很 好"] * 30
    seg_pred = ["我们 去 北京", "今天 天气 很好"] * 30
    lo, hi = task_interval("segmentation", seg_gold, seg_pred)
    assert lo <= 0.75 <= hi  # micro F1 = 2*5/(6+7) ~ 0.77 on every resample of this repeating set
    lo, hi = task_interval("continuation", ["一二三四"] * 20, ["一二三四", "五六"] * 10)
    assert lo <= 0.5 <= hi


def test_paired_difference_is_the_metric_difference_and_cancels_what_both_models_share() -> None:
    from matelike.eval.intervals import task_difference
    from matelike.eval.scoring import score_task

    golds = ["正面", "负面"] * 100
    a = list(golds)
    for i in range(0, 200, 4):  # A wrong on a quarter of the items
        a[i] = "负面" if golds[i] == "正面" else "正面"
    b = list(a)
    for i in range(0, 200, 20):  # B fixes 10 of them and breaks nothing
        b[i] = golds[i]
    diff, (lo, hi) = task_difference("sentiment", golds, a, b)
    assert diff == pytest.approx(score_task("sentiment", golds, b)["accuracy"]
                                 - score_task("sentiment", golds, a)["accuracy"]) == pytest.approx(0.05)
    # Only the 10 changed items vary between resamples: the paired interval excludes 0, while the two
    # models' own intervals overlap.
    assert 0 < lo <= diff <= hi < 0.1
    assert task_interval("sentiment", golds, b)[0] < task_interval("sentiment", golds, a)[1]
    assert task_difference("sentiment", golds, a, a) == (0.0, (0.0, 0.0))

    seg_gold, seg_a, seg_b = ["我们 明天 去 北京"] * 30, ["我们 明天 去北京"] * 30, ["我们 明天 去 北京"] * 30
    diff, (lo, hi) = task_difference("segmentation", seg_gold, seg_a, seg_b)
    assert diff == pytest.approx(1.0 - score_task("segmentation", seg_gold, seg_a)["f1"]) and lo == hi == diff
    with pytest.raises(ValueError, match="predictions"):
        task_difference("entities", ["无"], ["无"], [])
