"""Streaming record readers for jsonl, parquet, csv and txt files, and the bad-record report.

Every stage that reads data goes through `iter_records`, so a truncated line, invalid UTF-8 or a non-object
is reported the same way everywhere (`PATH:LINE: reason`) and nothing is dropped silently. Readers stream:
memory does not depend on the file size, only on the longest line (jsonl/txt/csv) or one row group (parquet).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, TextIO

BOM = b"\xef\xbb\xbf"

# File suffixes we know how to read, mapped to the reader name.
SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "txt",
}


class DataFileError(Exception):
    """A file cannot be read at all (missing, a directory, unknown format, corrupt parquet). Exit code 2."""


@dataclass
class BadRecord:
    """One record that could not be used; `str()` gives the `PATH:LINE: reason` line users see."""

    path: str
    line: int
    reason: str
    # Short category for the totals ("invalid JSON", "missing field", ...): the reason up to its first colon.
    kind: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = self.reason.split(":", 1)[0].strip()

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def file_format(path: str | Path) -> str:
    """Reader name for `path` from its suffix; raises DataFileError for an unknown suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        known = ", ".join(sorted(SUFFIXES))
        raise DataFileError(f"{path}: unknown file type {suffix!r} (expected one of {known})")
    return SUFFIXES[suffix]


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by `paths`; a directory stands for its readable files (recursively, sorted).

    Raises DataFileError for a missing file or an unknown suffix, before any work starts.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise DataFileError(f"{p}: directory holds no .jsonl/.parquet/.csv/.txt files")
            out.extend(found)
        elif not p.is_file():
            raise DataFileError(f"{p}: no such file")
        else:
            file_format(p)
            out.append(p)
    return out


def _open_binary(path: Path):
    try:
        if path.is_dir():
            raise DataFileError(f"{path}: is a directory")
        return open(path, "rb")
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except PermissionError:
        raise DataFileError(f"{path}: permission denied") from None
    except OSError as e:
        raise DataFileError(f"{path}: cannot open ({e.strerror or e})") from None


def _decode(raw: bytes, path: str, lineno: int) -> str | BadRecord:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(path, lineno, f"invalid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without BOM and line end); handles CRLF and a missing final newline."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            yield lineno, raw


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    name = str(path)
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue  # blank lines are not records (a trailing empty line is common)
        text = _decode(raw, name, lineno)
        if isinstance(text, BadRecord):
            yield lineno, text
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield lineno, BadRecord(name, lineno, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        except RecursionError:
            yield lineno, BadRecord(name, lineno, "invalid JSON: nested too deeply")
            continue
        if not isinstance(obj, dict):
            yield lineno, BadRecord(name, lineno, f"not an object: got a JSON {json_type(obj)}")
            continue
        yield lineno, obj


def _iter_json(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    """A `.json` file: one JSON array of objects (alpaca's layout, read whole: such files are small), or jsonl."""
    with _open_binary(path) as f:
        head = f.read(4096).lstrip(BOM).lstrip()
    if not head.startswith(b"["):
        yield from _iter_jsonl(path)
        return
    name = str(path)
    raw = path.read_bytes().lstrip(BOM)
    text = _decode(raw, name, 1)
    if isinstance(text, BadRecord):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:  # name the line of the bad byte, not just the file
            line = raw[: e.start].count(b"\n") + 1
            yield line, BadRecord(name, line, f"invalid UTF-8: byte 0x{raw[e.start]:02x}; file not read")
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            yield text.count("\n") + 1, BadRecord(name, text.count("\n") + 1, "invalid JSON: array not closed")
            return
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line, BadRecord(name, e.lineno, f"invalid JSON: {e.msg} (column {e.colno}); rest of the array skipped")
            return
        if not isinstance(obj, dict):
            yield line, BadRecord(name, line, f"not an object: got a JSON {json_type(obj)}")
            continue
        yield line, obj


def _iter_txt(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    name = str(path)
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        text = _decode(raw, name, lineno)
        if isinstance(text, str) and not text.strip():
            continue  # a line of Unicode spaces (U+3000, NBSP) is blank too
        yield lineno, text if isinstance(text, BadRecord) else {"text": text}


def _iter_csv(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    name = str(path)
    f = _open_binary(path)
    f.close()
    # surrogateescape keeps undecodable bytes as lone surrogates so one bad row does not abort the file;
    # utf-8-sig drops a BOM. newline="" lets the csv module handle CRLF and quoted newlines itself.
    # The csv module's default 128 KiB field limit would reject long documents.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFileError(f"{name}:1: cannot read CSV header ({e})") from None
        if any(_has_surrogates(h) for h in header):
            raise DataFileError(f"{name}:1: invalid UTF-8 in CSV header")
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, BadRecord(name, start, f"invalid CSV: {e}")
                start = reader.line_num + 1
                continue
            lineno, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if any(_has_surrogates(v) for v in row):
                yield lineno, BadRecord(name, lineno, "invalid UTF-8 in CSV row")
            elif len(row) != len(header):
                yield lineno, BadRecord(name, lineno, f"wrong number of columns: {len(row)}, header has {len(header)}")
            else:
                yield lineno, dict(zip(header, row))


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _iter_parquet(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, dict | BadRecord]]:
    import pyarrow.parquet as pq

    _open_binary(path).close()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataFileError(f"{path}: cannot read parquet ({e})") from None
    if columns is not None:
        columns = [c for c in columns if c in pf.schema_arrow.names] or None
    row = 0
    try:
        # Small batches: memory is one batch of rows, whatever the file size.
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    except Exception as e:
        raise DataFileError(f"{path}: parquet read failed after row {row} ({e})") from None


def iter_records(path: str | Path, columns: list[str] | None = None) -> Iterator[tuple[int, dict | BadRecord]]:
    """Stream (line or row number, record) from a jsonl/json/parquet/csv/txt file; bad lines come as BadRecord.

    A `.json` file may hold one JSON array of objects (alpaca-gpt4-data-zh's layout); its records are numbered
    by the line on which each object starts.

    txt files give `{"text": line}` per non-empty line. Raises DataFileError when the file cannot be read at
    all. `columns` limits the parquet columns read (other formats ignore it).
    """
    path = Path(path)
    kind = file_format(path)
    if kind == "jsonl":
        return _iter_jsonl(path)
    if kind == "json":
        return _iter_json(path)
    if kind == "txt":
        return _iter_txt(path)
    if kind == "csv":
        return _iter_csv(path)
    return _iter_parquet(path, columns)


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages ("a JSON array", "got a number")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class BadRecordReport:
    """Collects bad records: shows the first `max_shown` per file on `stream`, counts them all by reason.

    `max_shown=0` counts without printing (for a second pass over files already reported).
    """

    def __init__(self, max_shown: int = 20, stream: TextIO | None = None) -> None:
        self.max_shown = max_shown
        self._stream = stream
        self.by_reason: Counter[str] = Counter()
        self.by_file: Counter[str] = Counter()

    @property
    def stream(self) -> TextIO:
        # Resolved late so pytest's capsys and redirections see the output.
        return self._stream if self._stream is not None else sys.stderr

    @property
    def total(self) -> int:
        return sum(self.by_file.values())

    def add(self, bad: BadRecord) -> None:
        self.by_reason[bad.kind] += 1
        self.by_file[bad.path] += 1
        if self.by_file[bad.path] <= self.max_shown:
            print(str(bad), file=self.stream)
        elif self.max_shown and self.by_file[bad.path] == self.max_shown + 1:
            print(f"{bad.path}: more bad records not shown (first {self.max_shown} listed)", file=self.stream)

    def summary(self) -> str:
        """One line: `N bad records (reason: n, ...)` or `no bad records`."""
        if not self.total:
            return "no bad records"
        parts = ", ".join(f"{k}: {n}" for k, n in self.by_reason.most_common())
        return f"{self.total} bad record{'s' if self.total != 1 else ''} ({parts})"
