"""Rewards for RL: the demo tasks' verifiable rewards, with guards against the hacks they invite, and users'
reward functions.

A reward function follows TRL's `reward_funcs` convention:

    def reward(prompts: list, completions: list[str], **fields) -> list[float | None]

`prompts` are the records' prompts as written (a string or a message list), `completions` the decoded answers,
and `fields` every other field of the records as one list per name (None where a record lacks it), plus
`completion_ids` (the answer's token ids, stop token excluded). A None says "this reward does not apply to
this completion". `--reward task mymodule:myfunc --reward-weights 1 0.5` sums the rewards with weights,
skipping Nones; a completion no reward applies to gets 0.

`task_reward` (`--reward task`) scores each record by its `task` against its `answer`, shaped so that the cheap
answers that score well under the plain per-item metric earn nothing (measured on the demo's training items):

- entities: `无` for every item scores 0.52 per item under the per-item metric (about half the items have no
  entity) but 0.00 under the eval's micro-F1. Here each correct entity earns 2 - f and each false positive
  costs f, with f = ENTITY_F1 (0.5, about the SFT model's F1): the linear form of micro-F1 (Dinkelbach: the
  answers that maximise the sum of 2·correct - f·predicted are those of best F1 when f is that F1), so the
  weights are the eval's. `无` earns 0 everywhere and finding an entity earns more; an answer that names no
  entity and does not say `无` costs as much as one false positive, so the format is not dropped.
- continuation: copying the prompt's opening scores ROUGE-L 0.154, above every model and the rule baseline
  (0.088). The reward is ROUGE-L minus the share of the answer's characters copied from the prompt in runs of
  COPY_RUN characters or more (ordinary news text shares single characters and short words with the prompt,
  rarely longer runs).
- sentiment: 1 only for an answer that is exactly the gold label (trailing punctuation and spaces aside); a
  longer answer or one hedging both labels earns 0, so the first-label-found rule of the eval cannot be gamed.
- segmentation: the item's word F1 (spans over the unspaced text: adding or dropping characters costs).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

from matelike.eval.scoring import (
    NEGATIVE,
    NO_ENTITY,
    POSITIVE,
    TASKS,
    parse_entities,
    rouge_l_f1,
    score_item,
)

RewardFn = Callable[..., Sequence["float | None"]]

ENTITY_F1 = 0.5  # the F1 the entity reward's weights are set for (see the module docstring)
COPY_RUN = 5  # characters in a row shared with the prompt that count as copying
_TRAILING = " \t\r\n。.！!"


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: the string itself, or the last user turn of a message list."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for m in reversed(prompt):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    return ""


def sentiment_reward(gold: str, answer: str) -> float:
    """1 when the answer is exactly the gold label (`正面`/`负面`), else 0 (longer, hedging or wrong)."""
    label = gold.strip().strip(_TRAILING)
    return float(label in (POSITIVE, NEGATIVE) and answer.strip().strip(_TRAILING) == label)


def entity_reward(gold: str, answer: str, f1: float = ENTITY_F1) -> float:
    """(2 - f)·correct - f·false positives; an answer naming nothing without saying `无` counts as one false
    positive. Missed entities cost nothing directly: within a group they are the correct ones not earned."""
    gold_set, pred = parse_entities(gold), parse_entities(answer)
    if not pred and answer.strip().strip(_TRAILING) != NO_ENTITY:
        return -f1
    correct = len(gold_set & pred)
    return (2 - f1) * correct - f1 * (len(pred) - correct)


def copied_fraction(prompt: str, answer: str, run: int = COPY_RUN) -> float:
    """Share of the answer's characters (whitespace ignored) inside a run of >= `run` characters that also
    appears, contiguous, in the prompt."""
    text = "".join(answer.split())
    source = "".join(prompt.split())
    if not text:
        return 0.0
    covered = [False] * len(text)
    i = 0
    while i + run <= len(text):
        if text[i:i + run] in source:
            j = i + run
            while j < len(text) and text[i:j + 1] in source:
                j += 1
            for k in range(i, j):
                covered[k] = True
            i = j
        else:
            i += 1
    return sum(covered) / len(text)


def continuation_reward(gold: str, answer: str, prompt: str) -> float:
    """ROUGE-L against the gold continuation minus the share of the answer copied from the prompt."""
    return rouge_l_f1(gold, answer) - copied_fraction(prompt, answer)


def task_reward(prompts: Sequence[Any], completions: Sequence[str], task: Sequence[Any] | None = None,
                answer: Sequence[Any] | None = None, **_: Any) -> list[float | None]:
    """The demo tasks' reward per completion, by each record's `task` and gold `answer` (None for a record
    without them)."""
    tasks = task if task is not None else [None] * len(completions)
    golds = answer if answer is not None else [None] * len(completions)
    out: list[float | None] = []
    for prompt, pred, t, gold in zip(prompts, completions, tasks, golds):
        if t not in TASKS or not isinstance(gold, str):
            out.append(None)
        elif t == "sentiment":
            out.append(sentiment_reward(gold, pred))
        elif t == "entities":
            out.append(entity_reward(gold, pred))
        elif t == "continuation":
            out.append(continuation_reward(gold, pred, prompt_text(prompt)))
        else:
            out.append(score_item(t, gold, pred))
    return out


def check_task_record(fields: Mapping[str, Any]) -> str | None:
    """Why a record is malformed for `--reward task` (None when it is not). A record of a task without a
    scorer (the demo's `chat` prompts) is well formed: the task reward gives it None."""
    t = fields.get("task")
    if t is None:
        return "missing field: 'task' (--reward task scores each record by its task)"
    if not isinstance(t, str):
        return f"bad field: 'task' must be a string, got {t!r}"
    if t in TASKS and not isinstance(fields.get("answer"), str):
        return "missing field: 'answer' (a string: the gold answer the task reward compares with)"
    return None


def load_reward(spec: str) -> RewardFn:
    """`task`, or `module:function` for an importable module's function; ValueError saying what is wrong."""
    if spec == "task":
        return task_reward
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--reward {spec!r}: expected `task` or `module:function`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {module_name} has no function {name!r}")
    return fn


def reward_name(fn: RewardFn, spec: str | None = None) -> str:
    """A short name for metrics: `task`, or the function's name."""
    if spec == "task" or fn is task_reward:
        return "task"
    return getattr(fn, "__name__", None) or (spec or "reward").rpartition(":")[2]


def combine_rewards(
    fns: Sequence[RewardFn], weights: Sequence[float], prompts: Sequence[Any], completions: Sequence[str],
    fields: Sequence[Mapping[str, Any]], completion_ids: Sequence[Sequence[int]],
) -> tuple[list[float], list[list[float | None]]]:
    """(weighted sum per completion, each function's values) over one batch of completions.

    Each function is called once for the whole batch (not per sample), after generation and before any
    training forward, so no activations are held meanwhile. A wrong length or a non-finite value is an error
    naming the function.
    """
    if len(fns) != len(weights):
        raise ValueError(f"{len(fns)} rewards but {len(weights)} weights")
    names = sorted({k for f in fields for k in f})
    columns = {k: [f.get(k) for f in fields] for k in names if k != "completion_ids"}
    per_fn: list[list[float | None]] = []
    for fn in fns:
        kwargs = dict(columns, completion_ids=[list(c) for c in completion_ids])
        if not _takes_var_keywords(fn):
            params = inspect.signature(fn).parameters
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        values = list(fn(list(prompts), list(completions), **kwargs))
        if len(values) != len(completions):
            raise ValueError(f"reward {reward_name(fn)} returned {len(values)} values for {len(completions)} "
                             f"completions")
        for v in values:
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"reward {reward_name(fn)} returned {v!r}: expected a finite number or None")
        per_fn.append([None if v is None else float(v) for v in values])
    total = []
    for i in range(len(completions)):
        parts = [w * vals[i] for w, vals in zip(weights, per_fn) if vals[i] is not None]
        total.append(float(sum(parts)) if parts else 0.0)
    return total, per_fn


def _takes_var_keywords(fn: Callable) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        return True


def hack_references(prompts: Sequence[Any], fields: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The task reward that the known cheap answers earn on these items, to print beside the learned reward:
    always `无` on the entity items, the prompt's own text on the continuation items, and the per-item metric
    the unguarded reward would have given them. One pass over `fields`; a prompt is read only for a
    continuation item (a packed set decodes it from the file)."""
    # sums: guarded and unguarded reward, and items, per hack
    ent, ent_plain, n_ent, cont, cont_plain, n_cont = 0.0, 0.0, 0, 0.0, 0.0, 0
    for i, f in enumerate(fields):
        task, gold = f.get("task"), f.get("answer")
        if not isinstance(gold, str):
            continue
        if task == "entities":
            ent += entity_reward(gold, NO_ENTITY)
            ent_plain += score_item("entities", gold, NO_ENTITY)
            n_ent += 1
        elif task == "continuation":
            text = prompt_text(prompts[i])
            cont += continuation_reward(gold, _head(text), text)
            cont_plain += rouge_l_f1(gold, _head(text))
            n_cont += 1
    out: dict[str, float] = {}
    if n_ent:
        out["entities_always_none"] = ent / n_ent
        out["entities_always_none_unguarded"] = ent_plain / n_ent
    if n_cont:
        out["continuation_copy_prompt"] = cont / n_cont
        out["continuation_copy_prompt_unguarded"] = cont_plain / n_cont
    return out


def _head(prompt: str) -> str:
    """The longest line of a prompt: the news text a copying answer repeats (the phrasing is the short part)."""
    return max(prompt.split("\n"), key=len)
