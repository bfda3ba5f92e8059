"""Streaming record readers for jsonl, parquet, csv and txt files, and the bad-record report.

Every stage that reads data goes through `iter_records` (usually by way of `read_converted`), so a truncated
line, invalid UTF-8, a lone surrogate, an integer too long to convert, a record over the size cap or a non-object
is reported the same way everywhere (`PATH:LINE: reason`) and nothing is dropped silently. Readers stream:
memory does not depend on the file size, only on the record size cap (jsonl/txt/csv: a longer record is skipped
in chunks, never held whole) or one batch of rows (parquet). A `.json` array file is read whole.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from matelike.data.formats import RecordError

BOM = b"\xef\xbb\xbf"

# A record (one jsonl/txt line, one csv row, one parquet row, one object of a .json array) larger than this is
# reported bad without being parsed: one 50 MB line otherwise costs gigabytes in json, the tokenizer and SFT.
MAX_RECORD_BYTES = 8 << 20

# A lone UTF-16 surrogate: JSON's `\ud800` escape gives one, and no UTF-8 writer (the tokenizer included)
# accepts it, so a record holding one is bad.
_SURROGATE = re.compile(r"[\ud800-\udfff]")

T = TypeVar("T")

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


def _too_large(path: str, lineno: int, size: int, max_bytes: int, unit: str = "bytes") -> BadRecord:
    return BadRecord(path, lineno, f"record too large: {size} {unit}, more than the limit of {max_bytes}")


def _lines(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | BadRecord]]:
    """(1-based line number, line bytes without BOM and line end); handles CRLF and a missing final newline.

    A line longer than `max_bytes` comes as a "record too large" BadRecord: it is skipped in bounded chunks,
    so memory never holds more than about `max_bytes` of it.
    """
    name = str(path)
    with _open_binary(path) as f:
        lineno = 0
        while True:
            limit = max_bytes + 2 + (len(BOM) if lineno == 0 else 0)  # room for "\r\n" (and a BOM)
            raw = f.readline(limit)
            if not raw:
                return
            lineno += 1
            size = len(raw)
            if size == limit and not raw.endswith(b"\n"):
                tail = raw[-2:]  # the last two bytes read: the line end may straddle two reads
                while True:  # the rest of an over-long line, 1 MiB at a time
                    more = f.readline(1 << 20)
                    size += len(more)
                    tail = (tail + more[-2:])[-2:]
                    if not more or more.endswith(b"\n"):
                        break
                if size > limit:  # (else the file ended: that line may still fit once its ends are cut)
                    size -= tail.endswith(b"\n") + tail.endswith(b"\r\n")  # the line end is not the record
                    size -= len(BOM) if lineno == 1 and raw.startswith(BOM) else 0
                    yield lineno, _too_large(name, lineno, size, max_bytes)
                    continue
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > max_bytes:
                yield lineno, _too_large(name, lineno, len(raw), max_bytes)
                continue
            yield lineno, raw


def _int_digits_limit() -> int:
    return getattr(sys, "get_int_max_str_digits", lambda: 4300)()


def _unicode_problem(obj: object) -> str | None:
    """Reason when a string (value or key) anywhere in `obj` holds a lone surrogate, else None."""
    stack: list[tuple[str, object]] = [("", obj)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                place = f"field {where!r}" if where else "the record"
                return f"invalid Unicode: lone surrogate U+{ord(m.group()):04X} in {place}"
        elif isinstance(v, dict):
            for k, x in v.items():
                if isinstance(k, str) and _SURROGATE.search(k):
                    return f"invalid Unicode: lone surrogate in a field name{f' of {where!r}' if where else ''}"
                stack.append((f"{where}.{k}" if where else str(k), x))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None


# `\uD800`-`\uDFFF` escapes: in JSON only these make a lone surrogate (strict UTF-8 never decodes to one), so a
# record without one skips the walk over its strings. One regex scan is cheaper than two substring searches
# on ensure_ascii text, where "\u" is everywhere.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _may_hold_surrogates(raw: bytes) -> bool:
    return _SURROGATE_ESCAPE.search(raw) is not None


def _checked_object(obj: object, name: str, lineno: int, escapes: bool) -> dict | BadRecord:
    """`obj` when it is a JSON object of valid Unicode, else the BadRecord saying why not."""
    if not isinstance(obj, dict):
        return BadRecord(name, lineno, f"not an object: got a JSON {json_type(obj)}")
    problem = _unicode_problem(obj) if escapes else None
    return BadRecord(name, lineno, problem) if problem else obj


def _parse_line(text: str, name: str, lineno: int, escapes: bool) -> dict | BadRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRecord(name, lineno, f"invalid JSON: {e.msg} (column {e.colno})")
    except RecursionError:
        return BadRecord(name, lineno, "invalid JSON: nested too deeply")
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        return BadRecord(name, lineno, f"invalid JSON: integer too long (more than {_int_digits_limit()} digits)")
    return _checked_object(obj, name, lineno, escapes)


def _iter_jsonl(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, dict | BadRecord]]:
    name = str(path)
    for lineno, raw in _lines(path, max_bytes):
        if isinstance(raw, BadRecord):
            yield lineno, raw
            continue
        if not raw.strip():
            continue  # blank lines are not records (a trailing empty line is common)
        text = _decode(raw, name, lineno)
        if isinstance(text, BadRecord):
            yield lineno, text
            continue
        yield lineno, _parse_line(text, name, lineno, _may_hold_surrogates(raw))


# Finds where an object with an over-long integer ends, so a `.json` array goes on after it.
_LENIENT = json.JSONDecoder(parse_int=lambda digits: 0)


def _iter_json(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, dict | BadRecord]]:
    """A `.json` file: one JSON array of objects (alpaca's layout, read whole: such files are small), or jsonl.

    Objects larger than `max_bytes` are bad records (parsed, as the array must be, but not passed on).
    """
    with _open_binary(path) as f:
        head = f.read(4096).lstrip(BOM).lstrip()
    if not head.startswith(b"["):
        yield from _iter_jsonl(path, max_bytes)
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
    escapes = _may_hold_surrogates(raw)
    del raw  # the decoded text is all the parser needs
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
        start = pos
        big_int = False
        try:
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                raise
            except ValueError:  # an integer over the digit limit: find where the element ends, to skip just it
                big_int = True
                obj, pos = _LENIENT.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line, BadRecord(name, e.lineno, f"invalid JSON: {e.msg} (column {e.colno}); rest of the array skipped")
            return
        except RecursionError:
            yield line, BadRecord(name, line, "invalid JSON: nested too deeply; rest of the array skipped")
            return
        if big_int:
            yield line, BadRecord(name, line, f"invalid JSON: integer too long (more than {_int_digits_limit()} digits)")
            continue
        n = pos - start  # characters; UTF-8 bytes are at least as many and at most 4 times as many
        if n > max_bytes or (4 * n > max_bytes and len(text[start:pos].encode("utf-8", "surrogatepass")) > max_bytes):
            yield line, _too_large(name, line, len(text[start:pos].encode("utf-8", "surrogatepass")), max_bytes)
            continue
        yield line, _checked_object(obj, name, line, escapes)


def _iter_txt(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, dict | BadRecord]]:
    name = str(path)
    for lineno, raw in _lines(path, max_bytes):
        if isinstance(raw, BadRecord):
            yield lineno, raw
            continue
        if not raw.strip():
            continue
        text = _decode(raw, name, lineno)
        if isinstance(text, str) and not text.strip():
            continue  # a line of Unicode spaces (U+3000, NBSP) is blank too
        yield lineno, text if isinstance(text, BadRecord) else {"text": text}


class _RecordTooLarge(Exception):
    """Raised by `_CsvLines` for a CSV record over the cap, after skipping to its end."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _CsvLines:
    """The physical lines of a text file for `csv.reader`, at most `max_chars` per record.

    A record (one or more lines: quoted fields hold newlines) over the cap is skipped to its end, found by
    counting quote characters (a record ends at a line end with an even count), in bounded chunks; then
    `_RecordTooLarge` is raised, which csv.reader passes on and after which it reads on normally. `line` counts
    the physical lines consumed, skipped ones included.
    """

    def __init__(self, fh: TextIO, max_chars: int) -> None:
        self.fh = fh
        self.max_chars = max_chars
        self.line = 0
        self._used = 0  # characters of the current record so far
        self._quotes = 0

    def __iter__(self) -> "_CsvLines":
        return self

    def new_record(self) -> None:
        self._used = self._quotes = 0

    def __next__(self) -> str:
        s = self.fh.readline(self.max_chars - self._used + 1)
        if not s:
            raise StopIteration
        self._used += len(s)
        self._quotes += s.count('"')
        if self._used <= self.max_chars:  # a whole line (or the end of the file) within the budget
            self.line += 1
            return s
        while True:  # the rest of this record, 1 MiB at a time
            if s.endswith(("\n", "\r")) or not s:
                self.line += bool(s)
                if self._quotes % 2 == 0 or not s:
                    break
            s = self.fh.readline(1 << 20)
            self._used += len(s)
            self._quotes += s.count('"')
        raise _RecordTooLarge(self._used)


def _iter_csv(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, dict | BadRecord]]:
    name = str(path)
    f = _open_binary(path)
    f.close()
    # surrogateescape keeps undecodable bytes as lone surrogates so one bad row does not abort the file;
    # utf-8-sig drops a BOM. newline="" lets the csv module handle CRLF and quoted newlines itself.
    # The csv module's default 128 KiB field limit would reject long documents; `_CsvLines` bounds records.
    # The cap counts characters here (a record of at most max_bytes characters holds at most 4x the bytes).
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        src = _CsvLines(fh, max_bytes)
        reader = csv.reader(src)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFileError(f"{name}:1: cannot read CSV header ({e})") from None
        except _RecordTooLarge:
            raise DataFileError(f"{name}:1: CSV header longer than {max_bytes} characters") from None
        if any(_has_surrogates(h) for h in header):
            raise DataFileError(f"{name}:1: invalid UTF-8 in CSV header")
        while True:
            src.new_record()
            lineno = src.line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield lineno, BadRecord(name, lineno, f"invalid CSV: {e}")
                continue
            except _RecordTooLarge as e:
                yield lineno, _too_large(name, lineno, e.size, max_bytes, "characters")
                continue
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


def _parquet_rows(batch, name: str, first: int, max_bytes: int) -> list[dict | BadRecord]:
    """The rows of one record batch as dicts; rows over the cap or with invalid UTF-8 as BadRecords."""
    big: dict[int, int] = {}
    if batch.nbytes > max_bytes:  # only then can one row exceed the cap
        for i in range(batch.num_rows):
            size = batch.slice(i, 1).nbytes
            if size > max_bytes:
                big[i] = size
    if not big:
        try:
            return batch.to_pylist()
        except UnicodeDecodeError:
            pass  # pyarrow does not validate strings read from a file: convert row by row to find the bad ones
    out: list[dict | BadRecord] = []
    for i in range(batch.num_rows):
        if i in big:
            out.append(_too_large(name, first + i, big[i], max_bytes))
            continue
        try:
            out.append(batch.slice(i, 1).to_pylist()[0])
        except UnicodeDecodeError as e:
            out.append(BadRecord(name, first + i, f"invalid UTF-8: byte 0x{e.object[e.start]:02x} in a string column"))
    return out


def _iter_parquet(path: Path, columns: list[str] | None = None,
                  max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, dict | BadRecord]]:
    import pyarrow.parquet as pq

    _open_binary(path).close()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataFileError(f"{path}: cannot read parquet ({e})") from None
    if columns is not None:
        columns = [c for c in columns if c in pf.schema_arrow.names] or None
    name = str(path)
    row = 0
    try:
        # Small batches: memory is one batch of rows, whatever the file size.
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for rec in _parquet_rows(batch, name, row + 1, max_bytes):
                row += 1
                yield row, rec
    except Exception as e:
        raise DataFileError(f"{path}: parquet read failed after row {row} ({e})") from None


def iter_records(path: str | Path, columns: list[str] | None = None, *,
                 max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, dict | BadRecord]]:
    """Stream (line or row number, record) from a jsonl/json/parquet/csv/txt file; bad lines come as BadRecord.

    A `.json` file may hold one JSON array of objects (alpaca-gpt4-data-zh's layout); its records are numbered
    by the line on which each object starts.

    txt files give `{"text": line}` per non-empty line. Raises DataFileError when the file cannot be read at
    all. `columns` limits the parquet columns read (other formats ignore it). A record over `max_record_bytes`
    is a "record too large" BadRecord, skipped without being parsed (csv counts characters).
    """
    path = Path(path)
    kind = file_format(path)
    if kind == "jsonl":
        return _iter_jsonl(path, max_record_bytes)
    if kind == "json":
        return _iter_json(path, max_record_bytes)
    if kind == "txt":
        return _iter_txt(path, max_record_bytes)
    if kind == "csv":
        return _iter_csv(path, max_record_bytes)
    return _iter_parquet(path, columns, max_record_bytes)


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


@dataclass
class ReadCounts:
    """What `read_converted` saw: every record read is either good or bad."""

    records: int = 0
    good: int = 0
    bad: int = 0


def read_converted(
    paths: str | Path | Iterable[str | Path],
    convert: Callable[[dict], T],
    report: BadRecordReport,
    *,
    counts: ReadCounts | None = None,
    columns: list[str] | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[tuple[str, int, T]]:
    """(path, line, convert(record)) for every good record of `paths` (files or directories), in order.

    The one loop every reader of records uses: a record the file reader rejects, or for which `convert` raises
    `RecordError`, goes to `report` as `PATH:LINE: reason` and is counted bad; nothing is dropped silently.
    `counts`, when given, is updated as records are read (per call: pass a fresh one per file for per-file
    figures). Raises DataFileError for a file that cannot be read at all.
    """
    counts = counts if counts is not None else ReadCounts()
    for path in expand_inputs([paths] if isinstance(paths, (str, Path)) else paths):
        name = str(path)
        for line, rec in iter_records(path, columns, max_record_bytes=max_record_bytes):
            counts.records += 1
            if not isinstance(rec, BadRecord):
                try:
                    value = convert(rec)
                except RecordError as e:
                    rec = BadRecord(name, line, e.reason)
                else:
                    counts.good += 1
                    yield name, line, value
                    continue
            counts.bad += 1
            report.add(rec)
