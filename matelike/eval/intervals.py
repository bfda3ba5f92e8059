"""95% intervals for every reported figure: Wilson for rates, a percentile bootstrap over items otherwise."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1 and for small n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(items: Sequence[T], statistic: Callable[[Sequence[T]], float], *, resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over resamples of `items` (with replacement).

    Resampling whole items keeps micro-averaged figures (F1 summed over items) honest: an item's counts stay
    together. Seeded, so a report is reproducible.
    """
    if not items:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(items)
    stats = sorted(statistic([items[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    lo = stats[int(math.floor((1 - level) / 2 * resamples))]
    hi = stats[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return (lo, hi)


def _item_rows(task: str, golds: Sequence[str], preds: Sequence[str]) -> tuple[list, Callable[[Sequence], float]]:
    """Per-item rows of a task's main metric (`scoring.MAIN_METRIC`) and the statistic that turns rows into it:
    (correct, predicted, gold) counts summed into micro-F1, or per-item scores averaged."""
    from matelike.eval import scoring

    if task in ("segmentation", "entities"):
        parse = scoring.segmentation_spans if task == "segmentation" else scoring.parse_entities
        counts = []
        for g, p in zip(golds, preds):
            gs, ps = parse(g), parse(p)
            counts.append((len(gs & ps), len(ps), len(gs)))

        def micro_f1(rows: Sequence[tuple[int, int, int]]) -> float:
            c, pr, go = (sum(x) for x in zip(*rows))
            return 2 * c / (pr + go) if pr + go else 0.0

        return counts, micro_f1
    if task in ("sentiment", "continuation"):  # accuracy, ROUGE-L: per-item means
        return [scoring.score_item(task, g, p) for g, p in zip(golds, preds)], lambda xs: sum(xs) / len(xs)
    raise ValueError(f"unknown task {task!r}")


def task_interval(task: str, golds: Sequence[str], preds: Sequence[str]) -> tuple[float, float]:
    """95% interval of a task's main metric (`scoring.MAIN_METRIC`) on these items.

    Accuracy: Wilson. Micro-averaged F1: bootstrap over items of the summed (correct, predicted, gold)
    counts. ROUGE-L: bootstrap of the per-item mean.
    """
    rows, statistic = _item_rows(task, golds, preds)
    if task == "sentiment":
        return wilson(int(sum(rows)), len(golds))
    return bootstrap(rows, statistic)


def task_difference(task: str, golds: Sequence[str], preds_a: Sequence[str],
                    preds_b: Sequence[str]) -> tuple[float, tuple[float, float]]:
    """Model B's main metric minus model A's on the same items, with its paired 95% bootstrap interval.

    Both models' rows of one item are resampled together, so what the two models share (an item both get
    right or both get wrong) cancels: the interval of the difference is narrower than the two intervals side
    by side suggest, and an improvement is real when it excludes 0.
    """
    if not len(golds) == len(preds_a) == len(preds_b):
        raise ValueError(f"{len(golds)} gold answers but {len(preds_a)} and {len(preds_b)} predictions")
    rows_a, statistic = _item_rows(task, golds, preds_a)
    rows_b, _ = _item_rows(task, golds, preds_b)
    pairs = list(zip(rows_a, rows_b))

    def diff(sample: Sequence[tuple]) -> float:
        return statistic([b for _, b in sample]) - statistic([a for a, _ in sample])

    return diff(pairs), bootstrap(pairs, diff)


def task_metrics(task: str, golds: Sequence[str], preds: Sequence[str]) -> dict[str, Any]:
    """`scoring.score_task`'s metrics of these answers plus `ci95`, the 95% interval of the main metric: how
    eval reports every task figure (models, rule and classical baselines alike)."""
    from matelike.eval import scoring

    return {**scoring.score_task(task, golds, preds), "ci95": list(task_interval(task, golds, preds))}
