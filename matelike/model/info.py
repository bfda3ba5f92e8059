"""`matelike model info`: parameters, FLOPs per token and weight memory of a preset."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matelike.cli import CommandTable
    from matelike.model.transformer import ModelConfig


def model_info(config: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Parameters (total, active), training FLOPs per token and weight memory per dtype for `config`."""

    from matelike.model.transformer import Transformer

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
    from matelike.model.transformer import get_preset

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



def add_cli(table: "CommandTable") -> None:
    p = table.group_command(
        "model", "info", "parameters, FLOPs per token and weight memory of a preset", _cmd_info,
        group_help="model presets",
    )
    p.add_argument("--preset", required=True, help="tiny, 26m, 0.2b, tiny-moe, 26m-moe")
    p.add_argument("--vocab-size", type=int, default=0, help="override the preset's vocabulary size")
    p.add_argument("--seq-len", type=int, default=0, help="context length for the FLOPs figure (default: preset's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
