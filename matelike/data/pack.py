"""`matelike data pack`: tokenize pretraining text into a flat memmap, and `TokenFile` to read it back.

Layout: the token ids of each document followed by `<|endoftext|>`, all documents in input order, as raw
uint16 (uint32 when the vocabulary exceeds 65536 ids), little-endian as numpy writes them on x86 and ARM.
`FILE.bin.json` holds the metadata (dtype, token and document counts, UTF-8 bytes of the text for
bits-per-byte, tokenizer hash, sources).

Parallelism: the main process streams records and cuts them into chunks of documents. With one worker
(the default) a thread encodes each chunk in-process, the Rust library spreading the batch over every core,
while the main thread reads the next chunk; with N > 1 workers, N processes encode chunks. Either way the
main process writes results in submission order and each document is encoded on its own, so the output is
byte-identical whatever the worker count. At most 2 chunks per worker are in flight, so memory stays flat
in the input size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from matelike.data.records import MAX_RECORD_BYTES, BadRecordReport, DataFileError, expand_inputs
from matelike.data.sft import FORMAT_CHOICES

if TYPE_CHECKING:
    from matelike.cli import CommandTable
    from matelike.tokenizer import Tokenizer

FORMAT_VERSION = 1
DEFAULT_CHUNK_CHARS = 1 << 20  # about 1M characters per work item: large enough to amortise pickling


class NoDocumentsError(ValueError):
    """Not one usable document to pack: nothing is written (exit code 1)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_documents(tokenizer: "Tokenizer", texts: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """Flat array: each document's ids followed by `<|endoftext|>`."""
    eot = [tokenizer.eos_id]
    ids = tokenizer.encode_batch(texts)
    count = sum(len(x) for x in ids) + len(ids)
    return np.fromiter(chain.from_iterable(chain.from_iterable((x, eot) for x in ids)), dtype=dtype, count=count)


class _Worker:
    """State of one pool process: the tokenizer, loaded once (see `_init_worker`)."""

    tokenizer: "Tokenizer | None" = None


def _init_worker(tokenizer_dir: str) -> None:
    # Each process encodes serially; parallelism comes from the processes, not from Rust threads on top.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from matelike.tokenizer import Tokenizer

    _Worker.tokenizer = Tokenizer.load(tokenizer_dir)


def _encode_chunk(texts: list[str], dtype: str) -> np.ndarray:
    assert _Worker.tokenizer is not None
    return encode_documents(_Worker.tokenizer, texts, np.dtype(dtype))


Chunk = tuple[int, list[str], int]  # (split: 0 train / 1 val, document texts, their UTF-8 bytes)


def _ordered_map(tokenizer_dir: Path, tokenizer: "Tokenizer", chunks: Iterable[Chunk], dtype: np.dtype,
                 workers: int) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Encode chunks, in input order, with at most 2*workers chunks in flight (flat memory)."""
    if workers <= 1:
        # In-process: the Rust library encodes a batch on all cores (it releases the GIL), while this thread
        # reads and parses the next chunk.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as ex:
            waiting: deque = deque()
            for chunk in chunks:
                waiting.append((chunk, ex.submit(encode_documents, tokenizer, chunk[1], dtype)))
                if len(waiting) >= 2:
                    done, fut = waiting.popleft()
                    yield done, fut.result()
            while waiting:
                done, fut = waiting.popleft()
                yield done, fut.result()
        return
    import multiprocessing as mp

    # spawn: a fresh interpreter per worker, safe whatever threads the parent (tokenizers, torch) has started.
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_chunk, (chunk[1], dtype.str))))
            if len(pending) >= 2 * workers:
                done, res = pending.popleft()
                yield done, res.get()
        while pending:
            done, res = pending.popleft()
            yield done, res.get()


@dataclass
class _Output:
    """One output file being written (train or val): a tmp file renamed into place at the end."""

    path: Path
    tokens: int = 0
    documents: int = 0
    text_bytes: int = 0
    text_chars: int = 0
    sources: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.fh = open(self.tmp, "wb")

    def write(self, texts: list[str], arr: np.ndarray, n_bytes: int) -> None:
        self.fh.write(arr.tobytes())
        self.tokens += int(arr.size)
        self.documents += len(texts)
        self.text_chars += sum(len(t) for t in texts)
        self.text_bytes += n_bytes

    def finish(self, meta: dict) -> dict:
        self.fh.close()
        meta = {**meta, "tokens": self.tokens, "documents": self.documents, "text_bytes": self.text_bytes,
                "text_chars": self.text_chars,
                "bytes_per_token": round(self.text_bytes / self.tokens, 6) if self.tokens else None}
        os.replace(self.tmp, self.path)
        Path(str(self.path) + ".json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
        return meta

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _document_texts(paths: list[Path], text_field: str, report: BadRecordReport,
                    per_file: dict[str, dict], max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[str]:
    from matelike.data.formats import iter_pretrain_texts

    for path in paths:
        stats = per_file.setdefault(str(path), {"path": str(path), "bytes": path.stat().st_size})
        yield from iter_pretrain_texts(path, text_field, report, stats, max_record_bytes=max_record_bytes)


def pack(
    tokenizer_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    val_out: str | Path | None = None,
    val_inputs: Sequence[str | Path] = (),
    val_fraction: float = 0.01,
    workers: int = 1,
    text_field: str = "text",
    seed: int = 0,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: bool = True,
    report: BadRecordReport | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> dict:
    """Tokenize `inputs` into `out` (+ `out.json` meta); returns the train meta (with `val` meta if any).

    With `val_out`, documents of `val_inputs` go there; without `val_inputs`, a seeded `val_fraction` of the
    input documents is held out instead (the same documents whatever the worker count). Raises
    NoDocumentsError, writing nothing, when no document is left for the training file.
    """
    from tqdm import tqdm

    from matelike.tokenizer import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    report = report if report is not None else BadRecordReport()
    paths = expand_inputs(inputs)
    val_paths = expand_inputs(val_inputs) if val_inputs else []
    if val_inputs and val_out is None:
        raise ValueError("val inputs given without a val output file")
    sample_val = val_out is not None and not val_paths
    targets = {Path(out).resolve()} | ({Path(val_out).resolve()} if val_out is not None else set())
    if any(p.resolve() in targets for p in paths + val_paths):
        raise ValueError("the output file is also an input file")
    per_file: dict[str, dict] = {}
    total_bytes = sum(p.stat().st_size for p in paths + val_paths)
    t0 = time.perf_counter()

    def chunks(bar) -> Iterator[Chunk]:
        rng = np.random.default_rng(seed)
        bufs: list[list[str]] = [[], []]
        sizes = [0, 0]
        n_bytes = [0, 0]
        sources = [(0, paths), (1, val_paths)] if val_paths else [(0, paths)]
        for fixed_split, srcs in sources:
            for text in _document_texts(srcs, text_field, report, per_file, max_record_bytes):
                split = fixed_split
                if sample_val and rng.random() < val_fraction:
                    split = 1
                bufs[split].append(text)
                sizes[split] += len(text)
                n_bytes[split] += len(text.encode("utf-8"))  # fast next to tokenizing; gives bits-per-byte
                if sizes[split] >= chunk_chars:
                    bar.update(n_bytes[split])
                    yield split, bufs[split], n_bytes[split]
                    bufs[split], sizes[split], n_bytes[split] = [], 0, 0
        for split in (0, 1):
            if bufs[split]:
                bar.update(n_bytes[split])
                yield split, bufs[split], n_bytes[split]
        bar.update(bar.total - bar.n)  # the bar counts text bytes; the files also hold JSON syntax

    outputs = [_Output(Path(out))] + ([_Output(Path(val_out))] if val_out is not None else [])
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="packing", disable=not progress,
                  file=sys.stderr) as bar:
            for (split, texts, n_bytes), arr in _ordered_map(tokenizer_dir, tokenizer, chunks(bar), dtype, workers):
                outputs[split].write(texts, arr, n_bytes)
    except BaseException:
        for o in outputs:
            o.abort()
        raise
    if outputs[0].documents == 0:
        for o in outputs:
            o.abort()
        records = sum(f.get("records", 0) for f in per_file.values())
        if any(o.documents for o in outputs):
            raise NoDocumentsError(f"no documents packed: all {outputs[1].documents} went to the validation split")
        raise NoDocumentsError(f"no documents packed: no usable record in {', '.join(map(str, paths))} "
                               f"({records} records read, {report.summary()})")
    base = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "eot_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer": str(tokenizer_dir.resolve()),
        "text_field": text_field,
        "bad_records": report.total,
    }
    train_meta = outputs[0].finish({**base, "split": "train", "sources": [per_file[str(p)] for p in paths],
                                    **({"val_fraction": val_fraction, "seed": seed} if sample_val else {})})
    if val_out is not None:
        val_sources = [per_file[str(p)] for p in val_paths] if val_paths else [per_file[str(p)] for p in paths]
        train_meta["val"] = outputs[1].finish({**base, "split": "val", "sources": val_sources,
                                               **({"val_fraction": val_fraction, "seed": seed} if sample_val else {})})
    train_meta["seconds"] = round(time.perf_counter() - t0, 3)
    train_meta["input_bytes"] = total_bytes
    return train_meta


class TokenFile:
    """Read-only view of a packed token file and its meta; the memmap opens lazily (cheap to pickle)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = Path(str(self.path) + ".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing meta file (pack with `matelike data pack`)")
        self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        self.dtype = np.dtype(self.meta["dtype"])
        size = self.path.stat().st_size
        if size != self.meta["tokens"] * self.dtype.itemsize:
            raise ValueError(f"{self.path}: {size} bytes, but meta says {self.meta['tokens']} {self.dtype} tokens")
        self._tokens: np.memmap | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            # An empty file cannot be memory-mapped.
            self._tokens = (np.memmap(self.path, dtype=self.dtype, mode="r") if self.meta["tokens"]
                            else np.zeros(0, dtype=self.dtype))
        return self._tokens

    def __len__(self) -> int:
        return int(self.meta["tokens"])

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token: converts a loss in nats/token to bits per byte."""
        return self.meta["text_bytes"] / max(self.meta["tokens"], 1)

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]

    def window(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from `start`, as int64 (a copy; the memmap is not loaded)."""
        return np.asarray(self.tokens[start:start + length], dtype=np.int64)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokens"] = None  # reopen in the child process instead of pickling the data
        return state


class TokenWindows:
    """Map-style dataset of non-overlapping training windows: item i is seq_len+1 tokens (inputs, shifted targets).

    Usable with torch's DataLoader (default collate turns the int64 arrays into a tensor).
    """

    def __init__(self, token_file: TokenFile | str | Path, seq_len: int) -> None:
        self.file = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.file) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.file.window(i * self.seq_len, self.seq_len + 1)


def _cmd_pack(args: argparse.Namespace) -> int:
    problem = ("--val-input needs --val-out" if args.val_input and not args.val_out else
               "--val-fraction must be in [0, 1)" if not 0 <= args.val_fraction < 1 else
               "--workers must be at least 1" if args.workers < 1 else
               "--max-record-bytes must be positive" if args.max_record_bytes < 1 else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.format != "text":
        return _cmd_pack_chat(args)
    if args.seq_len is not None or args.layout != "auto":
        print("error: --seq-len and --layout apply to --format sft|dpo|prompts", file=sys.stderr)
        return 2
    report = BadRecordReport()
    try:
        meta = pack(args.tokenizer, args.input, args.out, val_out=args.val_out, val_inputs=args.val_input or (),
                    val_fraction=args.val_fraction, workers=args.workers, text_field=args.field, seed=args.seed,
                    progress=not args.quiet, report=report, max_record_bytes=args.max_record_bytes)
    except NoDocumentsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mb = meta["input_bytes"] / 1e6
    print(f"{args.out}: {meta['tokens']} tokens ({meta['dtype']}), {meta['documents']} documents, "
          f"{meta['bytes_per_token']} bytes/token; {mb:.1f} MB in {meta['seconds']} s "
          f"({mb / max(meta['seconds'], 1e-9):.1f} MB/s)")
    if "val" in meta:
        v = meta["val"]
        print(f"{args.val_out}: {v['tokens']} tokens, {v['documents']} documents")
    print(report.summary() + (" (skipped)" if report.total else ""))
    return 0


def _cmd_pack_chat(args: argparse.Namespace) -> int:
    """`--format sft|dpo|prompts`: instruction data rendered, masked and fitted once (matelike/data/packed.py)."""
    from matelike.data.packed import pack_chat

    if args.val_out or args.val_input:
        print("error: --val-out/--val-input are for --format text; pack held-out instruction data as a file of "
              "its own", file=sys.stderr)
        return 2
    report = BadRecordReport()
    try:
        meta = pack_chat(args.tokenizer, args.input, args.out, args.format, seq_len=args.seq_len, layout=args.layout,
                         workers=args.workers, report=report, max_record_bytes=args.max_record_bytes,
                         progress=not args.quiet)
    except NoDocumentsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mb = meta["input_bytes"] / 1e6
    print(f"{args.out}: {meta['count']} {args.format} {'pairs' if args.format == 'dpo' else 'samples'} of "
          f"{meta['stats']['records']} records; {json.dumps(meta['stats'], ensure_ascii=False)}; {mb:.1f} MB in "
          f"{meta['seconds']} s ({meta['stats']['records'] / max(meta['seconds'], 1e-9):.0f} records/s)")
    print(report.summary() + (" (skipped)" if report.total else ""))
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("data", "pack", "tokenize text into a uint16/uint32 memmap + FILE.bin.json", _cmd_pack,
                            group_help="data commands: demo corpus, check, pack")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--input", nargs="+", required=True, help="jsonl/parquet/txt files or directories")
    p.add_argument("--out", required=True, help="output token file (FILE.bin; meta in FILE.bin.json)")
    p.add_argument("--val-out", help="also write held-out documents to this token file")
    p.add_argument("--val-input", nargs="+", help="files for --val-out (default: sample --val-fraction of input)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for --val-out")
    p.add_argument("--workers", type=int, default=1,
                   help="1: encode in this process on every core (Rust threads; fastest in `matelike bench pack` "
                        "on 2 cores); N > 1: N encoding processes. The output is identical either way.")
    p.add_argument("--field", default="text", help="text field of jsonl/parquet records")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help="a record (line, row) larger than this is reported bad and skipped unparsed (bounds memory)")
    p.add_argument("--format", choices=("text", "sft", "dpo", "prompts"), default="text",
                   help="text: pretraining documents; sft / dpo / prompts: instruction data rendered with the chat "
                        "template, masked and fitted to --seq-len once, for `matelike sft/dpo --data FILE.bin`")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sft/dpo (required): the run's sequence length, which decides truncation; prompts: drop "
                        "longer prompts")
    p.add_argument("--layout", choices=tuple(FORMAT_CHOICES), default="auto",
                   help="sft record layout (`matelike sft --format`); auto detects it per record")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
