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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from matelike.data.formats import RecordError

if TYPE_CHECKING:
    import torch

    from matelike.data.packed import PackedPrompts
    from matelike.data.records import BadRecordReport
    from matelike.model.constraints import Constraint
    from matelike.tokenizer import Tokenizer


class PromptSet(Protocol):
    """What the RL tasks read of their prompts: prompt i's rendered ids, the prompt as the rewards see it, its
    other fields and where it came from, by index; `Prompts` holds them in lists, `PackedPromptSet` reads them
    from a packed file when asked."""

    ids: Sequence[list[int]]
    prompts: Sequence[Any]
    fields: Sequence[dict]
    sources: Sequence[str]

    def __len__(self) -> int: ...

    def task_counts(self) -> dict[str, int]: ...

    def tasks(self) -> list[str]: ...

    def keep_if(self, keep: Callable[[dict], bool]) -> "PromptSet": ...


def _add_task(counts: dict[str, int], fields: dict) -> None:
    t = fields.get("task")
    if isinstance(t, str):
        counts[t] = counts.get(t, 0) + 1


def _count_tasks(fields: Iterable[dict]) -> dict[str, int]:
    """Records per `task` value (string ones), sorted by task."""
    counts: dict[str, int] = {}
    for f in fields:
        _add_task(counts, f)
    return dict(sorted(counts.items()))


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

    def keep_if(self, keep: Callable[[dict], bool]) -> "Prompts":
        """The prompts whose fields `keep` accepts, in order."""
        return self.subset([i for i, f in enumerate(self.fields) if keep(f)])

    def task_counts(self) -> dict[str, int]:
        """Records per `task` value (string ones), sorted by task."""
        return _count_tasks(self.fields)

    def tasks(self) -> list[str]:
        """The `task` values of the records, sorted (for per-task metrics)."""
        return list(self.task_counts())


class _Column(Sequence):
    """One field of a PackedPromptSet as a sequence: item k is read from the file when it is asked for."""

    def __init__(self, owner: "PackedPromptSet", read: Callable[[int], Any]) -> None:
        self.owner, self.read = owner, read

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, k: int) -> Any:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.read(self.owner.record(k))

    def __eq__(self, other: object) -> bool:
        """Equal to a list (or column) with equal items, as the lists of `Prompts` compare."""
        if not isinstance(other, (list, tuple, _Column)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


class _FieldsColumn(_Column):
    """The fields column: iterating it streams the file in chunks instead of reading record by record."""

    def __iter__(self) -> Iterator[dict]:
        for _, _, fields in self.owner.scan():
            yield fields


class PackedPromptSet:
    """The prompts of a file packed by `matelike data pack --format prompts`, read from it on demand.

    What a process holds does not grow with the file: the memory maps, the sorted record numbers left out
    (bad records, prompts too long for the run, records filtered out) and the per-task counts. Prompt k of the
    set is record `record(k)` of the file. The prompt as written is not stored in the file: the rewards
    receive the rendered prompt's text (its special tokens left out) instead."""

    def __init__(self, packed: "PackedPrompts", tokenizer: "Tokenizer", excluded: np.ndarray,
                 task_counts: dict[str, int]) -> None:
        self.packed, self.tokenizer = packed, tokenizer
        self.excluded = np.asarray(excluded, dtype=np.int64)
        # prompt k is record k + (records left out before it): with shift[j] = excluded[j] - j, that count is
        # the number of shift values <= k
        self._shift = self.excluded - np.arange(len(self.excluded), dtype=np.int64)
        self._task_counts = dict(task_counts)
        path = str(packed.file.path)
        self.ids: Sequence[list[int]] = _Column(self, lambda r: packed.prompt_ids(r).tolist())
        self.prompts: Sequence[Any] = _Column(
            self, lambda r: tokenizer.decode(packed.prompt_ids(r).tolist(), skip_special_tokens=True))
        self.fields: Sequence[dict] = _FieldsColumn(self, packed.fields)
        self.sources: Sequence[str] = _Column(self, lambda r: f"{path}:{r + 1}")

    def __len__(self) -> int:
        return len(self.packed) - len(self.excluded)

    def record(self, k: int) -> int:
        """The file's record number of prompt k."""
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"prompt {k} of {n}")
        return k + int(np.searchsorted(self._shift, k, side="right"))

    def scan(self) -> Iterator[tuple[int, int, dict]]:
        """(record, prompt length, fields) of the prompts of the set, in order, streamed from the file."""
        skip = iter(self.excluded)
        nxt = next(skip, None)
        for r, n, fields in self.packed.scan():
            if r == nxt:
                nxt = next(skip, None)
                continue
            yield r, n, fields

    def keep_if(self, keep: Callable[[dict], bool]) -> "PackedPromptSet":
        """The prompts whose fields `keep` accepts, in order (one pass over the file)."""
        out: list[int] = []
        counts: dict[str, int] = {}
        for r, _, f in self.scan():
            if keep(f):
                _add_task(counts, f)
            else:
                out.append(r)
        if not out:
            return self
        excluded = np.union1d(self.excluded, np.asarray(out, dtype=np.int64))
        return PackedPromptSet(self.packed, self.tokenizer, excluded, dict(sorted(counts.items())))

    def task_counts(self) -> dict[str, int]:
        """Prompts per `task` value (string ones), sorted by task; counted when the set was made."""
        return dict(self._task_counts)

    def tasks(self) -> list[str]:
        """The `task` values of the prompts, sorted (for per-task metrics)."""
        return list(self._task_counts)


def load_prompts(paths: Sequence[str], tokenizer: "Tokenizer", max_prompt_len: int, report: "BadRecordReport",
                 check: Callable[[dict], str | None] | None = None) -> PromptSet:
    """Read `{prompt | messages | conversations, ...}` records (jsonl/parquet/csv) into a `Prompts`, or one file
    packed by `matelike data pack --format prompts` as a `PackedPromptSet` (nothing loaded: one streamed pass
    checks the records). A record whose prompt does not parse, is longer than `max_prompt_len` tokens, or that
    `check(fields)` rejects goes to `report` as `PATH:LINE: reason` (for a packed file, LINE is the record's
    number in it). Raises DataFileError for a file that cannot be read or a packed file that does not fit
    (another kind or tokenizer) or is damaged."""
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
                 check: Callable[[dict], str | None] | None) -> PackedPromptSet:
    """The prompts of a packed file as a PackedPromptSet: one streamed pass reports the records `check` or the
    length refuses (they are left out) and counts the tasks."""
    from matelike.data.packed import PackedPrompts, PackMismatchError, packed_kind
    from matelike.data.records import BadRecord, DataFileError

    if len(paths) != 1 or packed_kind(paths[0]) != "prompts":
        raise DataFileError("a packed file must be the only --data file, packed by `matelike data pack --format "
                            "prompts`")
    excluded: list[int] = []
    counts: dict[str, int] = {}
    try:
        packed = PackedPrompts(paths[0], tokenizer)
        for r, n, fields in packed.scan():
            reason = check(fields) if check is not None else None
            if not reason and n > max_prompt_len:
                reason = _too_long(n, max_prompt_len)
            if reason:
                report.add(BadRecord(str(paths[0]), r + 1, reason))
                excluded.append(r)
                continue
            _add_task(counts, fields)
    except PackMismatchError as e:
        raise DataFileError(str(e)) from None
    return PackedPromptSet(packed, tokenizer, np.asarray(excluded, dtype=np.int64), dict(sorted(counts.items())))


def sample_seed(seed: int, position: int, sample: int) -> int:
    """The sampling seed of sample `sample` of the prompt at `position` of the data stream, in [0, 2^63)."""
    state = np.random.SeedSequence([seed % 2**63, position, sample]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


@dataclass
class Completion:
    """One sampled answer: its tokens (the stop token included when it stopped), whether it stopped and, when
    it was constrained, the token ids the constraint allowed before each of its tokens (None where it allowed
    none and the engine sampled freely)."""

    tokens: list[int]
    stopped: bool
    allowed: list[list[int] | None] | None = None


@dataclass(frozen=True)
class _Recorded:
    """A constraint as one rollout request uses it: its stop ids are given here (the rollout engine runs without
    any, `sample_completions`), and what it allowed at each step is kept in `log` for the loss (the engine asks
    once per token it samples)."""

    inner: "Constraint"
    stops: tuple[int, ...]
    log: list[list[int] | None]

    def start(self) -> object:
        return self.inner.start()

    def allowed(self, state: object, stop_ids: Sequence[int]) -> list[int]:
        ids = self.inner.allowed(state, self.stops)
        self.log.append(ids or None)
        return ids

    def advance(self, state: object, token: int) -> object:
        return self.inner.advance(state, token)


def sample_completions(
    model: "torch.nn.Module", prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, max_new_tokens: int,
    temperature: float, top_k: int | None, top_p: float | None, stop_ids: Sequence[int], max_batch: int,
    constraints: Sequence["Constraint | None"] | None = None,
) -> list[Completion]:
    """One completion per (prompt, seed), generated together through one BatchEngine, each held to its
    constraint when `constraints` gives one (`matelike.model.constraints`; the completion keeps what it allowed).

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
    shapes = constraints if constraints is not None else [None] * len(prompts)
    out = [Completion([], False, [] if c is not None else None) for c in shapes]
    for i, (p, s, c) in enumerate(zip(prompts, seeds, shapes)):
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s)
        shape = _Recorded(c, tuple(sorted(stops)), out[i].allowed) if c is not None else None  # type: ignore[arg-type]
        rows[engine.add(GenerationRequest(list(p), max_new_tokens, sampling, constraint=shape))] = i
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


def allowed_targets(completions: Sequence[Completion], trained: Sequence[bool]) -> dict[str, "torch.Tensor"]:
    """What the constraints allowed at each trained target of `collate_rows`' rows (targets in row-major order,
    as `targets != -100` selects them): `allowed_pairs` (K, 2) of (target index, allowed token id) and
    `constrained` (N,) whether a target's row had a constraint. The loss's log-probs are then those of the
    masked distribution the engine sampled from; a stored rollout needs only these pairs."""
    import torch

    pairs: list[tuple[int, int]] = []
    constrained: list[bool] = []
    for c, keep in zip(completions, trained):
        if not keep or not c.tokens:
            continue
        for t in range(len(c.tokens)):
            allowed = c.allowed[t] if c.allowed is not None else None
            k = len(constrained)
            if allowed is not None:
                pairs += [(k, a) for a in allowed]
            constrained.append(allowed is not None)
    return {"allowed_pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2),
            "constrained": torch.tensor(constrained, dtype=torch.bool)}
