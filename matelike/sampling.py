"""How the next token is drawn: one parameters type for generate, chat, make-pairs, eval, serve and RL rollouts.

`SamplingParams` is what the generation engine (matelike.model.generation) reads; `add_sampling_args` gives
every command the same flags, and `CHAT` the defaults the interactive commands share. A command whose job
needs other defaults (make-pairs wants diverse candidates, eval wants the greedy answer) passes its own.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or top_k 1) is greedy; top_k/top_p None keep every token; seed None draws fresh."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range parameter."""
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)


GREEDY = SamplingParams(temperature=0.0)
# generate, chat and the web page's first answer: a little randomness, the long tail cut off.
CHAT = SamplingParams(temperature=0.7, top_p=0.9)


def check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def add_sampling_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      defaults: SamplingParams = CHAT, max_new_tokens: int | None = 128) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty and --seed."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="tokens to generate at most" + (" (default: what the context allows)"
                                                              if max_new_tokens is None else ""))
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="keep the k likeliest tokens (1 = greedy)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help="keep the likeliest tokens whose probabilities reach p (nucleus sampling)")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                        help="> 1 makes tokens already in the context less likely")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sampler (default: fresh)")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the flags `add_sampling_args` added; ValueError for out-of-range values."""
    if args.max_new_tokens is not None:
        check_max_new_tokens(args.max_new_tokens)
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)
