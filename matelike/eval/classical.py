"""Classical tools answering the demo tasks, scored like the models on the same items: the references the
models are read against beside the rule baselines.

- sentiment: multinomial naive Bayes over character unigrams and bigrams with add-one (Laplace) smoothing,
  trained on the labelled reviews of an SFT file (the demo's `sft.jsonl`: every user turn that asks for a
  review's sentiment in one of the demo phrasings and is answered `正面` or `负面`), so it learns from exactly
  the reviews the model is fine-tuned on and never sees a test or development item.
- segmentation: jieba with its dictionary only (`HMM=False`).
- entities: jieba.posseg's part-of-speech tags (its default mode, with the HMM), person names (`nr` and its
  subtypes `nrt`, `nrfg`) as 人名, `ns` as 地名, `nt` as 机构名, written in the demo's answer format.

The two jieba settings were chosen on the demo's development split, as the model's settings are: segmentation
F1 0.823 without the HMM against 0.797 with it (the HMM joins unknown characters into words, where People's
Daily segments a name as surname and given name); entity F1 0.633 with nrt/nrfg against 0.620 with nr alone,
and 0.566 without the HMM.

Answers are scored by `scoring.score_task` with the same 95% intervals as every eval figure
(`intervals.task_metrics`). Continuation has no classical tool. jieba is an optional extra.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

from matelike.data.formats import RecordError, to_messages
from matelike.data.records import BadRecord, BadRecordReport, iter_records
from matelike.eval.intervals import task_metrics
from matelike.eval.scoring import NEGATIVE, POSITIVE, format_entities, format_segmentation, prompt_input

INSTALL_HINT = "pip install 'matelike[classical]'"
JIEBA_TASKS: tuple[str, ...] = ("segmentation", "entities")
# jieba's tag -> the corpus tag `scoring.format_entities` takes (nr/ns/nt). nrt (transliterated names) and nrfg
# are person names in jieba's tag set (nrt also holds some noise, as 伊拉克, yet scores higher on the dev split).
JIEBA_ENTITY_TAGS = {"nr": "nr", "nrt": "nr", "nrfg": "nr", "ns": "ns", "nt": "nt"}
# Each tool in words: the eval JSON's `method`, which the report's table introduction quotes.
METHODS = {"sentiment": "naive Bayes on character unigrams and bigrams, trained on the SFT reviews",
           "segmentation": "jieba with its dictionary only (no HMM)",
           "entities": "jieba's part-of-speech tags nr (with nrt, nrfg), ns, nt"}


def load_jieba() -> ModuleType | None:
    """The jieba module with its part-of-speech tagger loaded, or None when the extra is not installed."""
    try:
        import jieba
        import jieba.posseg  # noqa: F401  (a submodule: imported for its side effect of becoming jieba.posseg)
    except ImportError:
        return None
    jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" lines would interleave with eval's output
    return jieba


# ---------------------------------------------------------------------------------------------- naive Bayes


class NaiveBayes:
    """Multinomial naive Bayes over character unigrams and bigrams with add-`alpha` (Laplace) smoothing.

    P(f | label) = (count of f in the label's texts + alpha) / (features in the label's texts + alpha * |V|)
    over the training vocabulary V; features never seen in training are left out of a text's score.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.counts: dict[str, Counter[str]] = {}  # feature counts per label
        self.docs: dict[str, int] = {}  # training texts per label
        self.log_prior: dict[str, float] = {}
        self._log_denominator: dict[str, float] = {}
        self._vocab: frozenset[str] = frozenset()

    @staticmethod
    def features(text: str) -> list[str]:
        """Every character and every pair of adjacent characters of `text`."""
        return list(text) + [text[i:i + 2] for i in range(len(text) - 1)]

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> "NaiveBayes":
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("no training texts")
        self.docs = dict(sorted(Counter(labels).items()))
        self.counts = {label: Counter() for label in self.docs}
        for text, label in zip(texts, labels):
            self.counts[label].update(self.features(text))
        vocab = set().union(*self.counts.values())
        self.log_prior = {label: math.log(n / len(texts)) for label, n in self.docs.items()}
        self._log_denominator = {label: math.log(sum(c.values()) + self.alpha * len(vocab))
                                 for label, c in self.counts.items()}
        self._vocab = frozenset(vocab)
        return self

    def log_scores(self, text: str) -> dict[str, float]:
        """log P(label) + sum of log P(f | label) over the text's known features: the unnormalised log posterior."""
        if not self.counts:
            raise RuntimeError("fit the classifier first")
        known = [f for f in self.features(text) if f in self._vocab]
        return {label: self.log_prior[label] + sum(math.log(c[f] + self.alpha) for f in known)
                - len(known) * self._log_denominator[label] for label, c in self.counts.items()}

    def predict(self, text: str) -> str:
        """The label with the highest score (the first in sorted order on a tie)."""
        scores = self.log_scores(text)
        return max(scores, key=scores.__getitem__)


def sft_reviews(path: str | Path, report: BadRecordReport) -> tuple[list[str], list[str]]:
    """(reviews, labels) of an SFT file: each user turn asking a demo sentiment phrasing, answered 正面 or 负面
    (alone or after small talk). Records that are not conversations go to `report` as FILE:LINE."""
    texts: list[str] = []
    labels: list[str] = []
    for line, rec in iter_records(path):
        if isinstance(rec, BadRecord):
            report.add(rec)
            continue
        try:
            messages = to_messages(rec)
        except RecordError as e:
            report.add(BadRecord(str(path), line, e.reason))
            continue
        for ask, reply in zip(messages, messages[1:]):
            label = reply["content"].strip()
            if ask["role"] != "user" or reply["role"] != "assistant" or label not in (POSITIVE, NEGATIVE):
                continue
            text = prompt_input("sentiment", ask["content"])
            if text is not None:
                texts.append(text)
                labels.append(label)
    return texts, labels


# ---------------------------------------------------------------------------------------------- jieba


def jieba_segmentation(jieba: ModuleType, text: str) -> str:
    """jieba's words of `text` in the demo's answer format (words separated by single spaces)."""
    return format_segmentation([w for w in jieba.lcut(text, HMM=False) if w.strip()])


def jieba_entities(jieba: ModuleType, text: str) -> str:
    """The person, place and organisation names jieba.posseg tags in `text`, in the demo's answer format."""
    return format_entities((JIEBA_ENTITY_TAGS[p.flag], p.word) for p in jieba.posseg.lcut(text)
                           if p.flag in JIEBA_ENTITY_TAGS and p.word.strip())


# ---------------------------------------------------------------------------------------------- baselines


def _inputs(task: str, rows: Iterable[Mapping[str, str]]) -> list[str | None]:
    """Each item's bare text: its `input` field, else recovered from a demo phrasing of its prompt."""
    return [r.get("input") or prompt_input(task, r["prompt"]) for r in rows]


def classical_baselines(items: Mapping[str, Sequence[Mapping[str, str]]], *, reviews: str | Path | None,
                        report: BadRecordReport, jieba: ModuleType | None = None,
                        ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(metrics per task in the shape of eval's `baselines` plus a `method`, one-line notes on what was left out).

    `items` are eval's loaded test items; `reviews` the SFT file the naive Bayes learns from (None: no
    sentiment baseline); `jieba` the module from `load_jieba()` (None: no segmentation / entity baselines).
    """
    out: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    wanted = [t for t in items if t in METHODS and items[t]]
    missing_jieba = [t for t in wanted if t in JIEBA_TASKS and jieba is None]
    if missing_jieba:
        notes.append(f"classical baselines for {' and '.join(missing_jieba)} need jieba: {INSTALL_HINT}")
    model: NaiveBayes | None = None
    if "sentiment" in wanted:
        if reviews is None:
            notes.append("classical sentiment baseline left out: no SFT file to train it on (--data DIR with "
                         "sft.jsonl, or --classical-reviews FILE)")
        else:
            texts, labels = sft_reviews(reviews, report)
            if len(set(labels)) < 2:
                notes.append(f"classical sentiment baseline left out: {reviews} has no reviews labelled both "
                             f"{POSITIVE} and {NEGATIVE} in the demo's phrasings")
            else:
                model = NaiveBayes().fit(texts, labels)
    for task in wanted:
        if (task in JIEBA_TASKS and jieba is None) or (task == "sentiment" and model is None):
            continue
        rows = items[task]
        inputs = _inputs(task, rows)
        unknown = sum(text is None for text in inputs)
        if unknown:
            notes.append(f"classical {task} baseline left out: {unknown} of its {len(rows)} items have no `input` "
                         f"field and a prompt in none of the demo's phrasings")
            continue
        if task == "sentiment":
            answers = [model.predict(text) for text in inputs]
        elif task == "segmentation":
            answers = [jieba_segmentation(jieba, text) for text in inputs]
        else:
            answers = [jieba_entities(jieba, text) for text in inputs]
        out[task] = {**task_metrics(task, [r["answer"] for r in rows], answers), "method": METHODS[task]}
        if model is not None and task == "sentiment":
            out[task]["train_reviews"] = sum(model.docs.values())
    return out, notes
