"""`matelike generate`: one completion, or one chat turn with --chat, from a model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from matelike.device import add_device_args
from matelike.sampling import CHAT, add_sampling_args, sampling_from_args

if TYPE_CHECKING:
    from matelike.cli import CommandTable

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

    from matelike.model.generation import default_stop_ids, stream_generate
    from matelike.model.io import ModelDirError, load_model

    model_dir = Path(args.model)
    try:
        prompt = read_prompt(args.prompt)
        sampling = sampling_from_args(args)
        if args.system is not None and not args.chat:
            raise ValueError("--system needs --chat (it is the system turn of the chat template)")
        model, tokenizer = load_model(model_dir, device=args.device, dtype=args.dtype, quantize=args.quantize)
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
        sampling=sampling,
        stop_ids=default_stop_ids(tokenizer),
        compile=args.compile,
    ):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def add_cli(table: CommandTable) -> None:
    g = table.command("generate", "generate a completion (or one chat turn with --chat) from a model directory",
                      _cmd_generate)
    g.add_argument("--model", required=True, help="model directory (ours or a transformers Llama/Mixtral dir)")
    g.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.add_argument("--system", default=None, help="system turn for --chat")
    add_sampling_args(g, CHAT)
    add_device_args(g, compile_decode=True)
