"""The OpenAI-compatible HTTP API (FastAPI) and web chat page behind `matelike serve`.

Routes: POST /v1/chat/completions, POST /v1/completions (both with `stream` as server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health, GET / (the chat page, shipped in matelike/static). Generation
runs on one worker thread that decodes all running requests together in one batched forward per step (see
worker.py and matelike.model.generation.BatchEngine); the HTTP side only validates, queues and relays. When
every KV slot is busy and the bounded queue is full, a request gets a 503 `server_overloaded` at once.

Before any route runs, `RequestGuard` answers with an OpenAI-shaped error: a Host header the server was not
started for (403: a web page using DNS rebinding to reach the local API), a POST to /v1 that is not
application/json (415: a cross-site form or text/plain "simple" request, which browsers send without asking),
and a body over the size cap (413, from Content-Length or while the body arrives).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matelike.serve.schema import (
    APIError,
    RequestParams,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
)
from matelike.serve.worker import GenerationWorker, Job, ServerBusy, TokenSource

if TYPE_CHECKING:
    from matelike.model.generation import BatchEngine
    from matelike.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# How often a waiting request checks whether its client went away (seconds).
DISCONNECT_POLL_S = 0.25
# The largest request body read by default: even a 32k-token conversation is a few hundred KB of JSON.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# The Host names a server bound to a loopback address answers by default (any port).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServedModel:
    """What the HTTP layer needs to know about the model: its name, context, tokenizer and token source."""

    name: str
    context_len: int
    tokenizer: "Tokenizer"
    source: TokenSource
    created: int = 0
    engine: "BatchEngine | None" = None  # the batched engine behind `source` (slot counts for /health)


# Prompt tokens prefilled per engine step: a long prompt joins in chunks of this size, and the requests already
# decoding wait for at most one chunk between two of their tokens.
PREFILL_CHUNK = 128


def model_token_source(model: Any, tokenizer: "Tokenizer", *, max_batch: int = 8,
                       prefill_chunk: int = PREFILL_CHUNK, compile: bool = False) -> tuple[TokenSource, "BatchEngine"]:
    """(token source, its engine): every request is a row of one BatchEngine of `max_batch` KV slots.

    The source yields (text piece, tokens generated so far) once per engine step the request takes part in; the
    piece is "" while a character is incomplete or the prompt is still being prefilled. The worker advancing its
    requests in turn thus runs one batched forward per round over all of them (see BatchStreams).
    """
    from matelike.model.generation import BatchEngine, BatchStreams, GenerationRequest, TextDecoder

    engine = BatchEngine(model, max_batch=max_batch, max_len=int(model.config.max_seq_len),
                         prefill_chunk=prefill_chunk, prefill_per_step=prefill_chunk, compile=compile)
    streams = BatchStreams(engine)
    stop_ids = tuple(tokenizer.stop_ids)

    def source(prompt_ids: list[int], params: RequestParams, max_new_tokens: int) -> Iterator[tuple[str, int]]:
        tokens = streams.stream(GenerationRequest(prompt_ids, max_new_tokens, params.sampling, stop_ids))
        decoder = TextDecoder(tokenizer)
        count = 0
        try:
            for t in tokens:
                if t is None:  # no token this step (prefill in progress): let the worker serve the others
                    yield "", count
                    continue
                count += 1  # the stop token never comes here: not part of the answer, not counted
                yield decoder.push(t), count
            yield decoder.flush(), count  # tokens that decoded to no text still count
        finally:
            tokens.close()  # frees the request's slot now, also when the request is cancelled

    return source, engine


def warm_up(engine: "BatchEngine") -> None:
    """Decode a few tokens alone, then two requests in step (prompts of one length), before serving: a compiled
    engine compiles its graphs for one row and for several then, not while clients wait, where a new batch
    shape would stall every running request for the compilation."""
    import torch

    from matelike.model.generation import GenerationRequest

    log.info("compiling the decode step for one row and for several (tens of seconds)")
    started = time.perf_counter()
    with torch.inference_mode():
        for prompts in ([[0, 1, 2]], [[0, 1, 2], [3, 4, 5]]):
            for prompt in prompts:
                engine.add(GenerationRequest(prompt, 3))
            while engine.has_work():
                engine.step()
    log.info("decode step compiled in %.1f s", time.perf_counter() - started)


def serving_threads(requested: int | None) -> int:
    """torch threads for the server's forward passes: `requested`, else every core torch would use but one.

    The HTTP side (event loop, JSON, detokenising each streamed piece) runs between forwards; with every core
    in the forward, each token waits for it, and one fewer thread streams faster (`matelike bench serve`).
    """
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: must be at least 1")
        return requested
    return max(1, torch.get_num_threads() - 1)


def load_served_model(model_dir: str | Path, name: str | None = None, device: str = "cpu",
                      dtype: str | None = None, max_batch: int = 8, quantize: str = "none",
                      compile: bool = False) -> ServedModel:
    """Load a model directory for serving, with a batched engine of `max_batch` KV slots (generation runs under
    torch.inference_mode); `quantize` as load_model takes it, `compile` as BatchEngine does."""
    from matelike.model.io import load_model

    model, tokenizer = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    if tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer.json in the model directory; the server needs one")
    model.eval()
    source, engine = model_token_source(model, tokenizer, max_batch=max_batch, compile=compile)
    if compile:
        warm_up(engine)
    return ServedModel(
        name=name or Path(model_dir).resolve().name,
        context_len=int(model.config.max_seq_len),
        tokenizer=tokenizer,
        source=source,
        created=int(Path(model_dir, "config.json").stat().st_mtime),  # load_model has read it: it exists
        engine=engine,
    )


# --- the request guard ----------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The Host names to accept (None: any) for a server bound to `bind_host`, given --allowed-hosts `extra`.

    Loopback binding: the loopback names plus `extra`. Another address: any Host unless `extra` is given (the
    names clients use for a public address cannot be guessed; --api-key protects that case). '*' accepts any.
    """
    names = tuple(_host_name(h) for h in extra if h.strip())  # 'name:port' and '[::1]' mean the name
    if "*" in names or (not names and not is_loopback(bind_host)):
        return None
    return LOOPBACK_HOSTS + names


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    name, sep, port = header.rpartition(":")
    return name if sep and ":" not in name and port.isdigit() else header


class RequestGuard:
    """ASGI middleware: Host allow-list, JSON-only API POSTs and a body-size cap, checked before the app runs.

    A pure ASGI wrapper rather than a BaseHTTPMiddleware: it never reads the body itself, so it neither
    buffers nor blocks; the cap is enforced as the endpoint reads, and an oversized body stops right there.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: Sequence[str] | None, max_body_bytes: int) -> None:
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body is larger than this server's limit of {self.max_body_bytes} bytes "
                             "(see --max-body-bytes).", code="request_too_large")

    def _check(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            if _host_name(host) not in self.allowed_hosts:
                shown = host[:100] if host else "(none)"
                return APIError(403, f"Host {shown!r} is not allowed: this server answers requests addressed to "
                                     f"{', '.join(sorted(self.allowed_hosts))} (see --allowed-hosts).",
                                code="host_not_allowed")
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"Content-Type must be application/json, got {media or 'none'!r}.",
                                code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.strip().isdigit()):
                return APIError(400, "Content-Length is not a byte count.")
            if int(length) > self.max_body_bytes:  # answered before a byte of the body is read
                return self._too_large()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self._check(scope)
        if err is not None:
            await _error_response(err)(scope, receive, send)
            return
        received = 0

        async def capped_receive() -> Message:
            # A chunked body has no Content-Length: count it as the endpoint reads it. The APIError raised
            # here surfaces from `await request.body()` and becomes the 413 through the app's handler.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, capped_receive, send)


# --- responses ----------------------------------------------------------------------------------------------


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status == 503:
        headers = {"Retry-After": "1"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Relay:
    """Carries one job's events from the worker thread into the request's event loop."""

    def __init__(self, worker: GenerationWorker, prompt_ids: list[int], params: RequestParams, max_new: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self._checked = time.monotonic()
        try:
            self.job = worker.submit(Job(prompt_ids, params, max_new, emit=self._emit))
        except ServerBusy as exc:  # every slot busy and the queue full: say so now rather than queue forever
            raise APIError(503, f"The server is overloaded: {exc}; retry later.", type="server_error",
                           code="server_overloaded") from None

    def _emit(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening any more
            self.job.cancel.set()

    async def next(self, request: Request) -> dict:
        """The next event; cancels the job and raises ConnectionAbortedError if the client disconnects.

        The client is checked every DISCONNECT_POLL_S also while events keep coming: a non-streaming request
        whose client gave up must not run to its token budget just because tokens arrive often.
        """
        while True:
            if time.monotonic() - self._checked >= DISCONNECT_POLL_S:
                self._checked = time.monotonic()
                if await request.is_disconnected():
                    self.job.cancel.set()
                    raise ConnectionAbortedError("client disconnected")
            try:
                return await asyncio.wait_for(self.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue


def create_app(served: ServedModel, worker: GenerationWorker, api_key: str | None = None, *,
               allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving `served` through `worker`.

    `allowed_hosts`: the Host names answered (None: any; see `allowed_hosts_for`); `max_body_bytes`: the
    request body cap. Both are enforced by `RequestGuard` before any route runs.
    """

    app = FastAPI(title="Matelike", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)
    static_dir = Path(str(resources.files("matelike.serve") / "static"))
    # The page names the model in every request; filling the name in here means it is right from the first
    # message, also before the page's /v1/models call answers (or while it waits for an API key).
    page = (static_dir / "index.html").read_text(encoding="utf-8").replace(
        '<span id="model-name" class="muted"></span>',
        f'<span id="model-name" class="muted">{html.escape(served.name)}</span>')

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return _error_response(APIError(400, f"Invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Missing or invalid API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", type="authentication_error")

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "matelike",
                "context_length": served.context_len}

    def budget(prompt_ids: list[int], params: RequestParams) -> int:
        """New tokens allowed: the request's max_tokens, clipped to what the context still holds."""
        room = served.context_len - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"The prompt is {len(prompt_ids)} tokens but this model's context is "
                                f"{served.context_len} tokens (at least 1 must be left for the answer); "
                                "shorten the messages.", param="messages", code="context_length_exceeded")
        return min(params.max_tokens or room, room)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "model": served.name, "pending_requests": worker.pending}
        if served.engine is not None:
            out["slots"] = {"total": served.engine.max_batch, "running": served.engine.running}
        return out

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        if model_id != served.name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{served.name}'.",
                           param="model", code="model_not_found", type="not_found_error")
        return model_card()

    async def run(request: Request, prompt_ids: list[int], params: RequestParams, stream: bool, include_usage: bool,
                  chat: bool):
        max_new = budget(prompt_ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        n_prompt = len(prompt_ids)
        relay = _Relay(worker, prompt_ids, params, max_new)

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        def chunk(choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": served.name, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return obj

        if not stream:
            pieces: list[str] = []
            try:
                while True:
                    event = await relay.next(request)
                    if event["type"] == "text":
                        pieces.append(event["text"])
                    elif event["type"] == "done":
                        break
                    elif event["type"] == "error":
                        raise APIError(500, event["message"], type="server_error")
                    else:  # cancelled: only happens on shutdown
                        raise APIError(503, "The server is shutting down.", type="server_error")
            except ConnectionAbortedError:
                return JSONResponse({}, status_code=499)
            finally:
                relay.job.cancel.set()  # no-op when finished; stops generation if this task was cancelled
            text = "".join(pieces)
            usage = _usage(n_prompt, event["completion_tokens"])
            if chat:
                body = {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": None, "finish_reason": event["finish_reason"]}],
                        "usage": usage}
            else:
                body = {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                        "choices": [{"index": 0, "text": text, "logprobs": None,
                                     "finish_reason": event["finish_reason"]}],
                        "usage": usage}
            return JSONResponse(body)

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield _sse(chunk([choice("", None, first=True)]))
                while True:
                    event = await relay.next(request)
                    if event["type"] == "text":
                        yield _sse(chunk([choice(event["text"], None)]))
                    elif event["type"] == "done":
                        usage = _usage(n_prompt, event["completion_tokens"])
                        yield _sse(chunk([choice(None if chat else "", event["finish_reason"])]))
                        if include_usage:
                            yield _sse(chunk([], usage))
                        break
                    else:
                        message = event.get("message", "The server is shutting down.")
                        yield _sse(APIError(500, message, type="server_error").body())
                        break
                yield _sse("[DONE]")
            except ConnectionAbortedError:
                return
            finally:
                # Runs also when Starlette cancels this generator because the client went away.
                relay.job.cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_chat_request(parse_json_body(await request.body()), served.context_len, served.name)
        if req.messages[-1]["role"] == "assistant":
            raise APIError(400, "The last message must not be from the assistant: there is nothing to answer.",
                           param="messages")
        prompt_ids, _ = served.tokenizer.encode_chat(req.messages, add_generation_prompt=True)
        return await run(request, prompt_ids, req.params, req.stream, req.include_usage, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = parse_completion_request(parse_json_body(await request.body()), served.context_len, served.name)
        prompt_ids = served.tokenizer.encode(req.prompt)
        if not prompt_ids:
            raise APIError(400, "'prompt' must not be empty.", param="prompt")
        return await run(request, prompt_ids, req.params, req.stream, req.include_usage, chat=False)

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """uvicorn serving `app` on a daemon thread, for tests and benchmarks; use as a context manager."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="matelike-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
