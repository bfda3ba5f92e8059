"""`matelike serve --model DIR`: OpenAI-compatible HTTP API and web chat page (FastAPI + uvicorn).

The application lives in app.py, the request schema in schema.py and the generation worker in worker.py;
this module only holds the command, so `matelike --help` does not import FastAPI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from matelike.device import add_device_args

if TYPE_CHECKING:
    from matelike.cli import CommandTable


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    import torch

    from matelike.serve.app import allowed_hosts_for, create_app, is_loopback, load_served_model, serving_threads
    from matelike.serve.worker import GenerationWorker

    if args.max_batch < 1 or args.max_queue < 0:
        print("matelike serve: --max-batch must be at least 1 and --max-queue at least 0", file=sys.stderr)
        return 2
    if args.max_body_bytes < 1:
        print("matelike serve: --max-body-bytes must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        torch.set_num_threads(serving_threads(args.threads))
        served = load_served_model(args.model, name=args.model_name, device=args.device, dtype=args.dtype,
                                   max_batch=args.max_batch, quantize=args.quantize,
                                   compile=args.compile)
    except (OSError, ValueError) as exc:
        print(f"matelike serve: {exc}", file=sys.stderr)
        return 2
    worker = GenerationWorker(served.source, max_active=args.max_batch, max_queue=args.max_queue)
    hosts = allowed_hosts_for(args.host, args.allowed_hosts.split(",") if args.allowed_hosts else ())
    app = create_app(served, worker, api_key=args.api_key, allowed_hosts=hosts, max_body_bytes=args.max_body_bytes)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr)
    print(f"serving {served.name} (context {served.context_len}) on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        worker.close()
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.command("serve", "OpenAI-compatible HTTP API and web chat page for a model directory", _cmd_serve)
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--model-name", default=None,
                   help="model id reported by /v1/models and required in requests that name a model "
                        "(default: directory name)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names to answer besides localhost, 127.0.0.1 and [::1] ('*': any). "
                        "Default: only those when --host is a loopback address (a web page cannot reach the API "
                        "by DNS rebinding), any name otherwise")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted (default 1048576 = 1 MiB); larger ones get 413")
    add_device_args(p, compile_decode=True)
    p.add_argument("--max-batch", "--max-active", dest="max_batch", type=int, default=8,
                   help="KV-cache slots: requests decoded together in one batched forward per step (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; past that a request gets 503 server_overloaded")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for generation (default: one per core but one, which the HTTP side needs)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
