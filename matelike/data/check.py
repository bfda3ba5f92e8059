"""`matelike data check`: validate jsonl/parquet/csv/txt records without modifying them.

Prints `PATH:LINE: reason` per bad record (at most 20 per file), then totals per file and overall: records,
good, bad by reason, characters, duplicates. Exit 0 when all records are good, 1 when any is bad, 2 when a
file cannot be read at all. Streams: memory is one record plus 8 bytes per record for duplicate detection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from matelike.data.formats import guess_kind, pretrain_text, to_messages, to_preference
from matelike.data.records import (
    MAX_RECORD_BYTES,
    BadRecordReport,
    DataFileError,
    ReadCounts,
    expand_inputs,
    read_converted,
)

if TYPE_CHECKING:
    from matelike.cli import CommandTable

KINDS = ("pretrain", "sft", "dpo")


@dataclass
class FileStats:
    """Counts for one file (or the total over all files)."""

    path: str
    kind: str = ""
    records: int = 0
    good: int = 0
    bad: int = 0
    chars: int = 0
    duplicates: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)


def _content_key(obj: dict, kind: str, text_field: str) -> tuple[str, int]:
    """Canonical content of a good record (for duplicate detection) and its character count."""
    if kind == "pretrain":
        text = pretrain_text(obj, text_field)
        return text, len(text)
    if kind == "sft":
        msgs = to_messages(obj)
        return json.dumps(msgs, ensure_ascii=False), sum(len(m["content"]) for m in msgs)
    pref = to_preference(obj)
    msgs = pref.prompt + pref.chosen + pref.rejected
    return json.dumps([pref.prompt, pref.chosen, pref.rejected], ensure_ascii=False), \
        sum(len(m["content"]) for m in msgs)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _count_duplicates(hashes: array) -> int:
    """Records whose content equals an earlier record's (by 64-bit hash)."""
    import numpy as np

    if not hashes:
        return 0
    a = np.frombuffer(hashes, dtype=np.uint64)
    return int(a.size - np.unique(a).size)


def check_file(path: Path, kind: str, text_field: str, report: BadRecordReport, hashes: array,
               max_record_bytes: int = MAX_RECORD_BYTES) -> FileStats:
    """Validate every record of `path` as `kind` ('auto' decides from the first object record)."""
    stats = FileStats(path=str(path), kind="" if kind == "auto" else kind)
    before = dict(report.by_reason)
    counts = ReadCounts()

    def convert(rec: dict) -> tuple[str, int]:
        if not stats.kind:
            stats.kind = guess_kind(rec, text_field)
        return _content_key(rec, stats.kind, text_field)

    for _, _, (key, n_chars) in read_converted(path, convert, report, counts=counts,
                                                max_record_bytes=max_record_bytes):
        stats.chars += n_chars
        hashes.append(_hash64(key))
    stats.records, stats.good, stats.bad = counts.records, counts.good, counts.bad
    stats.bad_by_reason = {k: n - before.get(k, 0) for k, n in report.by_reason.items() if n > before.get(k, 0)}
    return stats


def _line(s: FileStats) -> str:
    reasons = ", ".join(f"{k}: {n}" for k, n in sorted(s.bad_by_reason.items(), key=lambda kv: -kv[1]))
    text = (f"{s.path}: {s.records} records, {s.good} good, {s.bad} bad"
            + (f" ({reasons})" if reasons else "") + f", {s.chars} characters")
    if s.kind:
        text += f", format {s.kind}"
    return text


def check_paths(paths: list[str], kind: str = "auto", text_field: str = "text", max_shown: int = 20,
                out: TextIO | None = None, as_json: bool = False, max_record_bytes: int = MAX_RECORD_BYTES) -> int:
    """Run the check over `paths`; prints the report to `out` (stdout) and returns the exit code."""
    out = out if out is not None else sys.stdout
    report = BadRecordReport(max_shown=max_shown, stream=out)
    total = FileStats(path="total", kind="" if kind == "auto" else kind)
    per_file: list[FileStats] = []
    unreadable = 0
    files: list[Path] = []
    for p in paths:
        try:
            files += expand_inputs([p])
        except DataFileError as e:
            print(f"error: {e}", file=sys.stderr)
            unreadable += 1
    hashes = array("Q")  # 8 bytes per good record, over all files, for duplicates across files too
    for path in files:
        start = len(hashes)
        try:
            s = check_file(path, kind, text_field, report, hashes, max_record_bytes)
        except DataFileError as e:
            print(f"error: {e}", file=sys.stderr)
            unreadable += 1
            del hashes[start:]
            continue
        s.duplicates = _count_duplicates(hashes[start:])
        if s.records == 0:
            print(f"{path}: warning: empty file (no records)", file=out)
        per_file.append(s)
        print(_line(s) + f", {s.duplicates} duplicates", file=out)
        for f in ("records", "good", "bad", "chars"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
    total.duplicates = _count_duplicates(hashes)
    total.bad_by_reason = dict(report.by_reason)
    print(f"total: {len(per_file)} files, " + _line(total).split(": ", 1)[1].split(", format")[0]
          + f", {total.duplicates} duplicates" + (f", {unreadable} unreadable" if unreadable else ""), file=out)
    if as_json:
        print(json.dumps({"files": [asdict(s) for s in per_file], "total": asdict(total),
                          "unreadable": unreadable}, ensure_ascii=False), file=out)
    if unreadable:
        return 2
    return 1 if total.bad else 0


def _cmd_check(args: argparse.Namespace) -> int:
    if args.max_record_bytes < 1:
        print("error: --max-record-bytes must be positive", file=sys.stderr)
        return 2
    return check_paths(args.paths, kind=args.format, text_field=args.field, max_shown=args.max_shown,
                       as_json=args.json, max_record_bytes=args.max_record_bytes)


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("data", "check", "validate jsonl/parquet/csv/txt records (PATH:LINE: reason)",
                            _cmd_check, group_help="data commands: demo corpus, check, pack")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories to check")
    p.add_argument("--field", default="text", help="text field of pretraining records")
    p.add_argument("--format", default="auto", choices=("auto",) + KINDS,
                   help="record layout; auto decides per file from its first record")
    p.add_argument("--max-shown", type=int, default=20, help="bad records listed per file")
    p.add_argument("--json", action="store_true", help="also print the totals as one JSON line")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help="a record (line, row) larger than this is bad, skipped unparsed (bounds memory)")
