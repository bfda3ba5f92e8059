"""SFT data: instruction records -> chat-template token ids with an assistant-only loss mask -> packed rows.

Pipeline:
1. `load_sft_samples` reads every layout through `formats.to_messages` (bad records go to a
   `BadRecordReport`, never dropped silently), renders each sample with the tokenizer's chat template
   (`Tokenizer.encode_chat` gives ids and a mask that is 1 on assistant content and its `<|im_end|>`),
   and fits it to the sequence length by dropping the oldest whole exchanges (the system turn stays).
   A sample whose last exchange alone does not fit is dropped and counted: an answer is never cut.
2. `pack_rows` packs samples into rows of at most `seq_len` input positions (first-fit decreasing inside
   shuffled blocks), and `collate` builds `input_ids`, `targets` (-100 where no loss), `segment_ids`
   (one id per sample, 0 for padding) and `position_ids` that restart at 0 for every sample, so the
   model's block-diagonal mask keeps packed samples from attending to one another.

A sample of n tokens gives n - 1 (input, target) positions. Tokens after the last assistant token carry
no loss and nothing attends to them, so they are cut before packing (the trailing newline of ChatML).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # heavy or not needed at import time

    from matelike.data.records import BadRecordReport
    from matelike.tokenizer import ChatBatch, Tokenizer

IGNORE_INDEX = -100

# --format choices of `matelike sft` mapped to the layout names of `formats.to_messages`; "auto" detects
# the layout per record.
FORMAT_CHOICES: dict[str, str | None] = {
    "auto": None,
    "prompt-response": "prompt_response",
    "alpaca": "alpaca",
    "conversations": "messages",
}


@dataclass
class SFTStats:
    """Counts of what happened to every record; printed and saved so nothing is lost silently."""

    records: int = 0  # records read (good and bad)
    bad: int = 0  # records rejected by the parser (reported with FILE:LINE)
    samples: int = 0  # samples kept for training
    truncated: int = 0  # samples kept after dropping their oldest exchanges
    turns_dropped: int = 0  # messages removed by truncation, all samples together
    dropped_too_long: int = 0  # even the system turn plus the last exchange does not fit
    dropped_no_answer: int = 0  # no assistant turn with content left to learn from
    tokens: int = 0  # input positions over kept samples
    loss_tokens: int = 0  # positions whose target is an assistant token
    formats: dict[str, int] = field(default_factory=dict)  # detected layout -> records

    def summary(self) -> str:
        return (
            f"sft data: {self.records} records, {self.samples} samples kept, {self.bad} bad, "
            f"{self.truncated} truncated ({self.turns_dropped} old turns dropped), "
            f"{self.dropped_too_long} dropped as too long, {self.dropped_no_answer} without an answer; "
            f"{self.tokens} tokens, {self.loss_tokens} with loss; layouts {self.formats}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SFTSamples:
    """All kept samples, stored flat: sample i is `ids[offsets[i]:offsets[i+1]]` (and the same slice of
    `mask`). One array instead of a list of small ones keeps memory and pickling cheap."""

    ids: np.ndarray  # int32, all samples concatenated
    mask: np.ndarray  # uint8, 1 where the token is an assistant token that carries loss
    offsets: np.ndarray  # int64, len = n + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        # int64: a packed file stores uint16 ids, in which np.where(mask, ids, IGNORE_INDEX) would wrap -100.
        return np.asarray(self.ids[a:b], dtype=np.int64), self.mask[a:b]

    @property
    def lengths(self) -> np.ndarray:
        """Input positions per sample (tokens - 1)."""
        return np.diff(self.offsets) - 1

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]]) -> "SFTSamples":
        lens = np.array([len(x) for x in ids], dtype=np.int64)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        if not len(ids):
            return cls(np.zeros(0, np.int32), np.zeros(0, np.uint8), offsets)
        flat_ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
        flat_mask = np.concatenate([np.asarray(m, dtype=np.uint8) for m in masks])
        return cls(flat_ids, flat_mask, offsets)


def _exchanges(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[list[dict[str, str]]]]:
    """Split into (leading system turns, exchanges). An exchange starts at a non-assistant turn that
    follows an assistant turn (or at the first turn), so it is one question and its answer(s)."""
    head: list[dict[str, str]] = []
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        head.append(messages[i])
        i += 1
    exchanges: list[list[dict[str, str]]] = []
    prev = None
    for m in messages[i:]:
        if not exchanges or (m["role"] != "assistant" and prev == "assistant"):
            exchanges.append([])
        exchanges[-1].append(m)
        prev = m["role"]
    return head, exchanges


def _trim(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]] | None:
    """Cut tokens after the last loss token (nothing learns from them); None if there is none."""
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    if last < 1:  # no assistant token, or one at position 0 that no input could predict
        return None
    return ids[: last + 1], mask[: last + 1]


@dataclass
class FitResult:
    """Outcome of fitting one conversation into `seq_len` input positions."""

    ids: list[int] | None  # None when the sample is dropped
    mask: list[int] | None
    turns_dropped: int = 0
    reason: str = ""  # "too_long" or "no_answer" when dropped


def fit_messages(tokenizer: "Tokenizer", messages: list[dict[str, str]], seq_len: int) -> FitResult:
    """Render `messages` with the chat template and fit them into `seq_len` input positions.

    Too long: drop the oldest whole exchanges, keeping system turns, until it fits. If the system turns
    and the last exchange alone do not fit, the sample is dropped (never trained with its answer cut).
    Length falls as exchanges are dropped, so a binary search finds the most history that fits.
    """
    head, exchanges = _exchanges(messages)

    def render(start: int) -> tuple[list[int], list[int]] | None:
        ids, mask = tokenizer.encode_chat(head + [m for ex in exchanges[start:] for m in ex])
        return _trim(list(ids), list(mask))

    def dropped(start: int) -> int:
        return sum(len(ex) for ex in exchanges[:start])

    full = render(0)
    if full is None:
        return FitResult(None, None, 0, "no_answer")
    if len(full[0]) - 1 <= seq_len:
        return FitResult(full[0], full[1])
    best: tuple[int, tuple[list[int], list[int]]] | None = None
    lo, hi = 1, len(exchanges) - 1  # candidates for the first kept exchange
    while lo <= hi:
        mid = (lo + hi) // 2
        r = render(mid)
        if r is not None and len(r[0]) - 1 <= seq_len:
            best, hi = (mid, r), mid - 1
        else:
            lo = mid + 1
    if best is None:
        return FitResult(None, None, dropped(len(exchanges) - 1), "too_long")
    start, (ids, mask) = best
    return FitResult(ids, mask, dropped(start))


@dataclass
class FittedBatch:
    """`fit_messages` over every conversation of a `ChatBatch`: the kept samples flat, and each one's fate."""

    ids: np.ndarray  # int64, kept samples concatenated in conversation order
    mask: np.ndarray  # uint8
    lengths: np.ndarray  # int64, tokens per kept sample
    reasons: list[str]  # per conversation: "" when kept, else "too_long" or "no_answer"
    turns_dropped: list[int]  # per conversation


def fit_batch(batch: "ChatBatch", conversations: Sequence[list[dict[str, str]]], seq_len: int) -> FittedBatch:
    """`fit_messages` for many conversations rendered at once by `Tokenizer.encode_chat_batch`.

    A conversation's rendering is its messages' pieces laid end to end, and the trimmed length of any window of
    exchanges follows from the piece boundaries (it ends at the last assistant's `<|im_end|>`, the last token
    with a loss), so the search for the most history that fits runs on numbers instead of re-encoding, for all
    conversations at once; the samples are then gathered from the batch's arrays in one numpy operation. Same
    samples, masks and counts as `fit_messages`.
    """
    starts, first, after = batch.starts, batch.conv[:-1], batch.conv[1:]  # conversation c: messages first..after
    roles = [m["role"] for messages in conversations for m in messages]  # message j of the batch is piece j
    n_msgs = len(roles)
    answer = np.fromiter((r == "assistant" for r in roles), dtype=bool, count=n_msgs)
    system = np.fromiter((r == "system" for r in roles), dtype=bool, count=n_msgs)
    # The head (leading system turns) ends at the first other message (`_exchanges`); an exchange starts there
    # and at every non-assistant message that follows an answer.
    others = np.append(np.flatnonzero(~system), n_msgs)
    head_end = np.minimum(others[np.searchsorted(others, first)], after)
    starter = ~answer & np.concatenate([[False], answer[:-1]])
    starter &= np.arange(n_msgs) > np.repeat(head_end, after - first)
    starter[head_end[head_end < after]] = True
    ex = np.append(np.flatnonzero(starter), n_msgs)  # each exchange's first message, all conversations in order
    ex_first, ex_stop = np.searchsorted(ex[:-1], first), np.searchsorted(ex[:-1], after)
    # The last answer (-1: none), and one past its <|im_end|>: the mask's last 1, what `_trim` cuts after.
    answers = np.append(np.flatnonzero(answer), -1)
    last = answers[np.searchsorted(answers[:-1], after) - 1]
    last[last < first] = -1
    end = starts[last + 1] - batch.closing
    # Trimmed tokens with exchanges[k:] after the head: head + (end - start of exchange k). That falls as k grows,
    # so the first exchange from which it fits is found by a search over the exchanges' starts; the whole
    # conversation when that is its first exchange. It must hold the last answer (not be the answerless
    # exchange after it); when none does, the sample is dropped as too long.
    head_len = starts[head_end] - starts[first]
    keep = np.searchsorted(starts[ex[:-1]], head_len + end - 1 - seq_len)
    whole = keep <= ex_first
    keep = np.maximum(keep, ex_first)
    fits = (last >= 0) & (keep < ex_stop) & (ex[keep] <= last)
    dropped = np.where(last < 0, 0, np.where(fits, ex[keep], ex[ex_stop - 1]) - head_end)
    reasons = np.where(last < 0, "no_answer", np.where(fits, "", "too_long")).tolist()
    # A kept sample is two segments of the batch: the head, and the exchanges from the kept one to the end
    # (a whole conversation: all of it, and nothing).
    a = np.stack([starts[first], np.where(whole, end, starts[ex[keep]])], axis=1)[fits].ravel()
    b = np.stack([np.where(whole, end, starts[head_end]), end], axis=1)[fits].ravel()
    seg_len = b - a
    before = np.zeros(len(seg_len) + 1, dtype=np.int64)
    np.cumsum(seg_len, out=before[1:])
    at = np.repeat(a - before[:-1], seg_len) + np.arange(int(before[-1]))
    lengths = seg_len.reshape(-1, 2).sum(axis=1)
    return FittedBatch(batch.ids[at], batch.mask[at], lengths, reasons, dropped.tolist())


def sft_converter(fmt: str = "auto") -> Callable[[dict], tuple[str, list[dict[str, str]]]]:
    """Record -> (layout, chat messages) for `--format fmt`: what `load_sft_samples` and the packer read."""
    from matelike.data.formats import detect_sft_format, to_messages

    if fmt not in FORMAT_CHOICES:
        raise ValueError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    layout_arg = FORMAT_CHOICES[fmt]

    def convert(rec: dict) -> tuple[str, list[dict[str, str]]]:
        # A forced --format on a record of another layout is a RecordError ("missing field") from to_messages.
        layout = layout_arg or detect_sft_format(rec)
        return layout, to_messages(rec, layout)

    return convert


def load_sft_samples(
    paths: Iterable[str | Path],
    tokenizer: "Tokenizer",
    seq_len: int,
    fmt: str = "auto",
    report: "BadRecordReport | None" = None,
    *,
    max_record_bytes: int | None = None,
) -> tuple[SFTSamples, SFTStats]:
    """Read SFT records from jsonl / parquet / csv files in any supported layout.

    Bad records (unreadable, over `max_record_bytes`, wrong layout, missing or empty fields) go to `report`
    with FILE:LINE and are counted; every good record is rendered and fitted with `fit_messages`.
    """
    from matelike.data.records import MAX_RECORD_BYTES, BadRecordReport, ReadCounts, read_converted

    report = report if report is not None else BadRecordReport()
    stats = SFTStats()
    counts = ReadCounts()
    # Small numpy arrays, not lists of Python ints: a million samples stay a few bytes per token.
    all_ids: list[np.ndarray] = []
    all_masks: list[np.ndarray] = []

    for _, _, (layout, messages) in read_converted(paths, sft_converter(fmt), report, counts=counts,
                                                   max_record_bytes=max_record_bytes or MAX_RECORD_BYTES):
        stats.formats[layout] = stats.formats.get(layout, 0) + 1
        fit = fit_messages(tokenizer, messages, seq_len)
        if fit.ids is None:
            if fit.reason == "no_answer":
                stats.dropped_no_answer += 1
            else:
                stats.dropped_too_long += 1
            continue
        if fit.turns_dropped:
            stats.truncated += 1
            stats.turns_dropped += fit.turns_dropped
        stats.samples += 1
        stats.tokens += len(fit.ids) - 1
        stats.loss_tokens += sum(fit.mask[1:])
        all_ids.append(np.asarray(fit.ids, dtype=np.int32))
        all_masks.append(np.asarray(fit.mask, dtype=np.uint8))
    stats.records, stats.bad = counts.records, counts.bad
    return SFTSamples.from_lists(all_ids, all_masks), stats


def _first_fit_block(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """First fit of samples sorted longest first: (row of each sample, number of rows).

    Samples of equal length are placed together: first fit sends them to the lowest row with room, which keeps
    taking them until its room is below their length (rows before it had less room already), then to the next
    such row, then to new rows of seq_len // length samples each. A cumulative sum of per-row capacities places
    a whole run of equal lengths in a few numpy operations, with the rows first fit one sample at a time gives.
    """
    row_of = np.empty(len(lengths), dtype=np.int64)
    free = np.zeros(0, dtype=np.int64)  # room left per row, rows in the order they were opened
    most = -1  # the most room any row has (or less than any length when there is no row)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(lengths)) + 1, [len(lengths)]]).tolist()
    values = lengths[bounds[:-1]].tolist()
    for i, j, n in zip(bounds[:-1], bounds[1:], values):
        k = j - i
        if n == 0:  # fits anywhere: the first row (opened now if there is none)
            free = free if len(free) else np.array([seq_len], dtype=np.int64)
            most = max(most, int(free[0]))
            row_of[i:j] = 0
            continue
        placed = 0
        if most >= n:  # long samples come first and usually find no room: skip the search then
            cum = np.cumsum(free // n)
            placed = min(k, int(cum[-1]))
            rows = np.searchsorted(cum, np.arange(placed), side="right")
            row_of[i : i + placed] = rows
            free -= n * np.bincount(rows, minlength=len(free))
            most = int(free.max())
        rest = k - placed
        if rest:
            per = seq_len // n
            opened = -(-rest // per)
            row_of[i + placed : j] = len(free) + (np.arange(rest) // per if per > 1 else np.arange(rest))
            room = np.full(opened, seq_len - n * per, dtype=np.int64)
            room[-1] = seq_len - n * (rest - (opened - 1) * per)
            free = np.concatenate([free, room])
            most = max(most, int(room[-1]))
    return row_of, len(free)


class Rows:
    """Packed rows stored flat: row j holds samples `members[starts[perm[j]]:starts[perm[j]+1]]`.

    Arrays rather than a list per row: a million samples cost a few MB per rank, not a Python object each.
    An int gives one row (an int64 array of sample indices), a slice a list of them.
    """

    def __init__(self, members: np.ndarray, starts: np.ndarray, perm: np.ndarray | None = None) -> None:
        self.members = members
        self.starts = starts
        self.perm = perm

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _row(self, j: int) -> np.ndarray:
        r = int(self.perm[j]) if self.perm is not None else j
        return self.members[self.starts[r] : self.starts[r + 1]]

    def __getitem__(self, j: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(j, slice):
            return [self._row(i) for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        return self._row(j % len(self))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self._row(i) for i in range(len(self)))


def plan_rows(lengths: np.ndarray, seq_len: int, order: np.ndarray, block: int = 4096) -> Rows:
    """Pack samples (by index, in `order`) into rows of at most `seq_len` positions.

    First-fit decreasing inside consecutive blocks of `order`: rows come out nearly full while the shuffle
    across blocks keeps the sample order random from epoch to epoch. Vectorised per run of equal lengths
    (`_first_fit_block`): about a second for a million samples, so sft's start does not grow with the data.
    """
    members: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    lengths = np.asarray(lengths)
    for b in range(0, len(order), block):
        chunk = np.asarray(order[b : b + block])
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        if len(chunk) and lengths[chunk[0]] > seq_len:
            raise ValueError(f"sample {int(chunk[0])} has {int(lengths[chunk[0]])} positions, more than seq_len "
                             f"{seq_len}")
        row_of, n_rows = _first_fit_block(lengths[chunk], seq_len)
        members.append(chunk[np.argsort(row_of, kind="stable")].astype(np.int64))
        counts.append(np.bincount(row_of, minlength=n_rows))
    starts = np.zeros(sum(len(c) for c in counts) + 1, dtype=np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=starts[1:])
    return Rows(np.concatenate(members) if members else np.zeros(0, np.int64), starts)


def pack_rows(lengths: np.ndarray, seq_len: int, order: np.ndarray, block: int = 4096) -> list[list[int]]:
    """`plan_rows` as a list of lists of sample indices."""
    return [row.tolist() for row in plan_rows(lengths, seq_len, order, block)]


def collate(samples: SFTSamples, rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> dict:
    """Build one batch from packed rows: tensors of shape (len(rows), width).

    `width` defaults to the longest row, so a batch of short rows is not padded to `seq_len`.
    `segment_ids` is 1.. per sample in a row and 0 on padding; positions restart at 0 per sample.
    """
    import torch

    # Lengths of these rows' samples only: a full `samples.lengths` per batch would cost O(data) every step.
    off = samples.offsets
    row_len = [sum(int(off[i + 1]) - int(off[i]) - 1 for i in row) for row in rows]
    width = width or max(row_len)
    B = len(rows)
    input_ids = np.full((B, width), pad_id, dtype=np.int64)
    targets = np.full((B, width), IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.zeros((B, width), dtype=np.int64)
    position_ids = np.zeros((B, width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, start=1):
            ids, mask = samples.sample(i)
            n = len(ids) - 1
            input_ids[r, at : at + n] = ids[:-1]
            targets[r, at : at + n] = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
            segment_ids[r, at : at + n] = s
            position_ids[r, at : at + n] = np.arange(n)
            at += n
    real = int(sum(row_len))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "segment_ids": torch.from_numpy(segment_ids),
        "position_ids": torch.from_numpy(position_ids),
        "n_samples": sum(len(r) for r in rows),
        "real_tokens": real,
        "padding_fraction": 1.0 - real / float(B * width),
    }


class PackedSFTData:
    """Epochs of shuffled, packed batches with a resumable integer cursor.

    The cursor counts global batches since the start of training. Epoch e shuffles with seed + e and
    packs into rows; global batch k of an epoch takes rows [k*G, (k+1)*G) with G = batch_size *
    world_size, and rank r takes every world_size-th of those rows, so all ranks see distinct samples
    and agree on the number of steps. The last partial global batch of an epoch is kept when it has at
    least one row per rank (rows beyond that are dropped, at most world_size - 1 of them).
    """

    def __init__(self, samples: SFTSamples, seq_len: int, batch_size: int, pad_id: int, seed: int = 0) -> None:
        if len(samples) == 0:
            raise ValueError("no SFT samples to train on")
        self.samples = samples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self._cache: tuple[int, Rows] | None = None

    def rows(self, epoch: int) -> Rows:
        if self._cache is None or self._cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
            rows = plan_rows(self.samples.lengths, self.seq_len, order)
            # First-fit decreasing leaves each block's rows sorted from long samples to short ones; batches of
            # consecutive rows would then each hold one kind of sample (all news continuations, then all
            # sentiment labels), and the model would drift from task to task within an epoch.
            rows.perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(rows))
            self._cache = (epoch, rows)
        return self._cache[1]

    def batches_per_epoch(self, epoch: int, world_size: int = 1) -> int:
        n_rows = len(self.rows(epoch)) // world_size * world_size
        return max(1, -(-n_rows // (self.batch_size * world_size)))

    def iter_batches(self, rank: int = 0, world_size: int = 1, cursor: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield (cursor after this batch, batch) forever, starting at global batch `cursor`."""
        epoch, k = 0, cursor
        while k >= (n := self.batches_per_epoch(epoch, world_size)):
            k -= n
            epoch += 1
        done = cursor
        while True:
            rows = self.rows(epoch)
            n_rows = len(rows) // world_size * world_size
            if n_rows == 0:  # fewer rows than ranks: every rank reuses row `rank % len(rows)`
                rows, n_rows = [rows[rank % len(rows)]] * world_size, world_size
            n = self.batches_per_epoch(epoch, world_size)
            g = self.batch_size * world_size
            for b in range(k, n):
                mine = rows[b * g : min((b + 1) * g, n_rows)][rank::world_size]
                done += 1
                yield done, collate(self.samples, mine, self.pad_id)
            epoch, k = epoch + 1, 0


def print_stats(stats: SFTStats, report: "BadRecordReport | None" = None) -> None:
    """Print the data summary (and the bad-record summary when any) to stderr."""
    print(stats.summary(), file=sys.stderr)
    if report is not None and stats.bad:
        print(report.summary(), file=sys.stderr)
