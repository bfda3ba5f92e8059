"""RL prompts and rollouts: reading `{prompt, ...}` records, sampling a group of completions per prompt with the
batched generation engine, and laying them out as training rows.

Every prompt's group is queued together, so the engine prefills the prompt once and copies its cache row to
the other samples of the group (matelike.model.generation.BatchEngine). Each completion has its own seed, made
from the run's seed, the prompt's position in the data stream and the sample's index in its group: a rollout
depends only on the weights and its place in the stream, never on the process count or on what ran before,
which is what makes a resumed run draw the same completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from matelike.data.formats import RecordError

if TYPE_CHECKING:
    import torch

    from matelike.data.records import BadRecordReport
    from matelike.tokenizer import Tokenizer


@dataclass
class Prompts:
    """RL prompts: rendered ids (chat template + generation prompt), the prompt as written, the other fields
    and where each came from (`path:line`)."""

    ids: list[list[int]] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)
    fields: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: Sequence[int]) -> "Prompts":
        return Prompts([self.ids[i] for i in keep], [self.prompts[i] for i in keep],
                       [self.fields[i] for i in keep], [self.sources[i] for i in keep])

    def tasks(self) -> list[str]:
        """The `task` values of the records, sorted (for per-task metrics)."""
        return sorted({str(f["task"]) for f in self.fields if isinstance(f.get("task"), str)})


def load_prompts(paths: Sequence[str], tokenizer: "Tokenizer", max_prompt_len: int, report: "BadRecordReport",
                 check: Callable[[dict], str | None] | None = None) -> Prompts:
    """Read `{prompt | messages | conversations, ...}` records (jsonl/parquet/csv), or one file packed by
    `matelike data pack --format prompts`. A record whose prompt does not parse, is longer than
    `max_prompt_len` tokens, or that `check(fields)` rejects goes to `report` as `PATH:LINE: reason` (for a
    packed file, LINE is the record's number in it). Raises DataFileError for a file that cannot be read or a
    packed file that does not fit (another kind or tokenizer)."""
    from matelike.data.packed import packed_kind, prompt_record
    from matelike.data.records import read_converted

    if any(packed_kind(p) for p in paths):
        return _load_packed(paths, tokenizer, max_prompt_len, report, check)

    def convert(rec: dict) -> tuple[list[int], Any, dict]:
        messages, fields_json = prompt_record(rec)
        fields = json.loads(fields_json)
        reason = check(fields) if check is not None else None
        if reason:
            raise RecordError(reason)
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        if len(ids) > max_prompt_len:
            raise RecordError(_too_long(len(ids), max_prompt_len))
        return ids, rec["prompt"] if "prompt" in rec else messages, fields

    out = Prompts()
    for path, line, (ids, prompt, fields) in read_converted(list(paths), convert, report):
        out.ids.append(ids)
        out.prompts.append(prompt)
        out.fields.append(fields)
        out.sources.append(f"{path}:{line}")
    return out


def _too_long(n: int, limit: int) -> str:
    return f"prompt too long: {n} tokens, more than the {limit} that --seq-len leaves beside --max-new-tokens"


def _load_packed(paths: Sequence[str], tokenizer: "Tokenizer", max_prompt_len: int, report: "BadRecordReport",
                 check: Callable[[dict], str | None] | None) -> Prompts:
    """Prompts of a packed file. The prompt as written is not stored there: rewards receive the rendered
    prompt's text (its special tokens left out) instead."""
    from matelike.data.packed import PackedPrompts, PackMismatchError, packed_kind
    from matelike.data.records import BadRecord, DataFileError

    if len(paths) != 1 or packed_kind(paths[0]) != "prompts":
        raise DataFileError("a packed file must be the only --data file, packed by `matelike data pack --format "
                            "prompts`")
    try:
        packed = PackedPrompts(paths[0], tokenizer)
    except PackMismatchError as e:
        raise DataFileError(str(e)) from None
    out = Prompts()
    for i in range(len(packed)):
        ids = packed.prompt_ids(i).tolist()
        fields = packed.fields(i)
        reason = check(fields) if check is not None else None
        if not reason and len(ids) > max_prompt_len:
            reason = _too_long(len(ids), max_prompt_len)
        if reason:
            report.add(BadRecord(str(paths[0]), i + 1, reason))
            continue
        out.ids.append(ids)
        out.prompts.append(tokenizer.decode(ids, skip_special_tokens=True))
        out.fields.append(fields)
        out.sources.append(f"{paths[0]}:{i + 1}")
    return out


def sample_seed(seed: int, position: int, sample: int) -> int:
    """The sampling seed of sample `sample` of the prompt at `position` of the data stream, in [0, 2^63)."""
    state = np.random.SeedSequence([seed % 2**63, position, sample]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


@dataclass
class Completion:
    """One sampled answer: its tokens (the stop token included when it stopped) and whether it stopped."""

    tokens: list[int]
    stopped: bool


def sample_completions(
    model: "torch.nn.Module", prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, max_new_tokens: int,
    temperature: float, top_k: int | None, top_p: float | None, stop_ids: Sequence[int], max_batch: int,
) -> list[Completion]:
    """One completion per (prompt, seed), generated together through one BatchEngine.

    The engine runs without stop ids and a request is cancelled when it samples one: the engine reports a stop
    as "no token", and the stop token must be known to be trained on (which of `<|im_end|>` or `<|endoftext|>`
    it was). Requests of the same prompt should be adjacent so they share one prefill. Sampling runs in the
    weights' dtype, never under autocast: the engine's KV cache is allocated in that dtype.
    """
    from matelike.model.generation import BatchEngine, GenerationRequest
    from matelike.sampling import SamplingParams

    stops = set(int(s) for s in stop_ids)
    engine = BatchEngine(model, max_batch=max(1, min(max_batch, len(prompts))),  # type: ignore[arg-type]
                         max_len=max(len(p) for p in prompts) + max_new_tokens)
    rows: dict[int, int] = {}
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s)
        rows[engine.add(GenerationRequest(list(p), max_new_tokens, sampling))] = i
    out = [Completion([], False) for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        while engine.has_work():
            for o in engine.step():
                c = out[rows[o.rid]]
                if o.token is None or c.stopped:
                    continue
                c.tokens.append(o.token)
                if o.token in stops:
                    c.stopped = True
                    if not o.finished:
                        engine.cancel(o.rid)
    finally:
        model.train(was_training)
    return out


def collate_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], trained: Sequence[bool],
                 pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded rows of prompt + completion: `input_ids` (N, T) and `targets` (N, T), the token following
    each input position on the completion's positions (stop token included) and -100 elsewhere, or everywhere
    on a row that is not `trained` (a truncated completion under --mask-truncated)."""
    import torch

    lengths = [len(p) + len(c) - 1 for p, c in zip(prompts, completions)]
    t = max(max(lengths), 1)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), t), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        ids[i, : len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
        if trained[i] and c:
            targets[i, len(p) - 1 : len(seq) - 1] = torch.tensor(list(c), dtype=torch.long)
    return {"input_ids": ids, "targets": targets}
