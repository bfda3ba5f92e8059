"""Preference data: `{prompt, chosen, rejected}` records -> token ids with a completion-only mask -> batches.

Records in TRL's columns (strings or message lists, jsonl or parquet) go through `formats.to_preference`;
bad ones are reported with FILE:LINE by a `BadRecordReport` and counted. Each side (prompt + chosen,
prompt + rejected) is rendered with the chat template by the SFT stage's `fit_messages` (same rendering, same
history-side truncation) and then only the final assistant turn keeps its mask: DPO compares the two
answers, not the earlier turns they share.

A batch of B pairs is one (2B, W) tensor, chosen rows first, so one forward pass scores both sides.
It also carries the pair indices so that precomputed reference log-probabilities can be looked up after
a resume or in any shuffle order.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from matelike.data.sft import IGNORE_INDEX, SFTSamples, fit_messages

if TYPE_CHECKING:
    from matelike.data.records import BadRecordReport
    from matelike.tokenizer import Tokenizer


@dataclass
class PreferenceStats:
    """What happened to every record, printed and saved so nothing is lost silently."""

    records: int = 0
    bad: int = 0
    pairs: int = 0
    truncated: int = 0  # pairs kept after dropping their oldest exchanges
    dropped_too_long: int = 0  # prompt's last turn plus an answer does not fit --seq-len
    tokens: int = 0  # input positions over kept pairs, both sides
    files: dict[str, int] = field(default_factory=dict)  # path -> pairs kept

    def summary(self) -> str:
        return (
            f"preference data: {self.records} records, {self.pairs} pairs kept, {self.bad} bad, "
            f"{self.truncated} truncated, {self.dropped_too_long} dropped as too long; {self.tokens} tokens"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreferencePairs:
    """Rendered pairs: pair i is `chosen.sample(i)` against `rejected.sample(i)` (ids and loss mask)."""

    chosen: SFTSamples
    rejected: SFTSamples
    fingerprint: str | None = None  # content hash known in advance (a packed file's sha256), else computed

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> np.ndarray:
        """Input positions per pair: the longer of the two sides (what a padded row needs)."""
        return np.maximum(self.chosen.lengths, self.rejected.lengths)


def _final_turn_only(mask: list[int]) -> list[int]:
    """Keep the last run of 1s (the final assistant turn and its <|im_end|>), zero the earlier turns."""
    out = list(mask)
    i = len(out) - 1
    while i >= 0 and not out[i]:
        i -= 1
    while i >= 0 and out[i]:
        i -= 1
    for j in range(i + 1):
        out[j] = 0
    return out


def render_pair(
    tokenizer: "Tokenizer", prompt: list[dict[str, str]], chosen: list[dict[str, str]],
    rejected: list[dict[str, str]], seq_len: int,
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], int] | None:
    """(chosen ids+mask, rejected ids+mask, history turns dropped) or None when a side does not fit."""
    sides = []
    dropped = 0
    for answer in (chosen, rejected):
        fit = fit_messages(tokenizer, prompt + answer, seq_len)
        if fit.ids is None:
            return None
        sides.append((fit.ids, _final_turn_only(fit.mask)))
        dropped = max(dropped, fit.turns_dropped)
    return sides[0], sides[1], dropped


def render_pairs(
    tokenizer: "Tokenizer", pairs: Sequence[Any], seq_len: int,
) -> list[tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None]:
    """`render_pair` of many `Preference` records at once, for the packer: every side in one
    `encode_chat_batch` call, fitted by `fit_batch` and masked to the final turn with numpy. Per pair
    (history turns dropped, [(chosen ids, mask), (rejected ids, mask)]) with int64 ids and uint8 masks, or None
    when a side does not fit; the same ids and masks as `render_pair`."""
    from matelike.data.sft import fit_batch

    conversations = [p.prompt + answer for p in pairs for answer in (p.chosen, p.rejected)]
    fit = fit_batch(tokenizer.encode_chat_batch(conversations), conversations, seq_len)
    ends = np.cumsum(fit.lengths)
    starts = ends - fit.lengths
    # `_final_turn_only` on every sample: zero the mask before the start of its last run of 1s
    mask = fit.mask
    if mask.size:
        at = np.arange(mask.size)
        run_start = (mask == 1) & np.concatenate([[True], mask[:-1] == 0])
        run_start[starts] = mask[starts] == 1  # a sample's first token starts a run whatever precedes it
        last = np.maximum.reduceat(np.where(run_start, at, -1), starts)
        mask = np.where(at >= np.repeat(last, fit.lengths), mask, 0).astype(np.uint8)
    out: list[tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None] = []
    k = 0  # kept samples so far
    for i in range(len(pairs)):
        if fit.reasons[2 * i] or fit.reasons[2 * i + 1]:
            k += (not fit.reasons[2 * i]) + (not fit.reasons[2 * i + 1])
            out.append(None)
            continue
        sides = [(fit.ids[starts[j]:ends[j]], mask[starts[j]:ends[j]]) for j in (k, k + 1)]
        out.append((max(fit.turns_dropped[2 * i], fit.turns_dropped[2 * i + 1]), sides))
        k += 2
    return out


def load_preference_pairs(
    paths: Iterable[str | Path], tokenizer: "Tokenizer", seq_len: int, report: "BadRecordReport | None" = None,
    *, max_record_bytes: int | None = None,
) -> tuple[PreferencePairs, PreferenceStats]:
    """Read and render every pair of `paths` (files or directories, jsonl / parquet / csv)."""
    from matelike.data.formats import to_preference
    from matelike.data.records import MAX_RECORD_BYTES, BadRecordReport, ReadCounts, expand_inputs, read_converted

    report = report if report is not None else BadRecordReport()
    stats = PreferenceStats()
    ids: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
    masks: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
    for path in expand_inputs(paths):
        kept = 0
        counts = ReadCounts()
        for _, _, pref in read_converted(path, to_preference, report, counts=counts,
                                         max_record_bytes=max_record_bytes or MAX_RECORD_BYTES):
            rendered = render_pair(tokenizer, pref.prompt, pref.chosen, pref.rejected, seq_len)
            if rendered is None:
                stats.dropped_too_long += 1
                continue
            (ci, cm), (ri, rm), dropped = rendered
            stats.truncated += bool(dropped)
            stats.tokens += len(ci) + len(ri) - 2
            for side, i, m in (("chosen", ci, cm), ("rejected", ri, rm)):
                ids[side].append(i)
                masks[side].append(m)
            kept += 1
        stats.records += counts.records
        stats.bad += counts.bad
        stats.files[str(path)] = kept
        stats.pairs += kept
    pairs = PreferencePairs(SFTSamples.from_lists(ids["chosen"], masks["chosen"]),
                            SFTSamples.from_lists(ids["rejected"], masks["rejected"]))
    return pairs, stats


def read_pairs(
    paths: list[str], tokenizer: "Tokenizer", seq_len: int, report: "BadRecordReport",
) -> tuple[PreferencePairs, PreferenceStats]:
    """The pairs of a stage's --data / --val: raw files (load_preference_pairs), or one file packed by
    `matelike data pack --format dpo`, whose bad records were reported when it was packed and are only counted
    into `report` here. Raises PackMismatchError for a packed file among others or made for another run."""
    from matelike.data.packed import PackMismatchError, open_pairs, packed_kind

    if not any(packed_kind(p) for p in paths):
        return load_preference_pairs(paths, tokenizer, seq_len, report)
    if len(paths) != 1:
        raise PackMismatchError("a packed file must be the only file of --data / --val")
    pairs, f = open_pairs(paths[0], tokenizer, seq_len)
    for reason, n in f.meta["bad_records"]["by_reason"].items():
        report.by_reason[reason] += n
    for name, n in f.meta["bad_records"]["by_file"].items():
        report.by_file[name] += n
    known = {k: v for k, v in f.meta["stats"].items() if k in PreferenceStats.__dataclass_fields__}
    return pairs, PreferenceStats(**known)


class PairBatchesTask:
    """The data half of an engine Task over `self.data`, a PreferenceBatches (dpo, reward train)."""

    data: PreferenceBatches

    def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[dict, int]]:
        """(batch, cursor after it) forever; the cursor counts global batches (see PreferenceBatches)."""
        for after, batch in self.data.iter_batches(rank, world_size, int(cursor or 0)):
            yield batch, after

    def epoch_size(self, world_size: int) -> int:
        return self.data.batches_per_epoch(world_size)


class NoPairsError(ValueError):
    """--data or --val gave no usable pair (every record was bad or too long)."""


def read_pair_sets(
    data: list[str], val: list[str] | None, tokenizer: "Tokenizer", seq_len: int, report: "BadRecordReport",
    verbose: bool,
) -> tuple[PreferencePairs, PreferencePairs | None, PreferenceStats, PreferenceStats | None]:
    """A preference stage's training and held-out pairs (read_pairs on --data and --val), their statistics
    printed when `verbose` (the main rank). Raises NoPairsError when either set is empty, and read_pairs'
    errors."""
    pairs, stats = read_pairs(data, tokenizer, seq_len, report)
    held, held_stats = read_pairs(val, tokenizer, seq_len, report) if val else (None, None)
    if verbose:
        print_stats(stats, report)
        if held_stats is not None:
            print("held-out " + held_stats.summary(), file=sys.stderr)
    if len(pairs) == 0:
        raise NoPairsError("no usable preference pairs in " + ", ".join(map(str, data)))
    if held is not None and len(held) == 0:
        raise NoPairsError("no usable held-out pairs in " + ", ".join(map(str, val or ())))
    return pairs, held, stats, held_stats


def collate_pairs(pairs: PreferencePairs, indices: list[int], pad_id: int) -> dict:
    """One batch: `input_ids`/`targets` (2B, W), chosen rows then rejected rows, right padding.

    Right padding under a causal mask leaves the real tokens' logits untouched, so no attention mask is
    needed and the fast causal attention path applies.
    """
    import torch

    rows = [pairs.chosen.sample(i) for i in indices] + [pairs.rejected.sample(i) for i in indices]
    width = max(len(ids) - 1 for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    real = 0
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        input_ids[r, :n] = ids[:-1]
        targets[r, :n] = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
        real += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "index": torch.tensor(indices, dtype=torch.long),
        "real_tokens": real,
        "padding_fraction": 1.0 - real / float(input_ids.size),
    }


class PreferenceBatches:
    """Epochs of shuffled pair batches with a resumable integer cursor (global batches since the start).

    Epoch e shuffles with (seed, e); global batch k takes pairs [k*G, (k+1)*G) of that order with
    G = batch_size * world_size, and rank r takes every world_size-th of them. Inside a global batch the
    pairs are sorted by length before the split so the padded rows of a rank stay close in length. The last
    partial global batch of an epoch is kept when it has at least one pair per rank.
    `collate(pairs, indices, pad_id)` makes each batch: DPO's log-prob rows by default, the reward model's
    scoring rows in matelike.reward.
    """

    def __init__(self, pairs: PreferencePairs, batch_size: int, pad_id: int, seed: int = 0,
                 collate: Callable[[PreferencePairs, list[int], int], dict] | None = None) -> None:
        if len(pairs) == 0:
            raise ValueError("no preference pairs to train on")
        self.pairs = pairs
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.collate = collate or collate_pairs

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def batches_per_epoch(self, world_size: int = 1) -> int:
        usable = max(len(self.pairs) // world_size * world_size, world_size)
        return max(1, -(-usable // (self.batch_size * world_size)))

    def iter_batches(self, rank: int = 0, world_size: int = 1, cursor: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield (cursor after this batch, batch) forever, starting at global batch `cursor`."""
        n = self.batches_per_epoch(world_size)
        epoch, k = divmod(cursor, n)
        done = cursor
        g = self.batch_size * world_size
        lengths = self.pairs.lengths()
        while True:
            order = self.order(epoch)
            usable = len(order) // world_size * world_size
            if usable == 0:  # fewer pairs than ranks: rank r reuses pair r % n
                order, usable = np.arange(world_size) % len(order), world_size
            for b in range(k, n):
                chunk = order[b * g : min((b + 1) * g, usable)]
                chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
                done += 1
                yield done, self.collate(self.pairs, chunk[rank::world_size].tolist(), self.pad_id)
            epoch, k = epoch + 1, 0


def print_stats(stats: PreferenceStats, report: "BadRecordReport | None" = None) -> None:
    """The data summary (and the bad-record summary when any) on stderr."""
    print(stats.summary(), file=sys.stderr)
    if report is not None and stats.bad:
        print(report.summary(), file=sys.stderr)
