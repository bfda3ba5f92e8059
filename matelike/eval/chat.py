"""Chat behaviour: does the model converse, or answer everything in a task's format?

Scored on the demo's held-out `chat_test.jsonl` (see matelike.data.dialogue):

- open prompts (greetings, questions, small talk, identity, out-of-scope questions):
  - `leak`: the share of replies in a task's answer format (`leak_kind`), with a Wilson interval;
  - `identity`: the share of replies to identity questions that name the model;
  - `char_f1` / `rouge_l` against the reference reply, with a bootstrap interval, next to the same rule as
    the continuation task's (another item's reference reply);
- tasks asked in a later turn, after small talk: each scored with its task's own scorer.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from matelike.data.records import BadRecord, BadRecordReport, iter_records
from matelike.eval.intervals import bootstrap, wilson
from matelike.eval.scoring import ENTITY_TYPES, NEGATIVE, NO_ENTITY, POSITIVE, TASKS, char_f1, lcs_length, rouge_l_f1

MODEL_NAME = "Matelike"
_CJK = r"[\u3400-\u9fff]"
_SPACED_CJK = re.compile(rf"{_CJK}\s+{_CJK}")
_TRAILING = "。.!！?？~～…\"“”'‘’ "


def leak_kind(prompt: str, reply: str) -> str | None:
    """Which task format `reply` takes for an open `prompt`, or None for a reply in no task's format.

    - `segmented_echo`: the reply has a space between two CJK characters (segmentation's answer format), and
      at least half of its characters, spaces removed, are a common subsequence with the prompt: the prompt
      re-spaced into words (`今天 天气 不会再 ？` for `今天天气怎么样？`).
    - `sentiment_label`: the whole reply, trailing punctuation removed, is `正面` or `负面`.
    - `entity_list`: the reply is `无`, or starts with an entity category and its colon (`人名：…`).
    """
    text = reply.strip()
    bare = text.strip(_TRAILING)
    if bare in (POSITIVE, NEGATIVE):
        return "sentiment_label"
    if bare == NO_ENTITY or re.match(rf"^({'|'.join(ENTITY_TYPES.values())})\s*[：:]", text):
        return "entity_list"
    if _SPACED_CJK.search(text):
        joined = "".join(text.split())
        if joined and lcs_length(joined, "".join(prompt.split())) >= 0.5 * len(joined):
            return "segmented_echo"
    return None


def load_chat_items(path: str, report: BadRecordReport, limit: int | None = None) -> list[dict[str, Any]]:
    """Items of a chat test file: `{kind: open, messages, reference, category}` or `{kind: task, task,
    messages, answer}`; bad records are reported by file and line. `limit` caps each kind."""
    items: list[dict[str, Any]] = []
    counts = {"open": 0, "task": 0}
    for line, rec in iter_records(path):
        if isinstance(rec, BadRecord):
            report.add(rec)
            continue
        problem = _problem(rec)
        if problem:
            report.add(BadRecord(str(path), line, problem))
            continue
        if limit is None or counts[rec["kind"]] < limit:
            counts[rec["kind"]] += 1
            items.append(rec)
    return items


def _problem(rec: dict[str, Any]) -> str | None:
    kind = rec.get("kind")
    if kind not in ("open", "task"):
        return f"field 'kind' must be 'open' or 'task', got {kind!r}"
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in msgs) or msgs[-1]["role"] != "user":
        return "field 'messages' must be a list of {role, content} ending with a user turn"
    key = "reference" if kind == "open" else "answer"
    if not isinstance(rec.get(key), str):
        return f"missing field: {key!r}"
    if kind == "task" and rec.get("task") not in TASKS:
        return f"unknown task: {rec.get('task')!r} (expected one of {', '.join(TASKS)})"
    return None


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    k, n = sum(flags), len(flags)
    return {"rate": k / n if n else 0.0, "ci95": list(wilson(k, n)), "n": n}


def _mean(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values) if values else 0.0,
            "ci95": list(bootstrap(values, lambda xs: sum(xs) / len(xs))), "n": len(values)}


def score_open(items: Sequence[dict[str, Any]], replies: Sequence[str]) -> dict[str, Any]:
    """Leak rate by kind, identity rate, and reply overlap with the references (model and rule baseline)."""
    prompts = [it["messages"][-1]["content"] for it in items]
    refs = [it["reference"] for it in items]
    kinds = [leak_kind(p, r) for p, r in zip(prompts, replies)]
    identity = [MODEL_NAME.lower() in r.lower() for it, r in zip(items, replies) if it.get("category") == "identity"]
    # The rule: another item's real reply (the next one), as for the continuation task.
    other = refs[1:] + refs[:1] if len(refs) > 1 else refs
    return {
        "n": len(items),
        "leak": {**_rate([k is not None for k in kinds]),
                 "by_kind": {k: kinds.count(k) for k in ("segmented_echo", "sentiment_label", "entity_list")}},
        "identity": _rate(identity),
        "char_f1": _mean([char_f1(g, r) for g, r in zip(refs, replies)]),
        "rouge_l": _mean([rouge_l_f1(g, r) for g, r in zip(refs, replies)]),
        "baseline": {"char_f1": _mean([char_f1(g, r) for g, r in zip(refs, other)]),
                     "rouge_l": _mean([rouge_l_f1(g, r) for g, r in zip(refs, other)])},
    }
