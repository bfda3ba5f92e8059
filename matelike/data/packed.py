"""Instruction data packed once: `matelike data pack --format sft|dpo|prompts`, and the readers of its files.

`matelike sft` and `matelike dpo` on raw records read and tokenize the whole file at every start, on every
rank. Packed, the chat-template rendering, the assistant-only mask, the oldest-turn dropping for `--seq-len`
and the bad-record report happen once; every run and rank then memory-maps the same file.

Layout: `FILE.bin` holds named sections one after another (each starting at a 64-byte boundary), and
`FILE.bin.json` says where (`sections: {name: {dtype, offset, count}}`), with the kind, tokenizer hash,
seq-len, counts and the bad-record totals. Sections per kind:
- sft: `ids` (uint16, or uint32 past 65536 ids), `mask` (uint8, 1 on assistant tokens), `offsets` (int64,
  n + 1: sample i is `ids[offsets[i]:offsets[i+1]]`), exactly the arrays of `SFTSamples`.
- dpo: the same three for `chosen_*` and `rejected_*` (pair i is sample i of both).
- prompts: `ids`/`offsets` of the prompt rendered with the chat template and the generation prompt, and
  `fields`/`field_offsets`: the record's other fields (`answer`, `task`, ...) as UTF-8 JSON, one per prompt.

Parallelism is the pretraining packer's: the main process reads records in order (the one record reader, so
bad records are reported there, in order), workers render chunks of records, results are written in
submission order; each record is rendered on its own, so the bytes are the same whatever the worker count.
A chunk of any kind is encoded in one `encode_batch` call (`Tokenizer.encode_chat_batch`) and sft and dpo
chunks are fitted to the seq-len with numpy (`fit_batch`): per-message encode calls and per-token Python made
packing 0.3-0.4x of the tokenizer's own speed (`matelike bench sft-data`); the samples are the same as
`fit_messages` (and `render_pair`, `encode_chat`) give.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from matelike.data.records import (
    MAX_RECORD_BYTES,
    BadRecordReport,
    ReadCounts,
    expand_inputs,
    read_converted,
)

if TYPE_CHECKING:
    from matelike.data.preference import PreferencePairs
    from matelike.data.sft import SFTSamples
    from matelike.tokenizer import Tokenizer

KINDS = ("sft", "dpo", "prompts")
FORMAT_VERSION = 1
CHUNK_RECORDS = 512  # records per work item: enough to amortise pickling, small enough to keep memory flat
ALIGN = 64


class PackMismatchError(ValueError):
    """A packed file that does not fit the run (other tokenizer, larger seq-len, other kind)."""


# ---- converting records (main process) and rendering them (workers) ---------------------------------------

def prompt_record(rec: dict) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, the other fields as JSON) of a `{prompt, ...}` or `{messages|conversations, ...}` record.

    The prompt is a string (a user turn, after an optional `system`) or a message list ending in a user turn.
    """
    from matelike.data.formats import (
        RecordError,
        _message_list,
        _string,
        _system,
        check_conversation,
    )

    if "prompt" in rec:
        key = "prompt"
        value = rec["prompt"]
        messages = (_system(rec) + [{"role": "user", "content": _string(rec, "prompt")}]
                    if isinstance(value, str) or value is None else _message_list(value, "prompt"))
    elif "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        messages = _message_list(rec[key], key)
    else:
        raise RecordError("missing field: 'prompt' (or 'messages'/'conversations')")
    check_conversation(messages, need_final_assistant=False)
    if messages[-1]["role"] != "user":
        raise RecordError(f"bad turn order: {key!r} does not end with a user turn")
    fields = {k: v for k, v in rec.items() if k != key}
    return messages, json.dumps(fields, ensure_ascii=False)


def _converter(kind: str, layout: str) -> Any:
    if kind == "sft":
        from matelike.data.sft import sft_converter

        return sft_converter(layout)
    if kind == "dpo":
        from matelike.data.formats import to_preference

        return to_preference
    return prompt_record


def render_chunk(tokenizer: "Tokenizer", kind: str, seq_len: int, items: list, dtype: np.dtype) -> Any:
    """Render one chunk of converted records: per record the arrays to write (or the reason it is dropped).

    Every kind encodes the whole chunk in one `encode_chat_batch` call. sft is fitted with numpy (`fit_batch`)
    and comes back as flat arrays: (layouts, reasons, turns dropped, ids, mask, lengths of the kept samples);
    dpo (`render_pairs`) and prompts come back per record.
    """
    out: list = []
    if kind == "sft":
        from matelike.data.sft import fit_batch

        conversations = [messages for _, messages in items]
        fit = fit_batch(tokenizer.encode_chat_batch(conversations), conversations, seq_len)
        return ([layout for layout, _ in items], fit.reasons, fit.turns_dropped, fit.ids.astype(dtype),
                fit.mask, fit.lengths)
    if kind == "dpo":
        from matelike.data.preference import render_pairs

        for r in render_pairs(tokenizer, items, seq_len):
            out.append(None if r is None else (r[0], [(i.astype(dtype), m) for i, m in r[1]]))
    else:
        batch = tokenizer.encode_chat_batch([messages for messages, _ in items], add_generation_prompt=True)
        for c, (_, fields) in enumerate(items):
            ids = batch.conversation(c)[0]
            out.append(None if seq_len and len(ids) > seq_len else (ids.astype(dtype), fields))
    return out


class _Worker:
    """State of one pool process: the tokenizer, loaded once."""

    tokenizer: "Tokenizer | None" = None


def _init_worker(tokenizer_dir: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    from matelike.tokenizer import Tokenizer

    _Worker.tokenizer = Tokenizer.load(tokenizer_dir)


def _render_in_worker(kind: str, seq_len: int, items: list, dtype: str) -> list:
    assert _Worker.tokenizer is not None
    return render_chunk(_Worker.tokenizer, kind, seq_len, items, np.dtype(dtype))


def _ordered(tokenizer_dir: Path, tokenizer: "Tokenizer", kind: str, seq_len: int, chunks: Iterable[list],
             dtype: np.dtype, workers: int) -> Iterator[list]:
    """Rendered chunks in input order, at most 2 per worker in flight (memory flat in the input size)."""
    if workers <= 1:
        # Two threads render while this one reads and converts the next chunk: the Rust encoder releases the GIL,
        # so one thread's Python work (building pieces, fitting) runs while the other's chunk is encoded (on as
        # many cores as the tokenizer uses: RAYON_RS_NUM_CPUS bounds them).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as ex:
            waiting: deque = deque()
            for items in chunks:
                waiting.append(ex.submit(render_chunk, tokenizer, kind, seq_len, items, dtype))
                if len(waiting) >= 3:
                    yield waiting.popleft().result()
            while waiting:
                yield waiting.popleft().result()
        return
    import multiprocessing as mp

    # spawn: a fresh interpreter per worker, safe whatever threads the parent (tokenizers, torch) started.
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        pending: deque = deque()
        for items in chunks:
            pending.append(pool.apply_async(_render_in_worker, (kind, seq_len, items, dtype.str)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- writing ---------------------------------------------------------------------------------------------

class _Sections:
    """Named sections appended to one temporary file each, joined into FILE.bin at the end."""

    def __init__(self, names: Sequence[str], dtypes: Sequence[np.dtype], where: Path) -> None:
        self.names = list(names)
        self.dtypes = dict(zip(names, dtypes))
        self.counts = dict.fromkeys(names, 0)
        self.files = {n: open(where / f"{n}.part", "wb") for n in names}

    def write(self, name: str, arr: np.ndarray) -> None:
        self.files[name].write(np.ascontiguousarray(arr, dtype=self.dtypes[name]).tobytes())
        self.counts[name] += int(arr.size)

    def join(self, out: Path) -> tuple[dict, str, int]:
        """Write FILE.bin (via a tmp file); returns the section table, sha256 of the file and its size."""
        layout: dict[str, dict] = {}
        h = hashlib.sha256()
        tmp = out.with_name(out.name + ".tmp")
        pos = 0
        with open(tmp, "wb") as dst:
            for n in self.names:
                self.files[n].close()
                pad = -pos % ALIGN
                dst.write(b"\0" * pad)
                h.update(b"\0" * pad)
                pos += pad
                layout[n] = {"dtype": self.dtypes[n].str, "offset": pos, "count": self.counts[n]}
                with open(self.files[n].name, "rb") as src:
                    while block := src.read(1 << 22):
                        dst.write(block)
                        h.update(block)
                        pos += len(block)
        os.replace(tmp, out)
        return layout, h.hexdigest(), pos

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def pack_chat(
    tokenizer_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    kind: str,
    *,
    seq_len: int | None,
    layout: str = "auto",
    workers: int = 1,
    report: BadRecordReport | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
    progress: bool = True,
) -> dict:
    """Pack `inputs` as `kind` (sft, dpo or prompts) into `out` + `out.json`; returns the meta.

    `seq_len` is required for sft and dpo (it decides truncation); for prompts it is optional and drops the
    prompts longer than it. Raises ValueError for bad arguments; writes nothing when no record is usable.
    """
    from tqdm import tqdm

    from matelike.data.pack import NoDocumentsError, token_dtype
    from matelike.tokenizer import Tokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown pack format {kind!r}; choose one of {', '.join(KINDS)}")
    if kind != "prompts" and not seq_len:
        raise ValueError(f"--format {kind} needs --seq-len (the run's sequence length; truncation depends on it)")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len must be at least 1, got {seq_len}")
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    report = report if report is not None else BadRecordReport()
    paths = expand_inputs(inputs)
    out = Path(out)
    if any(p.resolve() == out.resolve() for p in paths):
        raise ValueError("the output file is also an input file")
    out.parent.mkdir(parents=True, exist_ok=True)
    convert = _converter(kind, layout)
    counts = ReadCounts()
    t0 = time.perf_counter()
    total_bytes = sum(p.stat().st_size for p in paths)

    def chunks(bar) -> Iterator[list]:
        items: list = []
        for _, _, item in read_converted(paths, convert, report, counts=counts, max_record_bytes=max_record_bytes):
            items.append(item)
            if len(items) >= CHUNK_RECORDS:
                bar.update(counts.records - bar.n)
                yield items
                items = []
        if items:
            yield items
        bar.update(counts.records - bar.n)

    if kind == "sft":
        names, dts = ["ids", "mask", "offsets"], [dtype, np.dtype(np.uint8), np.dtype("<i8")]
    elif kind == "dpo":
        names = [f"{s}_{a}" for s in ("chosen", "rejected") for a in ("ids", "mask", "offsets")]
        dts = [dtype, np.dtype(np.uint8), np.dtype("<i8")] * 2
    else:
        names, dts = ["ids", "offsets", "fields", "field_offsets"], [dtype, np.dtype("<i8"), np.dtype(np.uint8),
                                                                     np.dtype("<i8")]
    stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=out.name + ".", dir=out.parent) as tmpdir:
        sections = _Sections(names, dts, Path(tmpdir))
        ends = {n: 0 for n in names if n.endswith("offsets")}
        for n in ends:
            sections.write(n, np.zeros(1, np.int64))
        try:
            with tqdm(unit=" records", desc=f"packing {kind}", disable=not progress, file=sys.stderr) as bar:
                for rendered in _ordered(tokenizer_dir, tokenizer, kind, seq_len or 0, chunks(bar), dtype, workers):
                    _write_chunk(kind, rendered, sections, ends, stats)
        except BaseException:
            sections.close()
            raise
        kept = sections.counts["offsets" if kind != "dpo" else "chosen_offsets"] - 1
        if kept == 0:
            sections.close()
            raise NoDocumentsError(f"nothing packed: no usable {kind} record in {', '.join(map(str, paths))} "
                                   f"({counts.records} records read, {report.summary()})")
        table, digest, size = sections.join(out)
    stats.update(records=counts.records, bad=counts.bad)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "seq_len": seq_len,
        "layout": layout if kind == "sft" else None,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer": str(tokenizer_dir.resolve()),
        "count": kept,
        "stats": stats,
        "bad_records": {"total": report.total, "by_reason": dict(report.by_reason), "by_file": dict(report.by_file)},
        "sections": table,
        "file_bytes": size,
        "sha256": digest,
        "sources": [{"path": str(p), "bytes": p.stat().st_size} for p in paths],
    }
    Path(str(out) + ".json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    meta["input_bytes"] = total_bytes
    return meta


def _write_chunk(kind: str, rendered: list, sections: _Sections, ends: dict[str, int], stats: dict) -> None:
    """Append one rendered chunk and count what happened to each record (SFTStats / PreferenceStats fields)."""
    def add(key: str, n: int = 1) -> None:
        stats[key] = stats.get(key, 0) + n

    def sample(prefix: str, ids: np.ndarray, mask: np.ndarray | None) -> None:
        sections.write(prefix + "ids", ids)
        if mask is not None:
            sections.write(prefix + "mask", mask)
        ends[prefix + "offsets"] += ids.size
        sections.write(prefix + "offsets", np.array([ends[prefix + "offsets"]], np.int64))

    if kind == "sft":
        layouts, reasons, turns, ids, mask, lengths = rendered
        stops = np.cumsum(lengths)
        seen = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # loss tokens before each position
        formats = stats.setdefault("formats", {})
        for layout, n in Counter(layouts).items():
            formats[layout] = formats.get(layout, 0) + n
        # Counts of the chunk; a key joins the meta when the first record needs it (`list.index`), so the keys
        # come in the order the records first need them, whatever the chunks.
        firsts = {r: reasons.index(r) for r in ("", "no_answer", "too_long") if r in reasons}
        for reason in sorted(firsts, key=firsts.__getitem__):
            if reason:
                add("dropped_no_answer" if reason == "no_answer" else "dropped_too_long", reasons.count(reason))
                continue
            kept = np.asarray(turns)[np.asarray(reasons) == ""]
            add("samples", len(lengths))
            add("truncated", int(np.count_nonzero(kept)))
            add("turns_dropped", int(kept.sum()))
            add("tokens", int(lengths.sum()) - len(lengths))
            # Loss positions of a sample: its mask from the second token on (the first token is never a target).
            add("loss_tokens", int((seen[stops] - seen[stops - lengths + 1]).sum()))
        sections.write("ids", ids)
        sections.write("mask", mask)
        sections.write("offsets", ends["offsets"] + stops)
        ends["offsets"] += int(ids.size)
        return
    for r in rendered:
        if kind == "dpo":
            if r is None:
                add("dropped_too_long")
                continue
            dropped, sides = r
            add("pairs")
            add("truncated", bool(dropped))
            add("tokens", sides[0][0].size + sides[1][0].size - 2)
            for prefix, (ids, mask) in zip(("chosen_", "rejected_"), sides):
                sample(prefix, ids, mask)
        else:
            if r is None:
                add("dropped_too_long")
                continue
            ids, fields = r
            add("prompts")
            add("tokens", ids.size)
            sample("", ids, None)
            raw = np.frombuffer(fields.encode("utf-8"), dtype=np.uint8)
            sections.write("fields", raw)
            ends["field_offsets"] += raw.size
            sections.write("field_offsets", np.array([ends["field_offsets"]], np.int64))


# ---- reading ---------------------------------------------------------------------------------------------

def packed_kind(path: str | Path) -> str | None:
    """The kind of a packed instruction file (`sft`, `dpo`, `prompts`), or None when `path` is not one."""
    meta = Path(str(path) + ".json")
    if not Path(path).is_file() or not meta.is_file():
        return None
    try:
        kind = json.loads(meta.read_text(encoding="utf-8")).get("kind")
    except (ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


class PackedFile:
    """A packed instruction file: its meta and its sections as read-only memory maps (nothing loaded)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = Path(str(self.path) + ".json")
        if not meta_path.is_file():
            raise PackMismatchError(f"{meta_path}: missing meta file (pack with `matelike data pack --format ...`)")
        try:
            self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise PackMismatchError(f"{meta_path}: not a pack meta file ({e})") from e
        if self.meta.get("kind") not in KINDS or self.meta.get("format_version") != FORMAT_VERSION:
            raise PackMismatchError(f"{meta_path}: not a packed instruction file of format version {FORMAT_VERSION}")
        size = self.path.stat().st_size
        if size != self.meta["file_bytes"]:
            raise PackMismatchError(f"{self.path}: {size} bytes, but {meta_path.name} says {self.meta['file_bytes']} "
                                    f"(a partial copy?)")

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __len__(self) -> int:
        return int(self.meta["count"])

    def array(self, name: str) -> np.ndarray:
        s = self.meta["sections"][name]
        if s["count"] == 0:
            return np.zeros(0, dtype=np.dtype(s["dtype"]))
        return np.memmap(self.path, dtype=np.dtype(s["dtype"]), mode="r", offset=s["offset"], shape=(s["count"],))

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of a section, read with a plain file read: a pass over a whole section goes
        through the page cache without growing the process's resident memory, as touching a map would."""
        s = self.meta["sections"][name]
        dtype = np.dtype(s["dtype"])
        start, stop = max(0, start), min(stop, s["count"])
        if stop <= start:
            return np.zeros(0, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(s["offset"] + start * dtype.itemsize)
            raw = f.read((stop - start) * dtype.itemsize)
        if len(raw) != (stop - start) * dtype.itemsize:
            raise PackMismatchError(f"{self.path}: section {name!r} ends early (a partial copy?)")
        return np.frombuffer(raw, dtype=dtype)

    def check(self, kind: str, tokenizer: "Tokenizer | None" = None, seq_len: int | None = None) -> None:
        """Refuse, with a message saying what to do, a file of another kind, tokenizer or a larger seq-len."""
        if self.kind != kind:
            raise PackMismatchError(f"{self.path}: packed as --format {self.kind}, this command reads {kind}")
        if tokenizer is not None and self.meta["tokenizer_sha256"] != tokenizer.sha256:
            raise PackMismatchError(
                f"{self.path}: packed with another tokenizer ({self.meta['tokenizer']}, sha256 "
                f"{self.meta['tokenizer_sha256'][:12]}) than the model's (sha256 {tokenizer.sha256[:12]}); "
                f"re-pack with --tokenizer set to the model directory")
        packed = self.meta.get("seq_len")
        if seq_len is not None and packed and packed > seq_len:
            raise PackMismatchError(
                f"{self.path}: packed for --seq-len {packed}, more than this run's {seq_len}; its samples would have "
                f"to be re-cut: re-pack with --seq-len {seq_len} (or run with --seq-len {packed})")


def open_sft(path: str | Path, tokenizer: "Tokenizer", seq_len: int) -> tuple["SFTSamples", PackedFile]:
    """The samples of a packed SFT file, memory-mapped, checked against the run's tokenizer and seq-len."""
    from matelike.data.sft import SFTSamples

    f = PackedFile(path)
    f.check("sft", tokenizer, seq_len)
    return SFTSamples(f.array("ids"), f.array("mask"), f.array("offsets")), f


def open_pairs(path: str | Path, tokenizer: "Tokenizer", seq_len: int) -> tuple["PreferencePairs", PackedFile]:
    """The pairs of a packed DPO file, memory-mapped; the file's sha256 fingerprints them for the reference cache."""
    from matelike.data.preference import PreferencePairs
    from matelike.data.sft import SFTSamples

    f = PackedFile(path)
    f.check("dpo", tokenizer, seq_len)
    sides = [SFTSamples(f.array(f"{s}_ids"), f.array(f"{s}_mask"), f.array(f"{s}_offsets"))
             for s in ("chosen", "rejected")]
    return PreferencePairs(sides[0], sides[1], fingerprint=f.meta["sha256"]), f


class PackedPrompts:
    """RL prompts of a packed file: prompt i's token ids (chat template + generation prompt) and its fields.

    Random access reads from the memory maps; `scan` streams the lengths and fields in chunks with plain reads
    and checks the offsets on the way, so a damaged file is refused by the pass that reads it."""

    SCAN_CHUNK = 4096  # records per read of a scan

    def __init__(self, path: str | Path, tokenizer: "Tokenizer | None" = None, seq_len: int | None = None) -> None:
        self.file = PackedFile(path)
        self.file.check("prompts", tokenizer, seq_len)
        sections, n = self.file.meta["sections"], len(self.file)
        for offsets, data in (("offsets", "ids"), ("field_offsets", "fields")):
            if sections[offsets]["count"] != n + 1:
                raise PackMismatchError(f"{self.file.path}: {sections[offsets]['count']} {offsets} for {n} prompts; "
                                        f"the file is damaged: re-pack it")
            first, last = self.file.read(offsets, 0, 1)[0], self.file.read(offsets, n, n + 1)[0]
            if first != 0 or last != sections[data]["count"]:
                raise PackMismatchError(f"{self.file.path}: {offsets} run from {first} to {last} over "
                                        f"{sections[data]['count']} {data}; the file is damaged: re-pack it")
        self._ids, self._offsets = self.file.array("ids"), self.file.array("offsets")
        self._fields, self._field_offsets = self.file.array("fields"), self.file.array("field_offsets")

    def __len__(self) -> int:
        return len(self.file)

    def prompt_ids(self, i: int) -> np.ndarray:
        return np.asarray(self._ids[self._offsets[i]:self._offsets[i + 1]], dtype=np.int64)

    def fields(self, i: int) -> dict:
        raw = self._fields[self._field_offsets[i]:self._field_offsets[i + 1]]
        return self._parse(i, bytes(raw))

    def _parse(self, i: int, raw: bytes) -> dict:
        try:
            fields = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError included
            raise PackMismatchError(f"{self.file.path}: record {i + 1}: its fields are not JSON ({e}); the file is "
                                    f"damaged: re-pack it") from None
        if not isinstance(fields, dict):
            raise PackMismatchError(f"{self.file.path}: record {i + 1}: its fields are not a JSON object; the file "
                                    f"is damaged: re-pack it")
        return fields

    def scan(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, dict]]:
        """(record, prompt length in tokens, fields) of records [start, stop), read a chunk at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        for a in range(start, stop, self.SCAN_CHUNK):
            b = min(a + self.SCAN_CHUNK, stop)
            offsets, field_offsets = self.file.read("offsets", a, b + 1), self.file.read("field_offsets", a, b + 1)
            lengths, sizes = np.diff(offsets), np.diff(field_offsets)
            if (lengths < 0).any() or (sizes < 0).any():
                bad = a + int(np.flatnonzero((lengths < 0) | (sizes < 0))[0])
                raise PackMismatchError(f"{self.file.path}: record {bad + 1}: offsets run backwards; the file is "
                                        f"damaged: re-pack it")
            blob = self.file.read("fields", int(field_offsets[0]), int(field_offsets[-1])).tobytes()
            ends = (field_offsets - field_offsets[0]).tolist()
            for j, n in enumerate(lengths.tolist()):
                yield a + j, n, self._parse(a + j, blob[ends[j]:ends[j + 1]])
