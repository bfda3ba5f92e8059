"""`matelike dpo make-pairs`: preference pairs from the SFT model's own answers.

For every prompt that has a gold answer (the demo tasks' `{prompt, answer, task}` training items, any
`{prompt, chosen}` / `{prompt, response}` / alpaca file, or an SFT file of `{messages}` / `{conversations}` whose
last assistant turn is the gold answer) the model samples K answers in batches through the batched engine
(`matelike.model.generation`: a prompt's K samples share one prefill, an answer that stops frees its slot), plus
(by default) its greedy answer: the one chat and eval give at temperature 0, loops and all, so DPO pushes down
the very answers users see. The gold answer is `chosen`; `rejected` is the candidate that the task's scorer (`tasks.score_item`)
rates lowest, provided it rates below the gold answer itself. Prompts with no scorer (open-ended) take the first
candidate that differs from the gold text. Prompts where no candidate is worse (the model is already right) are
counted and skipped.

Resumable. Pairs are appended to OUT after each batch, then a progress file `OUT.progress.json` records how
many prompts are done and OUT's size at that point (written to a temporary file and renamed). A re-run with the
same settings cuts OUT back to the recorded size (dropping a truncated last line or the pairs of a batch whose
progress was never recorded) and carries on from the next prompt. Each batch's sampling seed derives from
--seed and the index of its first prompt, so an interrupted and resumed run writes what an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from matelike.device import add_device_args
from matelike.hashing import sha256_file
from matelike.sampling import GREEDY, SamplingParams, add_sampling_args, sampling_from_args

if TYPE_CHECKING:
    from torch import nn

    from matelike.cli import CommandTable
    from matelike.data.records import BadRecordReport
    from matelike.tokenizer import Tokenizer

GOLD_FIELDS: tuple[str, ...] = ("answer", "chosen", "response")  # first one present is the gold answer
PROGRESS_SUFFIX = ".progress.json"
# Settings that change what a resumed run would write; a progress file made with others is refused.
RESUME_KEYS: tuple[str, ...] = ("model", "data_sha256", "samples", "greedy", "max_new_tokens", "temperature", "top_p",
                                "seed")


class PairsError(RuntimeError):
    """make-pairs cannot start or continue (settings mismatch, foreign output file); exit code 2."""


@dataclass
class PromptItem:
    """One prompt with its gold answer; `task` names a scorer in matelike.eval.scoring, None for open-ended."""

    line: int
    prompt: str | list[dict[str, str]]  # as written in the input, echoed into the pair
    messages: list[dict[str, str]]  # the chat turns the model sees
    gold: str
    task: str | None


@dataclass
class PairCounts:
    """What happened to every prompt; printed as one JSON line and kept in the progress file."""

    prompts: int = 0  # prompts processed (including skipped ones)
    pairs: int = 0
    already_right: int = 0  # no sample scored below the gold answer
    no_answer: int = 0  # every worse sample was empty, nothing usable as `rejected`
    too_long: int = 0  # prompt leaves no room for max_new_tokens in the model's context
    bad: int = 0  # bad input records (reported with FILE:LINE)
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> {pairs, already_right, ...}

    def bump(self, task: str | None, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        per = self.by_task.setdefault(task or "open", {})
        per[what] = per.get(what, 0) + 1


def read_prompt_items(path: str | Path, report: "BadRecordReport", *,
                      max_record_bytes: int | None = None) -> tuple[list[PromptItem], int]:
    """Prompts with gold answers from `path`; bad records go to `report`. Returns (items, records read)."""
    from matelike.data.records import MAX_RECORD_BYTES, ReadCounts, read_converted

    counts = ReadCounts()
    items: list[PromptItem] = []
    for _, line, item in read_converted(path, lambda rec: prompt_item(0, rec), report, counts=counts,
                                        max_record_bytes=max_record_bytes or MAX_RECORD_BYTES):
        item.line = line  # the converter sees only the record
        items.append(item)
    return items, counts.records


def prompt_item(line: int, rec: dict) -> PromptItem:
    """Validate one record; the prompt and gold answer are checked as the SFT conversation they make.

    Reads the layouts `matelike sft` reads: `{prompt, answer|chosen|response}` (prompt a string or messages),
    alpaca `{instruction, input, output}`, and `{messages|conversations: [...]}` whose last (assistant) turn is
    the gold answer and the turns before it the prompt.
    """
    from matelike.data.formats import RecordError, to_messages
    from matelike.eval.scoring import TASKS

    if "prompt" not in rec and "instruction" in rec:
        # alpaca layout (alpaca-gpt4-data-zh): the prompt is the instruction plus its input, gold is `output`
        conv = to_messages(rec, "alpaca")
        return PromptItem(line, conv[-2]["content"], conv[:-1], conv[-1]["content"], None)
    if "prompt" not in rec and ("messages" in rec or "conversations" in rec):
        # the SFT file itself (the demo's sft.jsonl): to_messages checks it ends with an assistant turn
        conv = to_messages(rec, "messages")
        return PromptItem(line, conv[:-1], conv[:-1], conv[-1]["content"], _task(rec, TASKS))
    key = next((k for k in GOLD_FIELDS if rec.get(k) is not None), None)
    if key is None:
        raise RecordError("missing field: expected 'answer', 'chosen' or 'response' (with 'prompt'), "
                          "alpaca 'instruction'+'output', or 'messages'/'conversations'")
    gold = rec[key]
    if isinstance(gold, list) and len(gold) == 1 and isinstance(gold[0], dict):  # [{role: assistant, content}]
        gold = gold[0].get("content")
    if not isinstance(gold, str):
        raise RecordError(f"wrong type: field {key!r} is not a string")
    prompt = rec.get("prompt")
    if prompt is None:
        raise RecordError("missing field: 'prompt'")
    if isinstance(prompt, str):
        conv = to_messages({"prompt": prompt, "response": gold, "system": rec.get("system")}, "prompt_response")
    elif isinstance(prompt, list):
        conv = to_messages({"messages": [*prompt, {"role": "assistant", "content": gold}]}, "messages")
    else:
        raise RecordError("wrong type: field 'prompt' is neither a string nor an array of messages")
    return PromptItem(line, prompt, conv[:-1], gold, _task(rec, TASKS))


def _task(rec: dict, tasks: Iterable[str]) -> str | None:
    """The record's scorer name; an unknown task name is open-ended (None), not an error: other data sets
    label their own kinds."""
    from matelike.data.formats import RecordError

    task = rec.get("task")
    if task is not None and not isinstance(task, str):
        raise RecordError("wrong type: field 'task' is not a string")
    return task if task in tasks else None


def pick_rejected(item: PromptItem, samples: Sequence[str]) -> tuple[str | None, str]:
    """(rejected answer, outcome) with outcome one of "pairs", "already_right", "no_answer"."""
    if item.task is not None:
        from matelike.eval.scoring import score_item

        best = score_item(item.task, item.gold, item.gold)
        scored = [(score_item(item.task, item.gold, s), i) for i, s in enumerate(samples)]
        worse = [(sc, i) for sc, i in scored if sc < best - 1e-9]
    else:
        # Open-ended: any other reply is worse than the reference; the one sharing least with it goes first.
        from matelike.eval.scoring import char_f1

        gold = item.gold.strip()
        worse = [(char_f1(gold, s), i) for i, s in enumerate(samples) if s.strip() != gold]
    if not worse:
        return None, "already_right"
    usable = [(sc, i) for sc, i in worse if samples[i].strip()]
    if not usable:
        return None, "no_answer"
    return samples[min(usable)[1]], "pairs"


def _write_progress(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _start_state(out: Path, progress: Path, settings: dict) -> tuple[int, PairCounts]:
    """(prompts already done, counts so far) after checking and repairing OUT; (0, empty) for a fresh start."""
    if progress.is_file():
        try:
            state = json.loads(progress.read_text(encoding="utf-8"))
            done, size = int(state["done"]), int(state["bytes"])
            counts = PairCounts(**state["counts"])
        except (ValueError, KeyError, TypeError) as e:
            raise PairsError(f"{progress}: unreadable progress file ({e}); delete it and {out} to start over") from e
        changed = [k for k in RESUME_KEYS if state.get("settings", {}).get(k) != settings[k]]
        if changed:
            raise PairsError(
                f"{out} was started with other settings ({', '.join(changed)} differ); use the same ones to "
                f"continue, or delete {out} and {progress} to start over")
        have = out.stat().st_size if out.exists() else 0
        if have < size:
            raise PairsError(f"{out} is shorter ({have} bytes) than its progress file says ({size}); delete both")
        if have > size:  # a truncated line, or pairs of a batch whose progress was not recorded
            with open(out, "r+b") as f:
                f.truncate(size)
        return done, counts
    if out.exists() and out.stat().st_size > 0:
        raise PairsError(f"{out} exists and has no progress file {progress.name}; delete it or choose another --out")
    return 0, PairCounts()


GenerateFn = Callable[..., list[list[int]]]
# Candidates for chosen and rejected must differ: sample at temperature 1, cutting only the far tail.
SAMPLING = SamplingParams(temperature=1.0, top_p=0.95, seed=0)


def make_pairs(
    model: "nn.Module", tokenizer: "Tokenizer", data: str | Path, out: str | Path, *, samples: int = 4,
    limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 128,
    sampling: SamplingParams = SAMPLING, greedy: bool = True, progress: bool = False,
    report: "BadRecordReport | None" = None, generate_fn: GenerateFn | None = None, model_id: str | None = None,
) -> PairCounts:
    """Write preference pairs for the first `limit` prompts of `data` to `out` (resuming); returns the counts.

    `batch_size` is prompts per generation call (each sampled `samples` times, so batch_size * samples
    sequences), and with `greedy` each prompt's greedy answer joins the candidates. `sampling.seed` (0 when
    None) seeds the whole run: each batch draws with a seed derived from it and the batch's first prompt.
    `generate_fn` defaults to `matelike.model.generation.generate` (tests pass their own). `model_id`
    identifies the weights (the CLI passes the weight file's sha256) so a resume with another model is refused.
    """
    from matelike.data.records import BadRecordReport

    if samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("--samples, --batch-size and --max-new-tokens must be >= 1")
    if generate_fn is None:
        from matelike.model.generation import generate as generate_fn
    data, out = Path(data), Path(out)
    seed = sampling.seed or 0
    report = report if report is not None else BadRecordReport()
    items, records = read_prompt_items(data, report)
    if not items:  # 0 pairs with exit 0 would look like a model that is always right
        raise PairsError(f"{data}: no usable prompt with a gold answer in {records} records ({report.summary()}); "
                         "expected {prompt, answer|chosen|response}, alpaca {instruction, output} or "
                         "{messages|conversations} ending with an assistant turn")
    settings = {"model": model_id, "data": str(data), "data_sha256": sha256_file(data), "samples": samples,
                "greedy": greedy, "max_new_tokens": max_new_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "seed": seed, "batch_size": batch_size}
    progress_path = out.with_name(out.name + PROGRESS_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, counts = _start_state(out, progress_path, settings)
    counts.bad = report.total
    todo = len(items) if limit is None else min(limit, len(items))
    context = getattr(getattr(model, "config", None), "max_seq_len", None)
    stop_ids = tuple(getattr(tokenizer, "stop_ids", (tokenizer.im_end_id, tokenizer.eos_id)))
    bar = _progress_bar(todo, done, progress)
    with open(out, "ab") as fout:
        while done < todo:
            chunk = items[done : min(done + batch_size, todo)]
            prompts: list[list[int]] = []
            owners: list[int] = []  # index in chunk of each prompt sequence
            for j, item in enumerate(chunk):
                ids = tokenizer.encode_chat(item.messages, add_generation_prompt=True)[0]
                if context is not None and len(ids) + max_new_tokens > context:
                    continue
                prompts += [ids] * samples
                owners += [j] * samples
            texts: list[list[str]] = [[] for _ in chunk]
            if prompts:
                new = generate_fn(model, prompts, max_new_tokens=max_new_tokens,
                                  sampling=sampling.with_seed(seed * 1_000_003 + done), stop_ids=stop_ids)
                for j, ids in zip(owners, new):
                    texts[j].append(_answer_text(tokenizer, ids, stop_ids))
                if greedy:
                    firsts = list(range(0, len(prompts), samples))
                    new = generate_fn(model, [prompts[k] for k in firsts], max_new_tokens=max_new_tokens,
                                      sampling=GREEDY, stop_ids=stop_ids)
                    for k, ids in zip(firsts, new):
                        texts[owners[k]].append(_answer_text(tokenizer, ids, stop_ids))
            lines: list[bytes] = []
            for j, item in enumerate(chunk):
                if not texts[j]:
                    counts.bump(item.task, "too_long")
                    continue
                rejected, outcome = pick_rejected(item, texts[j])
                counts.bump(item.task, outcome)
                if rejected is not None:
                    rec = {"prompt": item.prompt, "chosen": item.gold, "rejected": rejected}
                    lines.append((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            fout.write(b"".join(lines))
            fout.flush()
            os.fsync(fout.fileno())
            done += len(chunk)
            counts.prompts = done
            _write_progress(progress_path, {"done": done, "bytes": fout.tell(), "settings": settings,
                                            "counts": asdict(counts), "finished": done >= len(items)})
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(pairs=counts.pairs, right=counts.already_right)
    if bar is not None:
        bar.close()
    counts.prompts = done
    return counts


def _answer_text(tokenizer: "Tokenizer", ids: Sequence[int], stop_ids: Iterable[int]) -> str:
    """The generated answer's text: up to the first stop token, special tokens left out."""
    stops = set(stop_ids)
    cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(list(ids[:cut]), skip_special_tokens=True).strip()


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc="make-pairs", unit="prompt", file=sys.stderr)


def _weights_sha256(model_dir: Path) -> str:
    """sha256 over the model directory's safetensors files: which weights made the pairs."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _cmd_make_pairs(args: argparse.Namespace) -> int:

    from matelike.data.records import BadRecordReport, DataFileError
    from matelike.model.io import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer.json", file=sys.stderr)
        return 2
    report = BadRecordReport()
    try:
        counts = make_pairs(
            model, tokenizer, args.data, args.out, samples=args.samples, limit=args.limit,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            sampling=sampling_from_args(args), greedy=args.greedy, report=report,
            model_id=_weights_sha256(Path(args.model)),
            progress=args.progress if args.progress is not None else sys.stderr.isatty(),
        )
    except (PairsError, DataFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report.total:
        print(report.summary(), file=sys.stderr)
    print(json.dumps({"out": str(args.out), **asdict(counts)}, ensure_ascii=False))
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.command("dpo-make-pairs", "preference pairs from a model's own answers (`matelike dpo make-pairs`)",
                      _cmd_make_pairs)
    p.prog = "matelike dpo make-pairs"
    p.add_argument("--model", required=True, help="model directory (the SFT model)")
    p.add_argument("--data", required=True,
                   help="{prompt, answer, task} / {prompt, chosen} / {prompt, response} / alpaca {instruction, input, "
                        "output} / {messages} or {conversations} (the last assistant turn is the gold answer) file")
    p.add_argument("--out", required=True, type=Path,
                   help="pairs jsonl ({prompt, chosen, rejected}); continues where it stopped if present")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per prompt (K)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (x K sequences)")
    add_sampling_args(p, SAMPLING)
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True,
                   help="add each prompt's greedy answer (what chat and eval give) to the candidates for rejected")
    add_device_args(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
