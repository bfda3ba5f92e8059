"""`matelike bench sft-data`: instruction data packed once against tokenized at every start; one JSON line.

On a generated SFT file (multi-turn conversations of the data benchmarks' synthetic Chinese text):
1. `data pack --format sft` throughput (samples/s, MB/s of jsonl) per worker count, next to the tokenizer's
   own `encode_batch` on the same conversations rendered with the chat template and held in memory, with as
   many Rust threads as workers (RAYON_RS_NUM_CPUS, for the pack too): packing can approach that figure, not
   pass it. `read_s` is what the pack does besides encoding (read, parse and convert the records, in the main
   process, overlapped with encoding); `ceiling_pack_over_encode` is the best ratio that leaves with a core
   free for it, `ceiling_cpu` the best ratio of CPU seconds (reading is work the encode-only figure never does).
2. `matelike sft` on a tiny random model, raw records against the packed file: seconds from the process start
   to its first optimiser step (the first line of metrics.jsonl) and the peak resident memory until then; with
   `--large N`, the same on a packed file of N conversations (time to first step should not grow with N).
3. Two gloo processes under torchrun (`--nproc 2`): each rank's peak resident memory until the first step, on
   the raw and the packed file, and on a packed file of 100 conversations: what a rank holds for the model,
   optimizer, torch and the DDP setup. `over_small_mb` is the rest, the part that grows with the data.
Each job runs in a fresh interpreter, so each figure is that job's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from matelike.bench.corpus import _workdir, synthetic_documents

if TYPE_CHECKING:
    from matelike.cli import CommandTable


def write_conversations(path: Path, n: int, seed: int = 0) -> int:
    """`n` conversations of 1 to 3 exchanges (some with a system turn) as `{messages}` jsonl; returns bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = synthetic_documents(seed)
    turns = rng.integers(1, 4, size=n).tolist()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": "你是一个有帮助的助手。"}] if i % 5 == 0 else []
            for _ in range(turns[i]):
                msgs += [{"role": "user", "content": next(docs)[:60]}, {"role": "assistant", "content": next(docs)[:200]}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _child(job: str, kwargs: dict) -> dict:
    """Runs in a fresh interpreter: the job, its wall and CPU seconds and peak RSS (with its workers)."""
    import resource
    import threading

    import psutil

    stop, peak = threading.Event(), [0]

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], me.memory_info().rss + sum(c.memory_info().rss
                                                                  for c in me.children(recursive=True)))
            except psutil.Error:
                pass
            stop.wait(0.02)

    threading.Thread(target=sample, daemon=True).start()
    result: dict = {}
    if job == "read":
        from matelike.data.records import BadRecordReport, read_converted
        from matelike.data.sft import sft_converter

        t0, cpu0 = time.perf_counter(), time.process_time()
        result["samples"] = sum(1 for _ in read_converted([kwargs["data"]], sft_converter("auto"), BadRecordReport()))
        wall = time.perf_counter() - t0
    elif job == "encode":
        from matelike.tokenizer import Tokenizer

        tok = Tokenizer.load(kwargs["tokenizer_dir"])
        with open(kwargs["data"], encoding="utf-8") as f:
            texts = [tok.apply_chat_template(json.loads(line)["messages"]) for line in f]
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(0, len(texts), 1000):
            tok.encode_batch(texts[i:i + 1000])
        wall = time.perf_counter() - t0
    else:
        from matelike.data.packed import pack_chat

        t0, cpu0 = time.perf_counter(), time.process_time()
        meta = pack_chat(**kwargs, progress=False)
        wall = time.perf_counter() - t0
        result["samples"] = meta["count"]
    stop.set()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update(seconds=wall, cpu_seconds=time.process_time() - cpu0 + kids.ru_utime + kids.ru_stime,
                  peak_rss_mb=peak[0] // (1 << 20))
    return result


def _measure(job: str, env: dict | None = None, **kwargs: object) -> dict:
    code = ("import json, sys; from matelike.bench.sft_data import _child; "
            "print(json.dumps(_child(sys.argv[1], json.loads(sys.argv[2]))))")
    r = subprocess.run([sys.executable, "-c", code, job, json.dumps(kwargs, default=str)], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"bench sft-data {job} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def time_to_first_step(model_dir: Path, data: Path, out: Path, seq_len: int, nproc: int = 1) -> dict:
    """Start `matelike sft` (under torchrun with gloo when nproc > 1); seconds until metrics.jsonl has its first
    line, and the peak RSS until then (of each rank, largest first, under torchrun)."""
    import psutil

    sft = ["-m", "matelike", "sft", "--init", str(model_dir), "--data", str(data), "--out", str(out),
           "--max-steps", "2", "--batch-size", "8", "--seq-len", str(seq_len), "--log-every", "1",
           "--save-every", "1000000", "--dtype", "fp32", "--no-progress", "--device", "cpu"]
    argv = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                               if nproc > 1 else []) + sft
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    metrics = out / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**env, "OMP_NUM_THREADS": "1"})
    root, peaks, first = psutil.Process(proc.pid), {}, None
    while proc.poll() is None:
        try:
            ranks = root.children(recursive=True) if nproc > 1 else [root]
            for p in ranks:
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
        except psutil.Error:
            pass
        if first is None and metrics.is_file() and metrics.stat().st_size:
            first = time.perf_counter() - t0
            break
        time.sleep(0.02)
    _, err = proc.communicate()
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"bench sft-data: sft failed ({proc.returncode}):\n{err[-2000:]}")
    mb = sorted((v // (1 << 20) for v in peaks.values()), reverse=True)
    if nproc == 1:
        return {"seconds_to_first_step": round(first, 2), "peak_rss_mb": mb[0]}
    return {"seconds_to_first_step": round(first, 2), "rank_peak_rss_mb": mb[:nproc]}


def _head(src: Path, dst: Path, n: int) -> Path:
    """The first `n` lines of `src`."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for _, line in zip(range(n), f):
            g.write(line)
    return dst


def _cmd_sft_data(args: argparse.Namespace) -> int:
    import torch

    from matelike.data.packed import pack_chat
    from matelike.model.io import save_model
    from matelike.model.transformer import Transformer, get_preset
    from matelike.tokenizer import Tokenizer, train_tokenizer

    with _workdir(args) as tmp:
        tmp = Path(tmp)
        data = tmp / "sft.jsonl"
        n_bytes = write_conversations(data, args.conversations, args.seed)
        tok_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tok"
        if not args.tokenizer:
            corpus = tmp / "corpus.jsonl"
            with open(corpus, "w", encoding="utf-8") as f:
                for _, doc in zip(range(20_000), synthetic_documents(args.seed + 1)):
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            train_tokenizer([corpus], tok_dir, vocab_size=args.vocab_size, max_chars=2_000_000, progress=False)
        by_workers = {}
        packed = tmp / "sft.bin"
        read = _measure("read", data=str(data))
        for w in args.workers:
            threads = {"RAYON_RS_NUM_CPUS": str(w)}
            m = _measure("pack", env=threads, tokenizer_dir=str(tok_dir), inputs=[str(data)], out=str(packed),
                         kind="sft", seq_len=args.seq_len, workers=w)
            enc = _measure("encode", env=threads, tokenizer_dir=str(tok_dir), data=str(data))
            by_workers[str(w)] = {
                "seconds": round(m["seconds"], 2), "samples_per_s": round(m["samples"] / m["seconds"]),
                "mb_per_s": round(n_bytes / 1e6 / m["seconds"], 2), "peak_rss_mb": m["peak_rss_mb"],
                "encode_only_mb_per_s": round(n_bytes / 1e6 / enc["seconds"], 2),
                "pack_over_encode": round(enc["seconds"] / m["seconds"], 3),
                "read_s": round(read["seconds"], 2),
                "ceiling_pack_over_encode": round(enc["seconds"] / max(enc["seconds"], read["seconds"]), 3),
                # CPU seconds: on a busy machine the wall ratio also measures who got the cores.
                "pack_cpu_s": round(m["cpu_seconds"], 2), "encode_cpu_s": round(enc["cpu_seconds"], 2),
                "pack_over_encode_cpu": round(enc["cpu_seconds"] / m["cpu_seconds"], 3),
                "ceiling_cpu": round(enc["cpu_seconds"] / (enc["cpu_seconds"] + read["cpu_seconds"]), 3),
            }
        samples = m["samples"]
        tokenizer = Tokenizer.load(tok_dir)
        torch.manual_seed(0)
        model_dir = tmp / "model"
        save_model(Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=args.seq_len)),
                   tokenizer, model_dir)
        start = {"raw": time_to_first_step(model_dir, data, tmp / "sft-raw", args.seq_len),
                 "packed": time_to_first_step(model_dir, packed, tmp / "sft-packed", args.seq_len)}
        large: dict = {}
        if args.large:
            big = tmp / "large.jsonl"
            large["input_mb"] = round(write_conversations(big, args.large, args.seed + 2) / 1e6, 1)
            t0 = time.perf_counter()
            meta = pack_chat(tok_dir, [big], tmp / "large.bin", "sft", seq_len=args.seq_len,
                             workers=max(args.workers), progress=False)
            large.update(conversations=args.large, samples=meta["count"],
                         pack_seconds=round(time.perf_counter() - t0, 1))
            big.unlink()  # only the packed file is needed from here on; frees the disk
            start["packed_large"] = time_to_first_step(model_dir, tmp / "large.bin", tmp / "sft-large", args.seq_len)
        ranks: dict = {}
        if args.nproc > 1:
            small = tmp / "small.bin"
            pack_chat(tok_dir, [_head(data, tmp / "small.jsonl", 100)], small, "sft", seq_len=args.seq_len,
                      progress=False)
            runs = {"small": small, "raw": data, "packed": packed}
            if args.large:
                runs["packed_large"] = tmp / "large.bin"
            for name, path in runs.items():
                ranks[name] = time_to_first_step(model_dir, path, tmp / f"ranks-{name}", args.seq_len, args.nproc)
            base = ranks["small"]["rank_peak_rss_mb"][0]
            for name in runs:
                ranks[name]["over_small_mb"] = ranks[name]["rank_peak_rss_mb"][0] - base
    print(json.dumps({
        "bench": "sft-data", "conversations": args.conversations, "samples": samples,
        "input_mb": round(n_bytes / 1e6, 1), "seq_len": args.seq_len, "pack_by_workers": by_workers,
        "sft_start": start, **({"large": large} if large else {}), **({f"ranks_{args.nproc}": ranks} if ranks else {}),
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
    }))
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("bench", "sft-data", "SFT data packed once vs tokenized at start (one JSON line)",
                            _cmd_sft_data, group_help="throughput benchmarks, one JSON line each")
    p.add_argument("--conversations", type=int, default=10_000,
                   help="size of the generated SFT file packed, and read raw, by the timed runs")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pack worker counts to time")
    p.add_argument("--large", type=int, default=0,
                   help="also pack this many conversations and time sft's start on them (the issue's: 1000000)")
    p.add_argument("--nproc", type=int, default=2,
                   help="processes of the torchrun (gloo) run whose per-rank memory is measured; 1 skips it")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokenizer", help="tokenizer directory (default: train a vocabulary on generated text)")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", help="where to write the temporary files (default: system temp)")
