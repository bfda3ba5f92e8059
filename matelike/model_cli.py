"""Command line for the model: `matelike model info` and `matelike generate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matelike.cli import CommandTable
    from matelike.model import ModelConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_info(config: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Parameters (total, active), training FLOPs per token and weight memory per dtype for `config`."""
    import torch

    from matelike.model import Transformer

    model = Transformer(config, device="meta")  # no memory and no init: counting a 0.2b model is instant
    total = model.num_params()
    active = model.num_params(active=True)
    seq = seq_len or config.max_seq_len
    return {
        "params": total,
        "active_params": active,
        "seq_len": seq,
        "train_flops_per_token": model.flops_per_token(seq),
        "forward_flops_per_token": model.flops_per_token(seq) / 3,
        "weights_mb": {name: round(total * size / 1e6, 1) for name, size in (("fp32", 4), ("bf16", 2), ("fp16", 2))},
        "config": config.to_dict(),
    }


def _cmd_info(args: argparse.Namespace) -> int:
    from matelike.model import get_preset

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    try:
        info = model_info(get_preset(args.preset, **overrides), args.seq_len)
    except ValueError as e:
        print(f"matelike model info: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"preset": args.preset, **info}))
        return 0
    c = info["config"]
    kind = f"MoE {c['n_experts']} experts, top-{c['n_experts_per_tok']}" if c["n_experts"] else "dense"
    if c["shared_expert"]:
        kind += " + shared expert"
    print(f"preset            {args.preset} ({kind})")
    print(f"shape             dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads / {c['n_kv_heads']} kv heads,"
          f" SwiGLU {c['hidden_dim']}, vocab {c['vocab_size']}, context {c['max_seq_len']}")
    print(f"parameters        {info['params']:,} total ({info['params'] / 1e6:.1f}M)")
    print(f"active parameters {info['active_params']:,} per token ({info['active_params'] / 1e6:.1f}M)")
    print(f"FLOPs per token   {info['forward_flops_per_token'] / 1e6:.1f} MFLOP forward, "
          f"{info['train_flops_per_token'] / 1e6:.1f} MFLOP training (at {info['seq_len']} tokens of context)")
    mem = info["weights_mb"]
    print(f"weight memory     fp32 {mem['fp32']:.1f} MB, bf16 {mem['bf16']:.1f} MB, fp16 {mem['fp16']:.1f} MB")
    return 0


def read_prompt(value: str) -> str:
    """The --prompt value, or all of stdin for `-`."""
    if value != "-":
        return value
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"<stdin>: prompt is not valid UTF-8 ({e})") from e


def encode_prompt(model_dir: Path, text: str) -> list[int]:
    """Encode exactly as `AutoTokenizer.from_pretrained(model_dir)(text)`: the fast tokenizer runs this same
    tokenizer.json with add_special_tokens=True (its post-processor, if any, adds what transformers adds)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=True).ids


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from matelike.generate import check_sampling, default_stop_ids, stream_generate
    from matelike.model_io import ModelDirError, load_model

    model_dir = Path(args.model)
    try:
        prompt = read_prompt(args.prompt)
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        if args.system is not None and not args.chat:
            raise ValueError("--system needs --chat (it is the system turn of the chat template)")
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        model, tokenizer = load_model(model_dir, device=args.device, dtype=dtype)
    except (ValueError, OSError) as e:
        print(f"matelike generate: {e}", file=sys.stderr)
        return 2 if not isinstance(e, ModelDirError) else 1
    if tokenizer is None:
        print(f"matelike generate: {model_dir}: no tokenizer.json in the model directory", file=sys.stderr)
        return 1
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    else:
        ids = encode_prompt(model_dir, prompt)
    if not ids:
        print("matelike generate: the prompt is empty", file=sys.stderr)
        return 2
    context = model.config.max_seq_len
    if len(ids) >= context:
        print(f"matelike generate: the prompt has {len(ids)} tokens, the context is {context}", file=sys.stderr)
        return 2
    max_new = min(args.max_new_tokens, context - len(ids))
    if max_new < args.max_new_tokens:
        print(f"matelike generate: --max-new-tokens lowered to {max_new} to fit the {context}-token context",
              file=sys.stderr)
    out = sys.stdout
    for piece in stream_generate(
        model,
        tokenizer,
        ids,
        max_new_tokens=max_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_ids=default_stop_ids(tokenizer),
        seed=args.seed,
    ):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def add_cli(table: CommandTable) -> None:
    p = table.group_command(
        "model", "info", "parameters, FLOPs per token and weight memory of a preset", _cmd_info,
        group_help="model presets",
    )
    p.add_argument("--preset", required=True, help="tiny, 26m, 0.2b, tiny-moe, 26m-moe")
    p.add_argument("--vocab-size", type=int, default=0, help="override the preset's vocabulary size")
    p.add_argument("--seq-len", type=int, default=0, help="context length for the FLOPs figure (default: preset's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    g = table.command("generate", "generate a completion (or one chat turn with --chat) from a model directory",
                      _cmd_generate)
    g.add_argument("--model", required=True, help="model directory (ours or a transformers Llama/Mixtral dir)")
    g.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.add_argument("--system", default=None, help="system turn for --chat")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="1 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto = as saved)")
