"""Validation of OpenAI-shaped request bodies for `matelike serve`, and the error shape it answers with.

Validation is hand-written rather than pydantic models so that every bad field gets the OpenAI error object
(`{"error": {"message", "type", "param", "code"}}`) with a message naming the field, instead of FastAPI's
422 list of pydantic locations that the official client cannot show nicely.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from matelike.data.records import json_type
from matelike.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        # Messages quote the client's values, and JSON can carry lone surrogates ("\ud800") that UTF-8 cannot
        # encode: escaped here, or sending the error itself would fail with a 500.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class RequestParams:
    """What a chat or text completion request asks of generation (already range-checked)."""

    sampling: SamplingParams = SamplingParams()  # OpenAI's defaults: temperature 1, the whole vocabulary
    max_tokens: int | None = None  # None: as many as the context allows
    stop: list[str] = field(default_factory=list)


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    params: RequestParams
    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    prompt: str
    params: RequestParams
    stream: bool = False
    include_usage: bool = False


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body; malformed JSON or a non-object is a 400, never a server error."""
    if not raw.strip():
        raise APIError(400, "Request body is empty; expected a JSON object.")
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise APIError(400, f"Request body is not valid UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.") from None
    except RecursionError:
        # The C decoder recurses once per nesting level; no OpenAI request is nested anywhere near this deep.
        raise APIError(400, "Request body is nested too deeply.") from None
    except ValueError as exc:
        # Python refuses to convert integers of more than 4300 digits (a guard against quadratic parsing).
        raise APIError(400, f"Request body is not acceptable JSON: {str(exc).split(';')[0]}.") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"Request body must be a JSON object, got {json_type(obj)}.")
    return obj


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int subclass in Python, but `true` is not a temperature. Python's json reads NaN and
    # Infinity; integers are compared as they are (math.isfinite would overflow on a 400-digit one).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise APIError(400, f"'{name}' must be a number, got {json_type(value)}.", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo:g} and {hi:g}, got {_shown(value)}.", param=name,
                       code="invalid_value")
    return float(value)


def _shown(value: Any, limit: int = 80) -> str:
    """A client's value for an error message, cut short: a 4000-digit number need not come back whole."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _integer(body: dict[str, Any], name: str) -> int | None:
    """An integer field; any size passes here (JSON has no limit), so each caller checks its own range."""
    value = body.get(name)
    if value is None:
        return None
    # 1e30 is a float and "5" a string: neither is an integer, however integral it looks.
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json_type(value)}.", param=name, code="invalid_type")
    return value


def _boolean(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {json_type(value)}.", param=name, code="invalid_type")
    return value


def _params(body: dict[str, Any], context_len: int) -> RequestParams:
    # `max_completion_tokens` is the newer OpenAI name for `max_tokens`; accept either, not both different.
    max_tokens = _integer(body, "max_tokens")
    newer = _integer(body, "max_completion_tokens")
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise APIError(400, "Give either 'max_tokens' or 'max_completion_tokens', not two different values.",
                       param="max_tokens")
    max_tokens = max_tokens if max_tokens is not None else newer
    if max_tokens is not None and not 1 <= max_tokens <= context_len:
        raise APIError(400, f"'max_tokens' must be between 1 and the model's context length {context_len}, "
                            f"got {_shown(max_tokens)}.", param="max_tokens", code="invalid_value")

    stop_value = body.get("stop")
    if stop_value is None:
        stop: list[str] = []
    elif isinstance(stop_value, str):
        stop = [_valid_text(stop_value, "stop")]
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value):
        stop = [_valid_text(s, "stop") for s in stop_value]
    else:
        raise APIError(400, f"'stop' must be a string or an array of strings, got {json_type(stop_value)}.",
                       param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}.", param="stop")
    if any(s == "" for s in stop):
        raise APIError(400, "'stop' sequences must not be empty strings.", param="stop")

    n = _integer(body, "n")
    if n is not None and n != 1:
        raise APIError(400, f"Only n=1 is supported, got n={_shown(n)}.", param="n", code="unsupported_value")
    if body.get("logprobs") not in (None, False, 0):
        raise APIError(400, "'logprobs' is not supported by this server.", param="logprobs",
                       code="unsupported_value")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "Tools and function calling are not supported by this server.", param="tools",
                       code="unsupported_value")

    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        # The nucleus shrinks to the single most likely token as top_p -> 0: that is greedy decoding.
        temperature, top_p = 0.0, 1.0
    seed = _integer(body, "seed")
    # torch.Generator.manual_seed takes a signed 64-bit value: a larger seed would overflow in the worker.
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"'seed' must be between 0 and 2^63 - 1, got {_shown(seed)}.", param="seed",
                       code="invalid_value")
    sampling = SamplingParams(temperature=temperature, top_p=top_p if top_p < 1.0 else None, seed=seed)
    return RequestParams(sampling=sampling, max_tokens=max_tokens, stop=stop)


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(400, f"'stream_options' must be an object, got {json_type(options)}.",
                           param="stream_options", code="invalid_type")
        include_usage = _boolean(options, "include_usage")
    return stream, include_usage


def _model_field(body: dict[str, Any], served: str | None) -> None:
    """`model` may be left out; when given it must be the served model's id (`served`; None accepts any)."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {json_type(model)}.", param="model", code="invalid_type")
    if served is not None and model != served:
        # What OpenAI answers: a client that names a model it does not get should learn it, not be served another.
        raise APIError(404, f"The model '{_shown(model)}' does not exist; this server serves '{served}'.",
                       param="model", code="model_not_found")


def _valid_text(text: str, param: str) -> str:
    # JSON may carry lone surrogates ("\ud800") that no UTF-8 tokenizer can take: a client error, not a 500.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' contains an unpaired UTF-16 surrogate; send valid Unicode text.",
                       param=param, code="invalid_value") from None
    return text


def _content_text(content: Any, where: str) -> str:
    """Message content as text: a string, or OpenAI's array of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return _valid_text(content, f"{where}.content")
    if isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                    "images and audio are not supported.", param=f"{where}.content")
            pieces.append(part["text"])
        return _valid_text("".join(pieces), f"{where}.content")
    raise APIError(400, f"'{where}.content' must be a string or an array of text parts, got {json_type(content)}.",
                   param=f"{where}.content", code="invalid_type")


def parse_chat_request(body: dict[str, Any], context_len: int, model: str | None = None) -> ChatRequest:
    """Check a /v1/chat/completions body; raises APIError (400, or 404 for a `model` other than `model`)
    naming the first bad field."""
    _model_field(body, model)
    if "messages" not in body:
        raise APIError(400, "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    raw = body["messages"]
    if not isinstance(raw, list):
        raise APIError(400, f"'messages' must be an array, got {json_type(raw)}.", param="messages",
                       code="invalid_type")
    if not raw:
        raise APIError(400, "'messages' must contain at least one message.", param="messages")
    messages: list[dict[str, str]] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"'{where}' must be an object, got {json_type(msg)}.", param=where,
                           code="invalid_type")
        role = msg.get("role")
        if not isinstance(role, str):
            raise APIError(400, f"'{where}.role' is missing or not a string.", param=f"{where}.role")
        if role not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)}; got '{role}'.",
                           param=f"{where}.role", code="invalid_value")
        if "content" not in msg or msg["content"] is None:
            raise APIError(400, f"'{where}.content' is missing.", param=f"{where}.content")
        # The chat template knows system/user/assistant; OpenAI's `developer` is its newer name for system.
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content_text(msg["content"], where)})
    params = _params(body, context_len)
    stream, include_usage = _stream_flags(body)
    return ChatRequest(messages=messages, params=params, stream=stream, include_usage=include_usage)


def parse_completion_request(body: dict[str, Any], context_len: int, model: str | None = None) -> CompletionRequest:
    """Check a /v1/completions body; the prompt is one string (or an array holding one string). Errors as
    in `parse_chat_request`."""
    _model_field(body, model)
    if "prompt" not in body:
        raise APIError(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, f"'prompt' must be a string (batched prompts are not supported), got {json_type(prompt)}.",
                       param="prompt", code="invalid_type")
    _valid_text(prompt, "prompt")
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported by this server.", param="echo", code="unsupported_value")
    if body.get("suffix"):
        raise APIError(400, "'suffix' is not supported by this server.", param="suffix", code="unsupported_value")
    params = _params(body, context_len)
    stream, include_usage = _stream_flags(body)
    return CompletionRequest(prompt=prompt, params=params, stream=stream, include_usage=include_usage)
