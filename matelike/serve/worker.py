"""The generation worker behind `matelike serve`: one thread owns the model, requests wait in a bounded queue.

Why one thread: the model and its KV cache are not thread-safe, and a CPU forward pass already uses every core,
so running two forwards truly in parallel would only make both slower. The worker keeps up to `max_active`
requests in flight and advances them in turn, one step each. With the model's source (serve/app.py) every
request is a row of one batched engine (matelike.model.generation.BatchEngine): the first request of a round
that needs a token runs one batched forward that advances every running request, so a round costs one
forward for all of them, not one each (continuous batching). Requests join at any step (their prompt prefilled
in chunks) and leave when they stop; each has its own KV slot, position, sampling parameters and generator, so
a greedy answer is the same whether the request ran alone or in a crowd.
Cancellation (client gone, stop button) is a flag the worker checks between steps; the request's stream is
then closed, which frees its slot. When `max_active` requests run and `max_queue` wait, `submit` refuses more
(ServerBusy: the API answers 503) instead of letting a queue grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from matelike.serve.schema import RequestParams

log = logging.getLogger(__name__)

# A token source turns (prompt ids, sampling settings, token budget) into (text piece, tokens used so far).
TokenSource = Callable[[list[int], RequestParams, int], Iterator[tuple[str, int]]]


class StopMatcher:
    """Finds OpenAI `stop` strings in streamed text, holding back only what could still start a stop string.

    Text is released as soon as it cannot be part of a stop sequence, so streaming stays smooth while the
    answer never contains (a part of) the stop string, even when it arrives split across pieces.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; returns (text safe to emit now, whether a stop string was hit)."""
        text = self._pending + piece
        if not self.stops:
            self._pending = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self.stops:
            # Longest suffix of `text` that is a proper prefix of `stop`.
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        self._pending = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Text held back at the end of generation (it never became a stop string)."""
        text, self._pending = self._pending, ""
        return text


@dataclass
class Job:
    """One request in the worker. `emit` is called from the worker thread with each event."""

    prompt_ids: list[int]
    params: RequestParams
    max_new_tokens: int
    emit: Callable[[dict], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Active:
    job: Job
    stream: Iterator[tuple[str, int]]
    stops: StopMatcher
    tokens: int = 0


class ServerBusy(RuntimeError):
    """Every slot is running and the queue is full."""


class GenerationWorker:
    """Runs jobs on one daemon thread; events go to `job.emit`:

    `{"type": "text", "text": str}` zero or more times, then exactly one of
    `{"type": "done", "finish_reason": "stop"|"length", "completion_tokens": int}`,
    `{"type": "cancelled"}` or `{"type": "error", "message": str}`.
    """

    def __init__(self, source: TokenSource, *, max_active: int = 8, max_queue: int = 64,
                 name: str = "matelike-generate") -> None:
        self._source = source
        self._max_active = max(1, max_active)
        self._max_queue = max(0, max_queue)
        self._submit_lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._active: list[_Active] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue a job; ServerBusy when `max_active` jobs run and `max_queue` already wait."""
        if self._closed.is_set():
            raise RuntimeError("generation worker is closed")
        with self._submit_lock:
            # Running and waiting together: a job the worker has not taken yet still counts as one that may run.
            if self.pending >= self._max_active + self._max_queue:
                raise ServerBusy(f"{len(self._active)} requests are running and {self._queue.qsize()} waiting")
            self._queue.put(job)
        return job

    @property
    def pending(self) -> int:
        """Requests waiting or running (for /health)."""
        return self._queue.qsize() + len(self._active)

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout)

    # --- worker thread -------------------------------------------------------------------------------------

    def _admit(self, block: bool) -> None:
        while len(self._active) < self._max_active:
            try:
                job = self._queue.get(block=block and not self._active, timeout=None)
            except queue.Empty:
                return
            if job is None:  # close() sentinel
                return
            if job.cancel.is_set():
                job.emit({"type": "cancelled"})
                continue
            try:
                stream = self._source(job.prompt_ids, job.params, job.max_new_tokens)
            except Exception as exc:  # a bad request must not take the worker down
                log.exception("could not start generation")
                job.emit({"type": "error", "message": f"generation failed: {exc}"})
                continue
            self._active.append(_Active(job, stream, StopMatcher(job.params.stop)))
            block = False

    def _run(self) -> None:
        while not self._closed.is_set():
            self._admit(block=True)
            for act in list(self._active):
                if self._step(act):
                    self._active.remove(act)
        # Shutting down: end what runs and what waits, so that no request hangs on an answer that never comes.
        for act in self._active:
            _close(act.stream)
            act.job.emit({"type": "cancelled"})
        self._active.clear()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit({"type": "cancelled"})

    def _step(self, act: _Active) -> bool:
        """Advance one request by one piece; True when it is finished."""
        job = act.job
        if job.cancel.is_set():
            _close(act.stream)
            job.emit({"type": "cancelled"})
            return True
        try:
            piece, act.tokens = next(act.stream)
        except StopIteration:
            tail = act.stops.flush()
            if tail:
                job.emit({"type": "text", "text": tail})
            reason = "length" if act.tokens >= job.max_new_tokens else "stop"
            job.emit({"type": "done", "finish_reason": reason, "completion_tokens": act.tokens})
            return True
        except Exception as exc:
            log.exception("generation failed")
            _close(act.stream)
            job.emit({"type": "error", "message": f"generation failed: {exc}"})
            return True
        text, hit = act.stops.feed(piece)
        if text:
            job.emit({"type": "text", "text": text})
        if hit:
            _close(act.stream)
            job.emit({"type": "done", "finish_reason": "stop", "completion_tokens": act.tokens})
            return True
        return False


def _close(stream: Iterator) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # closing must never take the worker down
            log.exception("closing a generation stream failed")
