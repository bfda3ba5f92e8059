"""`matelike serve` under hostile or broken input: every bad request gets an OpenAI-shaped 4xx before any
generation starts, and the server stays responsive."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import openai
import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matelike.serve.app import (
    DEFAULT_MAX_BODY_BYTES,
    LOOPBACK_HOSTS,
    BackgroundServer,
    ServedModel,
    allowed_hosts_for,
    create_app,
    load_served_model,
)
from matelike.serve.schema import APIError, parse_chat_request, parse_completion_request, parse_json_body
from matelike.serve.worker import GenerationWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "tiny-test"  # make_chat_model names the model after its folder
USER = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def served(make_chat_model) -> ServedModel:
    return load_served_model(make_chat_model(max_seq_len=128))


class Counting:
    """The served token source, counting the generations it starts (a refused request must start none)."""

    def __init__(self, served: ServedModel) -> None:
        self.inner = served.source
        self.calls = 0

    def __call__(self, ids, params, max_new):
        self.calls += 1
        return self.inner(ids, params, max_new)


@pytest.fixture(scope="module")
def counting(served: ServedModel) -> Counting:
    return Counting(served)


@pytest.fixture(scope="module")
def server(served: ServedModel, counting: Counting) -> Iterator[BackgroundServer]:
    worker = GenerationWorker(counting)
    with BackgroundServer(create_app(dataclasses.replace(served, source=counting), worker)) as srv:
        yield srv
    worker.close()


def _body(**extra: Any) -> dict:
    return {"model": NAME, "messages": USER, "max_tokens": 2, **extra}


def assert_api_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture
def no_generation(counting: Counting) -> Iterator[None]:
    before = counting.calls
    yield
    assert counting.calls == before, "a refused request started a generation"


# ------------------------------------------------------------------ numbers and nesting


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [2**64, 1e30, 2**63, -1, "7"])
def test_seed_out_of_range_is_a_400_streamed_or_not(server: BackgroundServer, no_generation, seed, stream) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json=_body(seed=seed, stream=stream))
    assert_api_error(r, 400, param="seed")


@pytest.mark.parametrize("field", ["max_tokens", "seed", "n", "temperature", "top_p"])
def test_enormous_integers_are_a_400(server: BackgroundServer, no_generation, field: str) -> None:
    for digits in (400, 5000):  # 5000 is past Python's int-string limit: json.loads itself refuses it
        raw = json.dumps(_body()).replace('"max_tokens": 2', f'"{field}": {"9" * digits}').encode()
        r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        err = assert_api_error(r, 400)
        assert len(err["message"]) < 300  # the number does not come back whole


def test_deeply_nested_body_is_a_400_and_the_connection_stays_usable(server: BackgroundServer) -> None:
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with httpx.Client(base_url=server.url, timeout=30) as http:  # one keep-alive connection
        r = http.post("/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"})
        assert "nested too deeply" in assert_api_error(r, 400)["message"]
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/v1/chat/completions", json=_body())
        assert r.status_code == 200 and r.json()["choices"], r.text


def test_errors_quoting_lone_surrogates_can_be_sent(server: BackgroundServer, no_generation) -> None:
    """The message quotes the client's value; "\\ud800" cannot be encoded as UTF-8 until it is escaped."""
    raw = {"model": b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',
           "messages[0].role": b'{"messages": [{"role": "\\ud800", "content": "x"}]}'}
    for param, body in raw.items():
        r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        err = assert_api_error(r, 404 if param == "model" else 400, param=param)
        assert "\\ud800" in err["message"]


# ------------------------------------------------------------------ body size


def test_body_over_the_cap_is_refused_from_its_content_length(server: BackgroundServer, no_generation) -> None:
    """The 413 comes back although the body is never sent: the server did not wait to read it."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {10 * 2**20}\r\n\r\n".encode())
        answer = b""
        while b"}}" not in answer:  # the JSON error ends the response
            piece = s.recv(65536)
            assert piece, answer
            answer += piece
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_ten_megabytes_are_refused_quickly_and_health_keeps_answering(server: BackgroundServer, no_generation) -> None:
    result: dict[str, Any] = {}
    text = "今天天气很好。" * (10 * 2**20 // 21)
    payload = json.dumps(_body(messages=[{"role": "user", "content": text}]), ensure_ascii=False).encode()
    assert len(payload) > 10 * 10**6

    def big() -> None:
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", content=payload,
                       headers={"Content-Type": "application/json"}, timeout=60)
        result["response"], result["seconds"] = r, time.monotonic() - t0

    thread = threading.Thread(target=big)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.02)
    thread.join()
    err = assert_api_error(result["response"], 413, code="request_too_large")
    assert str(DEFAULT_MAX_BODY_BYTES) in err["message"] and "--max-body-bytes" in err["message"]
    assert result["seconds"] < 5 and slowest < 2, (result["seconds"], slowest)


def test_chunked_body_is_counted_as_it_arrives(served: ServedModel) -> None:
    worker = GenerationWorker(served.source)
    try:
        with BackgroundServer(create_app(served, worker, max_body_bytes=4096)) as srv:
            def chunks() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
                yield json.dumps(_body())[:-1].encode()
                for _ in range(100):
                    yield b', "x": "' + b"y" * 1000 + b'"'
                yield b"}"

            r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(),
                           headers={"Content-Type": "application/json"})
            assert_api_error(r, 413, code="request_too_large")
            small = iter([json.dumps(_body()).encode()])
            r = httpx.post(srv.url + "/v1/chat/completions", content=small,
                           headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
    finally:
        worker.close()


# ------------------------------------------------------------------ Host and Content-Type


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example:80", "192.168.1.5:8000", "[::2]:80", "localhost:8000:1"])
def test_foreign_host_header_is_refused(server: BackgroundServer, no_generation, host: str) -> None:
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, server.url + path, json=_body(), headers={"Host": host})
        err = assert_api_error(r, 403, code="host_not_allowed")
        assert "--allowed-hosts" in err["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LocalHost:1", "127.0.0.1", "127.0.0.1:9",
                                  "[::1]", "[::1]:8000"])
def test_loopback_host_names_are_answered(server: BackgroundServer, host: str) -> None:
    r = httpx.get(server.url + "/health", headers={"Host": host})
    assert r.status_code == 200, r.text


def test_allowed_hosts_policy() -> None:
    assert allowed_hosts_for("127.0.0.1") == LOOPBACK_HOSTS
    assert allowed_hosts_for("localhost") == allowed_hosts_for("::1") == LOOPBACK_HOSTS
    assert allowed_hosts_for("0.0.0.0") is None  # a public address: its names cannot be guessed
    assert allowed_hosts_for("0.0.0.0", ["API.example:8000", " lan-box "]) == LOOPBACK_HOSTS + ("api.example",
                                                                                               "lan-box")
    assert allowed_hosts_for("127.0.0.1", ["*"]) is None


def test_allowed_hosts_extend_the_loopback_names(served: ServedModel) -> None:
    worker = GenerationWorker(served.source)
    try:
        app = create_app(served, worker, allowed_hosts=allowed_hosts_for("127.0.0.1", ["chat.lan"]))
        assert TestClient(app, base_url="http://chat.lan:8000").get("/health").status_code == 200
        assert TestClient(app, base_url="http://localhost").get("/health").status_code == 200
        assert TestClient(app, base_url="http://other.lan").get("/health").status_code == 403
        anyone = create_app(served, worker, allowed_hosts=None)
        assert TestClient(anyone, base_url="http://other.lan").get("/health").status_code == 200
    finally:
        worker.close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_api_posts_must_be_json(server: BackgroundServer, no_generation, path: str, content_type: str | None) -> None:
    raw = json.dumps({**_body(), "prompt": "你好"}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    with httpx.Client() as http:
        request = http.build_request("POST", server.url + path, content=raw, headers=headers)
        if content_type is None:
            request.headers.pop("Content-Type", None)
        r = http.send(request)
    assert_api_error(r, 415, code="unsupported_media_type")


def test_json_with_charset_is_accepted(server: BackgroundServer) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(_body()).encode(),
                   headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ model name


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_a_404(server: BackgroundServer, no_generation, stream: bool) -> None:
    for path, body in (("/v1/chat/completions", _body(model="gpt-4o", stream=stream)),
                       ("/v1/completions", {"model": "gpt-4o", "prompt": "你好", "stream": stream})):
        err = assert_api_error(httpx.post(server.url + path, json=body), 404, code="model_not_found", param="model")
        assert "gpt-4o" in err["message"] and NAME in err["message"]


def test_served_model_name_or_none_is_answered(server: BackgroundServer) -> None:
    assert httpx.post(server.url + "/v1/chat/completions", json=_body()).status_code == 200
    unnamed = {k: v for k, v in _body().items() if k != "model"}
    assert httpx.post(server.url + "/v1/chat/completions", json=unnamed).status_code == 200
    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == [NAME]


def test_openai_client_gets_not_found_for_another_model(server: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    assert info.value.status_code == 404
    name = client.models.list().data[0].id
    assert client.chat.completions.create(model=name, messages=USER, max_tokens=2).choices


def test_page_carries_the_model_name_escaped(served: ServedModel) -> None:
    worker = GenerationWorker(served.source)
    try:
        app = create_app(dataclasses.replace(served, name='<img src=x onerror="alert(1)">'), worker)
        page = TestClient(app, base_url="http://localhost").get("/").text
        assert '<span id="model-name" class="muted">&lt;img src=x onerror=&quot;alert(1)&quot;&gt;</span>' in page
        assert "<img" not in page
    finally:
        worker.close()


# ------------------------------------------------------------------ the command line


def test_command_line_flags_reach_the_app(make_chat_model, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from matelike.cli import main

    model_dir = make_chat_model(max_seq_len=128)
    apps: list[tuple[Any, str]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: apps.append((app, host)))
    assert main(["serve", "--model", str(model_dir), "--allowed-hosts", "chat.lan", "--max-body-bytes", "1000"]) == 0
    assert main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"]) == 0
    assert main(["serve", "--model", str(model_dir), "--max-body-bytes", "0"]) == 2
    (local, _), (public, _) = apps
    http = TestClient(local, base_url="http://chat.lan")
    assert http.get("/health").status_code == 200
    assert TestClient(local, base_url="http://evil.example").get("/health").status_code == 403
    r = http.post("/v1/chat/completions", json=_body(messages=[{"role": "user", "content": "x" * 2000}]))
    assert r.status_code == 413
    assert TestClient(public, base_url="http://203.0.113.7:8000").get("/health").status_code == 200


# ------------------------------------------------------------------ fuzzing the request schema

# Text often holds lone surrogates: JSON can carry "\ud800", which UTF-8 (the tokenizer, the response) cannot.
# (A list joined, as st.text drops surrogates from a mixed alphabet.)
CHARS = st.characters(exclude_categories=()) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF,
                                                             exclude_categories=())
TEXT = st.lists(CHARS, max_size=20).map("".join)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**500), max_value=10**500)
           | st.floats() | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)


class Raw(str):
    """JSON text put into a body as it is: JSON has no limit on nesting or digits, but json.dumps cannot write
    a 6000-digit integer and would take long to nest 100,000 lists."""


RAW = (st.integers(1, 120_000).map(lambda depth: Raw("[" * depth + "]" * depth))
       | st.integers(1, 6000).map(lambda digits: Raw("9" * digits)))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": st.text(max_size=10)})
# A valid request of either kind (the unused one of messages/prompt is ignored), with valid optional fields...
VALID = st.fixed_dictionaries(
    {"model": st.just(NAME), "messages": st.lists(MESSAGE, min_size=1, max_size=3), "prompt": st.text(max_size=10)},
    optional={"max_tokens": st.integers(1, 128), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
              "seed": st.integers(0, 2**63 - 1), "n": st.just(1), "stream": st.booleans(),
              "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
              "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})})
FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "n", "stream", "stream_options", "logprobs", "tools", "functions", "echo", "suffix")


def _mutated(request: dict, changes: list[tuple[str, Any]]) -> bytes:
    """`request` with some fields (or the first message's role/content) replaced by arbitrary values or raw text."""
    raws = {}
    # Parts of the first message first: a change of the whole `messages` may come after and replace them.
    for where, value in sorted(changes, key=lambda change: not change[0].startswith("messages.")):
        if isinstance(value, Raw):  # a placeholder, swapped for the raw text once json.dumps has written the rest
            raws[f"\x00RAW{len(raws)}\x00"] = value
            value = list(raws)[-1]
        if where.startswith("messages."):
            request["messages"][0][where.split(".")[1]] = value
        else:
            request[where] = value
    text = json.dumps(request)
    for placeholder, raw in raws.items():
        text = text.replace(json.dumps(placeholder), raw)
    return text.encode()


# ...then a few parts made arbitrary: valid-looking requests reach every check, not only the first one.
VALUES = TEXT | SCALARS | JSON | RAW  # a string is the likeliest to get far
CHANGES = st.lists(st.tuples(st.sampled_from(FIELDS + ("messages.role", "messages.content")), VALUES),
                   min_size=1, max_size=3)
BODIES = st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()) | st.builds(_mutated, VALID, CHANGES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=BODIES)
def test_any_body_parses_or_is_a_4xx(raw: bytes) -> None:
    for parse in (parse_chat_request, parse_completion_request):
        try:
            parse(parse_json_body(raw), 128, NAME)
        except APIError as exc:
            assert 400 <= exc.status < 500, exc.message
            JSONResponse(exc.body(), status_code=exc.status)  # renders as UTF-8 like the server's: it can be sent
