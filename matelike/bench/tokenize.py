"""`matelike bench tokenize`: tokenizer training speed and peak memory on a generated corpus, one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from matelike.bench.corpus import _measure, _workdir, write_corpus

if TYPE_CHECKING:
    from matelike.cli import CommandTable


def _cmd_tokenize(args: argparse.Namespace) -> int:
    with _workdir(args) as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        t0 = time.perf_counter()
        docs = write_corpus(corpus, int(args.mb * 1e6), seed=args.seed)
        gen_s = time.perf_counter() - t0
        n_bytes = corpus.stat().st_size
        kwargs: dict = {"inputs": [str(corpus)], "out_dir": str(Path(tmp) / "tok"), "vocab_size": args.vocab_size}
        if args.max_chars:
            kwargs["max_chars"] = args.max_chars
        m = _measure("tokenize", **kwargs)
        info = json.loads((Path(tmp) / "tok" / "tokenizer_train.json").read_text(encoding="utf-8"))
    print(json.dumps({
        "bench": "tokenize",
        "input_mb": round(n_bytes / 1e6, 1),
        "documents": docs,
        "vocab_size": args.vocab_size,
        "train_chars": info["train_chars"],
        "seconds": round(m["seconds"], 2),
        "cpu_seconds": round(m["cpu_seconds"], 2),
        "mb_per_s": round(n_bytes / 1e6 / m["seconds"], 2),
        "peak_rss_mb": m["peak_rss_mb"],
        "chars_per_token": info.get("chars_per_token"),
        "bytes_per_token": info.get("bytes_per_token"),
        "corpus_gen_s": round(gen_s, 1),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }))
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("bench", "tokenize", "tokenizer training speed and peak memory (one JSON line)",
                            _cmd_tokenize, group_help="throughput benchmarks, one JSON line each")
    p.add_argument("--mb", type=float, default=200.0, help="size of the generated jsonl corpus")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--max-chars", type=int, default=0, help="passed to tokenizer train (0: its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", help="where to write the temporary corpus (default: system temp)")
