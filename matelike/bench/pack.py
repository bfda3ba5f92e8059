"""`matelike bench pack`: packing speed and peak memory per worker count, next to the tokenizer's own encode
speed, on a generated corpus; one JSON line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from matelike.bench.corpus import _measure, _workdir, write_corpus

if TYPE_CHECKING:
    from matelike.cli import CommandTable


def _cmd_pack(args: argparse.Namespace) -> int:
    with _workdir(args) as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        docs = write_corpus(corpus, int(args.mb * 1e6), seed=args.seed)
        tok_dir = Path(tmp) / "tok"
        if args.tokenizer:
            tok_dir = Path(args.tokenizer)
        else:
            from matelike.tokenizer import train_tokenizer

            train_tokenizer([corpus], tok_dir, vocab_size=args.vocab_size, max_chars=2_000_000, progress=False)
        n_bytes = corpus.stat().st_size
        results = {}
        for workers in args.workers:
            out = Path(tmp) / f"w{workers}.bin"
            m = _measure("pack", tokenizer_dir=str(tok_dir), inputs=[str(corpus)], out=str(out), workers=workers)
            meta = json.loads(Path(str(out) + ".json").read_text(encoding="utf-8"))
            results[workers] = {
                "seconds": round(m["seconds"], 2),
                "mb_per_s": round(n_bytes / 1e6 / m["seconds"], 2),
                # Throughput per CPU-second: what one idle core would do; less sensitive to a busy machine.
                "mb_per_cpu_s": round(n_bytes / 1e6 / m["cpu_seconds"], 2),
                "peak_rss_mb": m["peak_rss_mb"],  # main process + workers together
                "tokens": meta["tokens"],
            }
            out.unlink()
        best = max(results, key=lambda w: results[w]["mb_per_s"])
        enc = _measure("encode", tokenizer_dir=str(tok_dir), corpus=str(corpus))
    print(json.dumps({
        "bench": "pack",
        "input_mb": round(n_bytes / 1e6, 1),
        "documents": docs,
        "tokens": results[best]["tokens"],
        "bytes_per_token": round(n_bytes / results[best]["tokens"], 3),
        "mb_per_s": results[best]["mb_per_s"],
        "best_workers": best,
        "peak_rss_mb": results[best]["peak_rss_mb"],
        "by_workers": {str(w): r for w, r in results.items()},
        # encode_batch alone on the same documents held in memory (no reading, parsing or writing), in MB of
        # the jsonl file per second: packing can approach this figure, not pass it.
        "encode_only_mb_per_s": round(n_bytes / 1e6 / enc["seconds"], 2),
        "encode_only_mb_per_cpu_s": round(n_bytes / 1e6 / enc["cpu_seconds"], 2),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }))
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("bench", "pack", "packing speed (MB/s of jsonl) and peak memory (one JSON line)",
                            _cmd_pack, group_help="throughput benchmarks, one JSON line each")
    p.add_argument("--mb", type=float, default=100.0, help="size of the generated jsonl corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--tokenizer", help="tokenizer directory (default: train a 6400 vocab on the corpus)")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", help="where to write the temporary corpus (default: system temp)")
