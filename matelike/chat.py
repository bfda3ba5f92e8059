"""`matelike chat --model DIR`: interactive streaming chat in the terminal.

Answers stream to stdout as they are generated; notes (dropped turns, commands) go to stderr in brackets so
that a pipe reading stdout sees only the answers. The history keeps whole turns and drops the oldest ones
when the next prompt plus the answer budget would not fit the model's context; the current message is never
cut: if it cannot fit on its own it is refused with a message. Ctrl-C stops the answer being written (the
partial answer stays in the history, as the user saw it) and returns to the prompt; `/exit` or end of input
leaves.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

from matelike.device import add_device_args
from matelike.sampling import CHAT, SamplingParams, add_sampling_args, sampling_from_args

if TYPE_CHECKING:
    from matelike.cli import CommandTable
    from matelike.tokenizer import Tokenizer

HELP = """commands:
  /reset         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (empty TEXT removes it) and start a new conversation
  /exit          leave (also /quit or end of input)
  /help          this text
Ctrl-C stops the answer being written."""


class MessageTooLong(ValueError):
    """The current message (with the system prompt) does not fit the context on its own."""


@dataclass
class Fitted:
    """The prompt for one turn: ids to generate from, the answer budget and how many old turns were dropped."""

    prompt_ids: list[int]
    max_new_tokens: int
    dropped_turns: int


@dataclass
class Conversation:
    """System prompt + history of whole turns (user message, assistant answer)."""

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, user: str, first_turn: int = 0) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in self.turns[first_turn:]:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": user}]

    def fit(self, tokenizer: "Tokenizer", user: str, context_len: int, max_new_tokens: int) -> Fitted:
        """Drop the oldest turns until prompt + max_new_tokens fits `context_len` (dropped turns are forgotten).

        With no history left and still too long, the answer budget shrinks to what remains; when not even
        one answer token remains, raise MessageTooLong rather than cutting the message.
        """
        for first in range(len(self.turns) + 1):
            ids, _ = tokenizer.encode_chat(self.messages(user, first), add_generation_prompt=True)
            if len(ids) + max_new_tokens <= context_len or first == len(self.turns):
                break
        room = context_len - len(ids)
        if room < 1:
            raise MessageTooLong(
                f"message too long: {len(ids)} tokens with the chat template"
                f"{' and system prompt' if self.system else ''}, the model's context holds {context_len}; "
                "shorten it")
        del self.turns[:first]
        return Fitted(prompt_ids=ids, max_new_tokens=min(max_new_tokens, room), dropped_turns=first)


# A function streaming the answer's text pieces for prompt ids and an answer budget.
StreamFn = Callable[[list[int], int], Iterator[str]]


class ChatSession:
    """The read-eval-print loop, separated from model loading so tests can drive it with any stream."""

    def __init__(self, tokenizer: "Tokenizer", stream: StreamFn, context_len: int, max_new_tokens: int,
                 system: str | None = None, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.stream = stream
        self.context_len = context_len
        self.max_new_tokens = max_new_tokens
        self.conv = Conversation(system=system or None)
        # Looked up now, not at import time, so that a redirected sys.stdout is honoured.
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr

    def note(self, text: str) -> None:
        print(f"[{text}]", file=self.err, flush=True)

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.conv.turns.clear()
            self.note("conversation cleared")
        elif name == "/system":
            self.conv.system = arg.strip() or None
            self.conv.turns.clear()
            self.note(f"system prompt set: {self.conv.system}" if self.conv.system else "system prompt removed")
        elif name == "/help":
            print(HELP, file=self.err, flush=True)
        else:
            self.note(f"unknown command {name}; /help lists them")
        return True

    def answer(self, user: str) -> str | None:
        """Stream one answer to `user` and add the turn to the history; None if the message was refused."""
        try:
            fitted = self.conv.fit(self.tokenizer, user, self.context_len, self.max_new_tokens)
        except MessageTooLong as exc:
            self.note(str(exc))
            return None
        if fitted.dropped_turns:
            self.note(f"dropped {fitted.dropped_turns} oldest turn(s) to fit the {self.context_len}-token context")
        if fitted.max_new_tokens < self.max_new_tokens:
            self.note(f"answer limited to {fitted.max_new_tokens} tokens by the context")
        pieces: list[str] = []
        # Generation runs on a helper thread and the pieces come back through a queue, so Ctrl-C (delivered
        # to the main thread) never lands inside the model or the tokenizer: it only sets a flag that the
        # helper checks between tokens before closing the generator.
        events: queue.Queue[tuple[str, object]] = queue.Queue()
        cancel = threading.Event()
        helper = threading.Thread(target=_pump, args=(self.stream, fitted.prompt_ids, fitted.max_new_tokens, events,
                                                      cancel), name="matelike-chat-generate", daemon=True)
        helper.start()
        try:
            while True:
                try:
                    kind, value = events.get(timeout=0.1)  # a timeout keeps the wait interruptible everywhere
                except queue.Empty:
                    continue
                if kind == "text":
                    self.out.write(str(value))
                    self.out.flush()
                    pieces.append(str(value))  # after the write: the history holds what the user saw
                elif kind == "error":
                    raise RuntimeError(f"generation failed: {value}") from value  # type: ignore[misc]
                else:
                    break
        except KeyboardInterrupt:
            stopped = True
        else:
            stopped = False
        finally:
            cancel.set()
            helper.join()
        self.out.write("\n")
        self.out.flush()
        if stopped:
            self.note("stopped")
        text = "".join(pieces)
        self.conv.turns.append((user, text))
        return text

    def run(self, lines: Callable[[], str]) -> int:
        """Loop over input lines from `lines()` (raises EOFError at the end) until /exit or end of input."""
        while True:
            try:
                line = lines()
            except EOFError:
                return 0
            except KeyboardInterrupt:
                # Ctrl-C at the prompt abandons the line being typed, as in a shell.
                self.out.write("\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.answer(line)


def _pump(stream: StreamFn, prompt_ids: list[int], max_new_tokens: int, events: "queue.Queue[tuple[str, object]]",
          cancel: threading.Event) -> None:
    """Helper thread of ChatSession.answer: move pieces into `events` until done or cancelled, then always
    post one final ("done" | "error", ...) event so the main thread never waits forever."""
    outcome: tuple[str, object] = ("done", None)
    it = None
    try:
        it = stream(prompt_ids, max_new_tokens)
        for piece in it:
            if cancel.is_set():
                break
            events.put(("text", piece))
    except Exception as exc:  # reported in the main thread
        outcome = ("error", exc)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # frees the KV cache now, also when stopped early
        events.put(outcome)


def _stdin_lines(prompt: str) -> Callable[[], str]:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # not on every platform
            pass
        return lambda: input(prompt)

    def read() -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    return read


def _model_stream(model: Any, tokenizer: "Tokenizer", sampling: SamplingParams, compile: bool = False) -> StreamFn:
    from matelike.model.generation import stream_generate

    def stream(prompt_ids: list[int], max_new_tokens: int) -> Iterator[str]:
        return stream_generate(
            model, tokenizer, prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=tokenizer.stop_ids,
            compile=compile,
        )

    return stream


def _cmd_chat(args: argparse.Namespace) -> int:
    from matelike.model.io import load_model

    try:
        sampling = sampling_from_args(args)
    except ValueError as exc:  # say so before loading the model, not in the middle of the first answer
        print(f"matelike chat: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    except (OSError, ValueError) as exc:
        print(f"matelike chat: {exc}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"matelike chat: {args.model}: no tokenizer.json in the model directory", file=sys.stderr)
        return 2
    model.eval()
    context_len = int(model.config.max_seq_len)
    # Default: 256 tokens, but never more than half the context so that some history always fits.
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(256, context_len // 2)
    if not 1 <= max_new < context_len:
        print(f"matelike chat: --max-new-tokens must be between 1 and {context_len - 1} (the context is "
              f"{context_len})", file=sys.stderr)
        return 2
    session = ChatSession(tokenizer, _model_stream(model, tokenizer, sampling, args.compile), context_len, max_new,
                          system=args.system)
    if sys.stdin.isatty():
        print(f"matelike chat: {args.model} (context {context_len} tokens). /help for commands.", file=sys.stderr)
    return session.run(_stdin_lines(">>> "))


def add_cli(table: "CommandTable") -> None:
    p = table.command("chat", "interactive streaming chat with a model directory", _cmd_chat)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--system", default=None, help="system prompt (change it later with /system TEXT)")
    # Answer budget per turn: default 256, at most half the context (so that some history always fits).
    add_sampling_args(p, CHAT, max_new_tokens=None)
    add_device_args(p, compile_decode=True)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
