"""Engine settings shared by every training stage and the command-line flags that fill them.

Each stage (pretrain, SFT, DPO) calls `add_engine_args(parser, lr=..., min_lr=...)` with its own defaults and
adds its stage flags next to them, so the same flag means the same thing in every stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matelike.device import DTYPES, add_device_args
from matelike.train.metrics import REPORT_TO, check_report_to

OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    """Everything the engine needs; stage-specific settings live on the stage's Task instead."""

    out: Path
    max_steps: int | None = None
    max_tokens: int | None = None
    epochs: float | None = None
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int | None = None  # None: 2% of the run, at most 1000 steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: str = "auto"
    compile: bool = False
    save_every: int = 2000
    keep: int = 3  # last K checkpoints kept; 0 keeps all
    eval_every: int = 0  # 0: evaluate only at the end
    log_every: int = 10
    seed: int = 1337
    resume: bool = False
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    fsdp: bool = False
    device: str = "auto"
    progress: bool | None = None  # None: a bar when stderr is a terminal
    report_to: str = "none"  # "tensorboard": metrics.jsonl's lines also as TensorBoard scalars
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    extra: dict[str, Any] = field(default_factory=dict)  # stage settings worth recording in checkpoints

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("batch_size", "grad_accum", "seq_len", "log_every", "save_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if (self.warmup_steps or 0) < 0 or self.keep < 0 or self.eval_every < 0 or self.clip < 0:
            raise ValueError("--warmup-steps, --keep, --eval-every and --clip must be >= 0")
        if self.fsdp and self.optimizer == "muon":
            # Newton-Schulz needs whole matrices; FSDP holds row shards. Gathering them is future work.
            raise ValueError("--optimizer muon cannot be combined with --fsdp yet; use adamw with --fsdp")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        check_report_to(self.report_to)  # every rank, before anything is built: not installed fails here

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra: Any) -> "TrainConfig":
        """Build from parsed flags (names as `add_engine_args` defines them)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {n: getattr(args, n) for n in names if hasattr(args, n)}
        return cls(**values, extra=dict(extra))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def stage_seq_len(requested: int | None, context: int, init: str | Path) -> int:
    """The one --seq-len policy of the stages that start from a saved model (sft, dpo, rl).

    Default: the model's context. Longer is refused: positions past the context were never trained, and a
    stage must not quietly train on something other than what was asked (pretraining, which builds its
    model, sets the new model's context to --seq-len instead).
    """
    if requested is None:
        return context
    if requested < 1:
        raise ValueError(f"--seq-len must be at least 1, got {requested}")
    if requested > context:
        raise ValueError(f"--seq-len {requested} exceeds the context of {init} ({context} tokens); "
                         f"use --seq-len {context} or less")
    return requested


def _report_to(text: str) -> str:
    # Checked while parsing, so a missing package stops every stage with argparse's usage error at once.
    try:
        return check_report_to(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_args(
    parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None, **stage_defaults: Any
) -> argparse.ArgumentParser:
    """Add the flags every stage shares; `defaults`/keywords override TrainConfig's defaults (e.g. lr=1e-4)."""
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    d = {**base, **(defaults or {}), **stage_defaults}
    unknown = set(d) - set(base)
    if unknown:
        raise TypeError(f"unknown engine defaults: {sorted(unknown)}")
    g = parser.add_argument_group("training engine")
    g.add_argument("--out", type=Path, required=True, help="output dir: final model, checkpoints/, metrics.jsonl")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], help="optimizer steps (wins over the others)")
    g.add_argument("--max-tokens", type=int, default=d["max_tokens"], help="stop after about this many tokens")
    g.add_argument("--epochs", type=float, default=d["epochs"], help="passes over the data (default 1)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, default=d["seq_len"],
                   help="tokens per sequence (default: the model's context; pretrain gives the new model this "
                        "context, sft and dpo refuse more than the saved model's)")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=d["min_lr"], help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"],
                   help="linear warmup from 0 (default: 2%% of the steps, at most 1000)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="decoupled weight decay (matrices)")
    g.add_argument("--clip", type=float, default=d["clip"], help="max gradient norm, 0 disables")
    g.add_argument("--compile", action="store_true", default=d["compile"], help="torch.compile the model")
    g.add_argument("--save-every", type=int, default=d["save_every"], help="checkpoint every N steps")
    g.add_argument("--keep", type=int, default=d["keep"], help="keep the last K checkpoints (0 = all)")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="evaluate every N steps (0 = at end)")
    g.add_argument("--log-every", type=int, default=d["log_every"], help="metrics line every N steps")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--resume", action="store_true", default=d["resume"],
                   help="continue from the newest complete checkpoint in OUT/checkpoints")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"],
                   help="adamw, or muon for hidden matrices (AdamW for embeddings, head, norms)")
    g.add_argument("--muon-lr", type=float, default=d["muon_lr"], help="peak learning rate of Muon's matrices")
    g.add_argument("--fsdp", action="store_true", default=d["fsdp"], help="shard with FSDP2 under torchrun")
    add_device_args(g, training=True)
    g.add_argument("--max-bad-steps", type=int, default=d["max_bad_steps"],
                   help="stop after this many steps in a row with a non-finite loss or gradient")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d["progress"],
                   help="progress bar (default: when stderr is a terminal)")
    g.add_argument("--report-to", type=_report_to, default=d["report_to"], metavar="{" + ",".join(REPORT_TO) + "}",
                   help="also write metrics.jsonl's lines as TensorBoard scalars under OUT/tensorboard "
                        "(needs the tensorboard extra)")
    return parser


def follow_small_lr(args: argparse.Namespace, default_min_lr: float) -> None:
    """A --lr below the stage's default --min-lr (common for preference and RL stages) lowers the floor to
    lr/10 instead of being refused, when --min-lr was not given."""
    if args.lr < args.min_lr == default_min_lr:
        args.min_lr = args.lr / 10
        print(f"matelike: --min-lr not given and above --lr; using {args.min_lr:g}", file=sys.stderr)


class StageStartError(ValueError):
    """A stage cannot start from its --init directory with these flags."""


def start_from_init(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """What every stage that continues a saved model (--init) does first: join the process group, seed, load
    the model in fp32 with its tokenizer, and resolve --seq-len against the model's context (written back to
    `args`). Returns (DistInfo, model, tokenizer); StageStartError when the directory has no tokenizer or the
    --seq-len is too long (a damaged directory stays a ModelDirError, which the CLI reports itself)."""
    import torch

    from matelike.model.io import load_model
    from matelike.train import distributed as D
    from matelike.train import seed_everything

    info = D.setup(args.device)
    seed_everything(args.seed)  # a new head (the reward model's) starts the same on every rank and on resume
    model, tokenizer = load_model(args.init, device=info.device, dtype=torch.float32)
    if tokenizer is None:
        raise StageStartError(f"{args.init} has no tokenizer.json")
    try:
        args.seq_len = stage_seq_len(args.seq_len, model.config.max_seq_len, args.init)
    except ValueError as e:
        raise StageStartError(str(e)) from None
    return info, model, tokenizer
