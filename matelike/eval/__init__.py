"""`matelike eval --model DIR`: demo task scores, held-out loss / bits per byte, C-Eval style multiple choice.

Any saved model directory works (pretrain-only, SFT, DPO), and every model is asked the same way, so the
numbers compare across stages:

- Tasks (`tasks_test.jsonl`: `{task, prompt, answer}`): each prompt goes in as a user turn of the chat template
  (`--prompt-format plain` feeds the bare prompt and a newline instead), answers come from batched greedy
  decoding and are scored by `matelike.eval.scoring.score_task`. The answer budget is 1.5x the gold answer's token
  count plus 8 tokens, cut per item after decoding, so an item's budget does not depend on its batch mates.
  `baselines` holds what a rule with no model scores on the same items (`tasks.trivial_answers`: the majority
  label, every character a word, `无`, another item's continuation): the floor to read each score against.
  `classical` (on by default with `--data`) holds what classical tools score on them (`matelike.eval.classical`:
  naive Bayes sentiment trained on the SFT reviews, jieba segmentation and entities), in the same shape.
  `constrained` (on by default) holds the tasks whose answers have a fixed shape answered again with the
  answer held to it (`matelike.model.constraints`): a segmentation answer must spell the sentence with spaces
  between characters, so the model decides only where words end; an entity answer must be `无` or the answer
  format with every name a span of the sentence. The rule's and the classical tools' answers always have
  these shapes.
- Held-out loss (`--val FILE`, pretraining jsonl): documents joined with `<|endoftext|>` as in packing, with one
  more in front so that every text token is predicted (and every byte counted), cut into windows of the model's
  context; every token after the first is predicted exactly once. `loss` is
  the mean cross-entropy in nats over all predicted tokens (separators included, as in training); `bpb` is the
  cross-entropy of the text tokens in bits divided by the UTF-8 bytes of the text, which compares models with
  different tokenizers.
- Multiple choice (`--ceval FILE.csv...`, columns question, A, B, C, D, answer): the question and options are
  shown with `答案：`, and the model picks the letter with the highest log-likelihood as the next tokens.
  Accuracy per file; bad rows are reported as FILE:LINE and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from matelike.data.records import BadRecord, BadRecordReport, DataFileError, iter_records
from matelike.data.sft import IGNORE_INDEX
from matelike.device import add_device_args
from matelike.eval.classical import INSTALL_HINT, JIEBA_TASKS, classical_baselines, load_jieba
from matelike.eval.intervals import task_metrics
from matelike.eval.scoring import MAIN_METRIC, TASKS, trivial_answers
from matelike.sampling import GREEDY

if TYPE_CHECKING:
    from matelike.cli import CommandTable
    from matelike.model.constraints import Constraint
    from matelike.tokenizer import Tokenizer

PROMPT_FORMATS = ("chat", "plain")
# Tasks whose answers have a shape constrained decoding can hold them to (`answer_constraints`), and what the
# shape holds, as the report's rows say it.
CONSTRAINED_TASKS = {"segmentation": "answer held to the sentence's characters",
                     "entities": "names held to spans of the sentence"}
CHOICES = ("A", "B", "C", "D")
MC_INSTRUCTION = "以下是单项选择题，请选出其中的正确答案。"


class EvalError(Exception):
    """A problem with the evaluation's inputs as a whole (exit code 2)."""


# ---------------------------------------------------------------------------------------------- prompts


def encode_prompt(tokenizer: "Tokenizer", prompt: str, prompt_format: str) -> list[int]:
    """Token ids that ask `prompt`: a chat user turn plus the assistant header, or the bare text and a newline."""
    if prompt_format == "chat":
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    if prompt_format == "plain":
        return tokenizer.encode(prompt + "\n")
    raise ValueError(f"unknown prompt format {prompt_format!r} (expected chat or plain)")


def _context_len(model: Any) -> int:
    return int(model.config.max_seq_len)


# ---------------------------------------------------------------------------------------------- tasks


def load_task_items(path: str | Path, tasks: Sequence[str], limit: int | None,
                    report: BadRecordReport) -> dict[str, list[dict[str, str]]]:
    """The first `limit` items of each task in `tasks` from a `{task, prompt, answer}` file, in file order."""
    items: dict[str, list[dict[str, str]]] = {t: [] for t in tasks}
    for line, rec in iter_records(path):
        if isinstance(rec, BadRecord):
            report.add(rec)
            continue
        problem = None
        for key in ("task", "prompt", "answer"):
            if key not in rec or rec[key] is None:
                problem = f"missing field: {key!r}"
            elif not isinstance(rec[key], str):
                problem = f"wrong type: field {key!r} is not a string"
            elif key != "answer" and not rec[key].strip():
                problem = f"empty text: field {key!r}"
            if problem:
                break
        if problem is None and rec["task"] not in TASKS:
            problem = f"unknown task: {rec['task']!r} (expected one of {', '.join(TASKS)})"
        if problem:
            report.add(BadRecord(str(path), line, problem))
            continue
        bucket = items.get(rec["task"])
        if bucket is not None and (limit is None or len(bucket) < limit):
            row = {"prompt": rec["prompt"], "answer": rec["answer"]}
            if isinstance(rec.get("input"), str):  # the bare text (the demo's files have it): what classical tools read
                row["input"] = rec["input"]
            bucket.append(row)
    return items


def answer_budget(tokenizer: "Tokenizer", gold: str) -> int:
    """New tokens allowed for an answer: 1.5x the gold answer's tokens plus 8."""
    return math.ceil(1.5 * len(tokenizer.encode(gold))) + 8


def generate_answers(model: Any, tokenizer: "Tokenizer", prompts: Sequence[list[int]], budgets: Sequence[int],
                     *, batch_size: int = 32, progress: Callable[[int], None] | None = None,
                     constraints: Sequence["Constraint | None"] | None = None) -> list[str]:
    """Greedy answers (decoded text, special tokens dropped, stripped) for token-id prompts.

    One batched engine (matelike.model.generation) decodes `batch_size` prompts at a time, each to its own budget;
    an answer that ends frees its slot for the next prompt. A prompt longer than the context minus its budget
    keeps its end (where the question and answer header are). `constraints`: one per prompt (or None), the
    shape its answer must have.
    """
    from matelike.model.generation import GenerationRequest, default_stop_ids, generate_requests

    ctx = _context_len(model)
    stop = default_stop_ids(tokenizer)
    constraints = constraints if constraints is not None else [None] * len(prompts)
    requests = []
    for ids, budget, constraint in zip(prompts, budgets, constraints):
        budget = min(budget, ctx - 1)
        requests.append(GenerationRequest(list(ids)[-(ctx - budget):], budget, GREEDY, stop, constraint))
    new = generate_requests(model, requests, max_batch=batch_size, progress=progress)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


def answer_constraint(task: str | None, row: dict[str, Any], tokenizer: "Tokenizer") -> "Constraint | None":
    """The shape an item's answer must have under constrained decoding, or None when `task` has none or the
    item's text is not known (its `input` field, else recovered from its `prompt` string): segmentation
    answers spell the text with spaces between words (`SpacedCopy`), entity answers list spans of it in the
    answer format (`EntityList`). `matelike rl --constrained` samples its rollouts under the same shapes."""
    if task not in CONSTRAINED_TASKS:
        return None
    from matelike.eval.scoring import prompt_input
    from matelike.model.constraints import EntityList, SpacedCopy, TokenTrie

    text = row.get("input")
    if not isinstance(text, str):
        prompt = row.get("prompt")
        text = prompt_input(task, prompt) if isinstance(prompt, str) else None
    if text is None:
        return None
    try:
        trie = TokenTrie.for_tokenizer(tokenizer)
    except ValueError:  # not byte-level BPE: its tokens' bytes are unknown, so nothing can be held to a shape
        return None
    grammar = SpacedCopy if task == "segmentation" else EntityList
    return grammar(trie, text)


def answer_constraints(task: str, rows: Sequence[dict[str, str]],
                       tokenizer: "Tokenizer") -> list["Constraint"] | None:
    """`answer_constraint` of every item, or None when one has none (the task is then scored free only)."""
    shapes = [answer_constraint(task, r, tokenizer) for r in rows]
    return None if any(c is None for c in shapes) else shapes  # type: ignore[return-value]


@dataclass
class TaskScores:
    """What `evaluate_tasks` returns: metrics per task, the predictions, and the constrained answers' metrics."""

    metrics: dict[str, dict[str, float | int]]
    predictions: list[dict[str, str]]
    constrained: dict[str, dict[str, float | int]]


def evaluate_tasks(model: Any, tokenizer: "Tokenizer", items: dict[str, list[dict[str, str]]], *,
                   prompt_format: str = "chat", batch_size: int = 32, progress: bool = False,
                   constrained: bool = False) -> TaskScores:
    """Metrics per task and the predictions for the loaded test items; `progress` shows a bar per task on
    stderr. `constrained`: the tasks of CONSTRAINED_TASKS are answered a second time under their constraint
    (`answer_constraints`), their predictions marked `"kind": "constrained"`."""
    from tqdm import tqdm

    out = TaskScores({}, [], {})
    for task, rows in items.items():
        prompts = [encode_prompt(tokenizer, r["prompt"], prompt_format) for r in rows]
        budgets = [answer_budget(tokenizer, r["answer"]) for r in rows]
        runs: list[tuple[str | None, Any]] = [(None, None)]
        if constrained:
            shapes = answer_constraints(task, rows, tokenizer)
            if shapes is not None:
                runs.append(("constrained", shapes))
        for kind, shapes in runs:
            desc = f"eval {task}" + (f" ({kind})" if kind else "")
            with tqdm(total=len(rows), desc=desc, unit="item", disable=not progress, leave=False) as bar:
                preds = generate_answers(model, tokenizer, prompts, budgets, batch_size=batch_size,
                                         progress=bar.update, constraints=shapes)
            (out.constrained if kind else out.metrics)[task] = task_metrics(task, [r["answer"] for r in rows], preds)
            out.predictions += [{"task": task, "prompt": r["prompt"], "answer": r["answer"], "prediction": p,
                                 **({"kind": kind} if kind else {})} for r, p in zip(rows, preds)]
    return out


def evaluate_chat(model: Any, tokenizer: "Tokenizer", path: str | Path, report: BadRecordReport, *,
                  limit: int | None = None, batch_size: int = 32) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Chat metrics (matelike.eval.chat) and the replies, for a chat test file."""
    from matelike.eval.chat import load_chat_items, score_open

    items = load_chat_items(str(path), report, limit)
    if not items:
        raise EvalError(f"{path}: no chat test items")
    prompts = [tokenizer.encode_chat(it["messages"], add_generation_prompt=True)[0] for it in items]
    budgets = [answer_budget(tokenizer, it.get("reference", it.get("answer", ""))) for it in items]
    replies = generate_answers(model, tokenizer, prompts, budgets, batch_size=batch_size)
    open_items = [(it, r) for it, r in zip(items, replies) if it["kind"] == "open"]
    out: dict[str, Any] = {}
    if open_items:
        out["open"] = score_open([it for it, _ in open_items], [r for _, r in open_items])
    later: dict[str, Any] = {}
    for task in TASKS:
        rows = [(it, r) for it, r in zip(items, replies) if it["kind"] == "task" and it["task"] == task]
        if rows:
            golds, preds = [it["answer"] for it, _ in rows], [r for _, r in rows]
            later[task] = task_metrics(task, golds, preds)
    if later:
        out["later_turn_tasks"] = later
    predictions = [{"task": "chat" if it["kind"] == "open" else it["task"], "kind": it["kind"],
                    "category": it.get("category"), "messages": it["messages"],
                    "answer": it.get("reference", it.get("answer")), "prediction": r}
                   for it, r in zip(items, replies)]
    return out, predictions


def trivial_baselines(items: dict[str, list[dict[str, str]]]) -> dict[str, dict[str, float | int]]:
    """Scores of `tasks.trivial_answers` on the same test items: the floor each task's score is read against."""
    out: dict[str, dict[str, float | int]] = {}
    for task, rows in items.items():
        golds = [r["answer"] for r in rows]
        answers = trivial_answers(task, golds)
        if answers is not None:
            out[task] = task_metrics(task, golds, answers)
    return out


# ---------------------------------------------------------------------------------------------- held-out loss


def heldout_loss(model: Any, tokenizer: "Tokenizer", path: str | Path, report: BadRecordReport, *,
                 field: str = "text", batch_size: int = 8, max_tokens: int | None = None) -> dict[str, Any]:
    """Mean cross-entropy (nats/token) and bits per UTF-8 byte of the documents in a pretraining file.

    With `max_tokens`, whole documents are read until the stream holds at least that many tokens.
    """
    import torch

    from matelike.data.formats import RecordError, pretrain_text
    from matelike.eval.heldout import heldout_nll

    eos = tokenizer.eos_id
    special = set(getattr(tokenizer, "special_ids", None) or [eos])
    stream: list[int] = []
    n_bytes = docs = 0
    for line, rec in iter_records(path):
        if isinstance(rec, BadRecord):
            report.add(rec)
            continue
        try:
            text = pretrain_text(rec, field)
        except RecordError as e:
            report.add(BadRecord(str(path), line, e.reason))
            continue
        stream.append(eos)
        stream += tokenizer.encode(text)
        n_bytes += len(text.encode("utf-8"))
        docs += 1
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if docs == 0:
        raise EvalError(f"{path}: no usable documents for the held-out loss")
    ids = torch.tensor(stream, dtype=torch.long)
    T = _context_len(model)
    starts = list(range(0, len(stream) - 1, T))

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for b in range(0, len(starts), batch_size):
            windows = starts[b:b + batch_size]
            x = torch.zeros(len(windows), T, dtype=torch.long)
            y = torch.full((len(windows), T), IGNORE_INDEX, dtype=torch.long)
            for r, s in enumerate(windows):
                chunk = ids[s:s + T + 1]
                x[r, :len(chunk) - 1] = chunk[:-1]
                y[r, :len(chunk) - 1] = chunk[1:]
            yield {"input_ids": x, "targets": y}

    sums = heldout_nll(model, batches(), exclude_ids=sorted(special))
    return {"file": str(path), "docs": docs, "tokens": sums.tokens, "bytes": n_bytes,
            "loss": sums.mean, "bpb": sums.text_nats / math.log(2) / n_bytes}


# ---------------------------------------------------------------------------------------------- multiple choice


def mc_prompt(row: dict[str, str]) -> str:
    """The question text shown for one C-Eval row (the model answers with a letter)."""
    options = "\n".join(f"{c}. {row[c].strip()}" for c in CHOICES)
    return f"{MC_INSTRUCTION}\n\n{row['question'].strip()}\n{options}\n答案："


def load_mc_rows(path: str | Path, report: BadRecordReport) -> list[dict[str, str]]:
    """Usable rows of a C-Eval layout CSV; bad rows go to `report` as FILE:LINE: reason."""
    rows: list[dict[str, str]] = []
    required = ("question", *CHOICES, "answer")
    checked_header = False
    for line, rec in iter_records(path):
        if isinstance(rec, BadRecord):
            report.add(rec)
            continue
        if not checked_header:
            missing = [c for c in required if c not in rec]
            if missing:
                raise DataFileError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)} "
                                    f"(C-Eval layout: question, A, B, C, D, answer)")
            checked_header = True
        if not (rec["question"] or "").strip():
            report.add(BadRecord(str(path), line, "empty text: field 'question'"))
            continue
        answer = (rec["answer"] or "").strip().upper()
        if answer not in CHOICES:
            report.add(BadRecord(str(path), line, f"bad answer: {rec['answer']!r} (expected one of A, B, C, D)"))
            continue
        rows.append({**{k: rec[k] or "" for k in required}, "answer": answer})
    return rows


def choice_logprobs(model: Any, tokenizer: "Tokenizer", prompt_ids: Sequence[int],
                    choices: Sequence[str] = CHOICES) -> list[float]:
    """log P(choice tokens | prompt) for each choice: one forward over the prompt+choice rows."""
    import torch
    import torch.nn.functional as F

    ctx = _context_len(model)
    conts = [tokenizer.encode(c) for c in choices]
    longest = max(len(c) for c in conts)
    prompt = list(prompt_ids)[-(ctx - longest):]
    seqs = [prompt + c for c in conts]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    # Right padding: causal attention means the padded tail never influences the scored positions.
    x = torch.full((len(seqs), width), tokenizer.eos_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = torch.tensor(s, dtype=torch.long)
    with torch.inference_mode():
        logp = F.log_softmax(model(x.to(device)).logits.float(), dim=-1).cpu()
    scores = []
    for r, c in enumerate(conts):
        p = len(prompt)
        scores.append(float(sum(logp[r, p - 1 + j, tok] for j, tok in enumerate(c))))
    return scores


def evaluate_mc(model: Any, tokenizer: "Tokenizer", path: str | Path, report: BadRecordReport, *,
                prompt_format: str = "chat", limit: int | None = None) -> dict[str, Any]:
    """Accuracy of letter choice by log-likelihood on one C-Eval layout CSV."""
    before = report.by_file.get(str(path), 0)
    rows = load_mc_rows(path, report)
    if limit is not None:
        rows = rows[:limit]
    correct = 0
    for row in rows:
        scores = choice_logprobs(model, tokenizer, encode_prompt(tokenizer, mc_prompt(row), prompt_format))
        pick = CHOICES[max(range(len(CHOICES)), key=lambda i: scores[i])]
        correct += pick == row["answer"]
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0,
            "bad": report.by_file.get(str(path), 0) - before}


# ---------------------------------------------------------------------------------------------- command


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _reference(ref: dict[str, Any], key: str, main: bool) -> str:
    """A reference's (rule or classical baseline) value of `key` and, for the main metric, its interval."""
    value = f"{ref[key]:>9.4f}" if isinstance(ref.get(key), (int, float)) else f"{'-':>9}"
    return f"{value} {_ci(ref.get('ci95')) if main else '':>13}"


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: one line per metric, the 95% interval next to each task's main metric, beside the
    rule baselines and (when computed) the classical tools' scores on the same items."""
    classical = result.get("classical") or {}
    pad = f" {'-':>9} {'':>13}" if classical else ""  # rows with no classical tool keep the n column aligned
    lines = [f"{'what':<28} {'metric':<10} {'value':>9} {'95% CI':>13} {'baseline':>9} {'95% CI':>13}"
             + (f" {'classical':>9} {'95% CI':>13}" if classical else "") + "  n"]
    for task, m in result.get("tasks", {}).items():
        refs = [result.get("baselines", {}).get(task, {})] + ([classical.get(task, {})] if classical else [])
        for key, value in m.items():
            if key in ("n", "ci95"):
                continue
            main = key == MAIN_METRIC.get(task)
            ci = _ci(m.get("ci95")) if main else ""
            cells = " ".join(_reference(ref, key, main) for ref in refs)
            lines.append(f"{task:<28} {key:<10} {value:>9.4f} {ci:>13} {cells}  {m['n']}{' *' if main else ''}")
    for task, m in result.get("constrained", {}).items():
        # The rule's and the classical tools' answers already have the shape: the same references apply.
        refs = [result.get("baselines", {}).get(task, {})] + ([classical.get(task, {})] if classical else [])
        key = MAIN_METRIC[task]
        cells = " ".join(_reference(ref, key, True) for ref in refs)
        lines.append(f"{task + ' (constrained)':<28} {key:<10} {m[key]:>9.4f} {_ci(m.get('ci95')):>13} {cells}  "
                     f"{m['n']}")
    chat = result.get("chat", {})
    if "open" in chat:
        o = chat["open"]
        lines.append(f"{'chat (open prompts)':<28} {'leak':<10} {o['leak']['rate']:>9.4f} {_ci(o['leak']['ci95']):>13}"
                     f" {'-':>9} {'':>13}{pad}  {o['n']}")
        if o["identity"]["n"]:  # a chat file without identity questions (the demo's dev split) has no such rate
            lines.append(f"{'chat (identity questions)':<28} {'named':<10} {o['identity']['rate']:>9.4f} "
                         f"{_ci(o['identity']['ci95']):>13} {'-':>9} {'':>13}{pad}  {o['identity']['n']}")
        for key in ("char_f1", "rouge_l"):
            b = o["baseline"][key]
            lines.append(f"{'chat (open prompts)':<28} {key:<10} {o[key]['mean']:>9.4f} {_ci(o[key]['ci95']):>13} "
                         f"{b['mean']:>9.4f} {_ci(b['ci95']):>13}{pad}  {o['n']}")
    for task, m in chat.get("later_turn_tasks", {}).items():
        key = MAIN_METRIC[task]
        lines.append(f"{task + ' (later turn)':<28} {key:<10} {m[key]:>9.4f} {_ci(m['ci95']):>13} {'-':>9} {'':>13}"
                     f"{pad}  {m['n']}")
    if "val" in result:
        v = result["val"]
        lines.append(f"{'held-out text':<28} {'loss':<10} {v['loss']:>9.4f}  {v['tokens']} tokens")
        lines.append(f"{'held-out text':<28} {'bpb':<10} {v['bpb']:>9.4f}  {v['bytes']} bytes")
    for path, m in result.get("ceval", {}).items():
        lines.append(f"{Path(path).name[:28]:<28} {'accuracy':<10} {m['accuracy']:>9.4f}  {m['n']}")
    return "\n".join(lines)


def run_eval(model_dir: str | Path, *, tasks_file: str | Path | None = None, tasks: Sequence[str] = TASKS,
             limit: int | None = None, val: str | Path | None = None, ceval: Sequence[str | Path] = (),
             prompt_format: str = "chat", batch_size: int = 32, device: str = "cpu", dtype: str | None = None,
             quantize: str = "none", val_max_tokens: int | None = None, report: BadRecordReport | None = None,
             chat_file: str | Path | None = None, chat_limit: int | None = None,
             progress: bool = False, classical: bool = False, classical_reviews: str | Path | None = None,
             notes: list[str] | None = None, constrained: bool = True) -> dict[str, Any]:
    """Everything `matelike eval` computes, as the JSON-ready dict.

    `classical`: also score the classical tools (`matelike.eval.classical`) on the task items, the naive Bayes
    trained on `classical_reviews`; what they cannot score (jieba missing, no reviews) is left out, with a
    one-line reason appended to `notes`. `constrained`: also score the tasks that have an answer shape
    (CONSTRAINED_TASKS) with the answers held to it, under `result["constrained"]`.
    """
    import torch

    from matelike.model.io import load_model

    report = report if report is not None else BadRecordReport()
    t0 = time.time()
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    if tokenizer is None:
        raise EvalError(f"{model_dir}: the model directory has no tokenizer.json")
    result: dict[str, Any] = {"model": str(model_dir), "prompt_format": prompt_format}
    if quantize != "none":  # the figures are the quantized model's
        result["quantize"] = quantize
    with torch.inference_mode():
        if tasks_file is not None and tasks:
            items = load_task_items(tasks_file, tasks, limit, report)
            empty = [t for t, rows in items.items() if not rows]
            if empty:
                raise EvalError(f"{tasks_file}: no test items for task(s) {', '.join(empty)}")
            scores = evaluate_tasks(model, tokenizer, items, prompt_format=prompt_format, batch_size=batch_size,
                                    progress=progress, constrained=constrained)
            result["tasks"], result["predictions"] = scores.metrics, scores.predictions
            if scores.constrained:
                result["constrained"] = scores.constrained
            result["baselines"] = trivial_baselines(items)
            if classical:
                section, why = classical_baselines(items, reviews=classical_reviews, report=report,
                                                   jieba=load_jieba())
                if section:
                    result["classical"] = section
                if notes is not None:
                    notes.extend(why)
        if chat_file is not None:
            result["chat"], chat_predictions = evaluate_chat(model, tokenizer, chat_file, report, limit=chat_limit,
                                                             batch_size=batch_size)
            result.setdefault("predictions", []).extend(chat_predictions)
        if val is not None:
            result["val"] = heldout_loss(model, tokenizer, val, report, max_tokens=val_max_tokens)
        if ceval:
            result["ceval"] = {str(p): evaluate_mc(model, tokenizer, p, report, prompt_format=prompt_format,
                                                   limit=limit) for p in ceval}
    result["bad_records"] = report.total
    result["seconds"] = round(time.time() - t0, 2)
    return result


def _parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    tasks_file = args.tasks_file
    val = args.val
    chat_file = args.chat_file
    if args.data is not None:
        data = Path(args.data)
        tasks_file = tasks_file or data / f"tasks_{args.split}.jsonl"
        val = val or data / "pretrain_val.jsonl"
        if chat_file is None and (data / f"chat_{args.split}.jsonl").is_file():
            chat_file = data / f"chat_{args.split}.jsonl"
    if tasks_file is None and val is None and chat_file is None and not args.ceval:
        print("error: nothing to evaluate: give --data DIR, --tasks-file, --val or --ceval", file=sys.stderr)
        return 2
    reviews = args.classical_reviews
    if reviews is None and args.data is not None and (Path(args.data) / "sft.jsonl").is_file():
        reviews = Path(args.data) / "sft.jsonl"
    # On by default with --data (the demo layout, where the reviews are) or a reviews file given.
    classical = args.classical if args.classical is not None else reviews is not None or args.data is not None
    need_jieba = [t for t in args.tasks if t in JIEBA_TASKS]
    if args.classical and need_jieba and load_jieba() is None:  # asked for explicitly: not a silent no
        print(f"error: --classical needs jieba for {' and '.join(need_jieba)}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from matelike.model.io import ModelDirError

    report = BadRecordReport()
    notes: list[str] = []
    try:
        result = run_eval(args.model, tasks_file=tasks_file, tasks=args.tasks, limit=args.limit, val=val,
                          ceval=args.ceval or (), prompt_format=args.prompt_format, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype, quantize=args.quantize,
                          val_max_tokens=args.val_max_tokens, report=report,
                          chat_file=chat_file, chat_limit=args.chat_limit,
                          progress=not args.quiet and sys.stderr.isatty(), classical=classical,
                          classical_reviews=reviews, notes=notes, constrained=args.constrained)
    except (EvalError, DataFileError, ModelDirError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    predictions = result.pop("predictions", [])
    print(format_table(result))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if report.total:
        print(report.summary(), file=sys.stderr)
    if args.predictions:
        Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
        with open(args.predictions, "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result["samples"] = {t: next((p for p in predictions if p["task"] == t), None) for t in result.get("tasks", {})}
        out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.command("eval", "score a model directory: demo tasks, held-out loss / bits per byte, C-Eval CSVs",
                      _cmd_eval)
    p.add_argument("--model", required=True, help="model directory (any saved stage)")
    p.add_argument("--data", help="demo data directory: uses its tasks_SPLIT.jsonl, chat_SPLIT.jsonl and "
                                  "pretrain_val.jsonl")
    p.add_argument("--split", choices=("test", "dev"), default="test",
                   help="with --data: the held-out test files (default; report these) or the development files "
                        "(tune on these)")
    p.add_argument("--tasks-file", help="test items, jsonl with task, prompt, answer")
    p.add_argument("--tasks", type=_parse_tasks, default=list(TASKS),
                   help=f"comma-separated tasks to score (default: {','.join(TASKS)})")
    p.add_argument("--limit", type=_positive, help="score only the first N items of each task / C-Eval file")
    p.add_argument("--val", help="pretraining validation jsonl for held-out loss and bits per byte")
    p.add_argument("--chat-file", help="held-out conversations (chat_test.jsonl layout): leak rate, identity, "
                                       "reply overlap, tasks asked in a later turn")
    p.add_argument("--chat-limit", type=_positive, help="score only the first N open prompts and N later-turn tasks")
    p.add_argument("--val-max-tokens", type=_positive, help="read whole documents up to about this many tokens")
    p.add_argument("--ceval", nargs="+", help="C-Eval layout CSV files (question, A, B, C, D, answer)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat",
                   help="ask as a chat user turn (default) or as bare text")
    p.add_argument("--classical", action=argparse.BooleanOptionalAction, default=None,
                   help="also score classical tools on the same task items, beside the rule baselines: a naive "
                        "Bayes on character uni+bigrams trained on the SFT file's labelled reviews (sentiment), "
                        "jieba's segmentation and its nr/ns/nt part-of-speech tags (entities). On by default with "
                        "--data or --classical-reviews, because they take seconds and are what a model's figures "
                        "are read against; a tool that cannot run there (jieba not installed: pip install "
                        "'matelike[classical]') is left out with a note. --classical asks for them in any case "
                        "(and fails without jieba), --no-classical skips them")
    p.add_argument("--classical-reviews", metavar="FILE",
                   help="SFT file whose labelled reviews train the classical sentiment baseline (default: "
                        "DATA/sft.jsonl)")
    p.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=True,
                   help="also answer the tasks whose answers have a fixed shape with the answer held to it and "
                        "score them apart (default on): segmentation answers must spell the sentence, character "
                        "for character, with spaces only between characters, so the figure measures where the "
                        "model puts word boundaries, not how well it copies; entity answers must name spans of "
                        "the sentence in the answer format")
    p.add_argument("--batch-size", type=_positive, default=32, help="prompts generated together")
    add_device_args(p)
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--predictions", help="write every task answer as jsonl here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
