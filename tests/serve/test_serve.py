"""`matelike serve`: request validation, the generation worker, and a real server driven by the official client."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import torch

from matelike.sampling import GREEDY
from matelike.serve.app import BackgroundServer, ServedModel, create_app, free_port, load_served_model
from matelike.serve.schema import RequestParams
from matelike.serve.worker import GenerationWorker, Job, StopMatcher

API_KEY = "sk-test-secret"


# --- fixtures ------------------------------------------------------------------------------------------------




# One OpenMP thread for tiny models (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(make_chat_model) -> Path:
    return make_chat_model(max_seq_len=128)


@pytest.fixture(scope="module")
def served(model_dir: Path) -> ServedModel:
    return load_served_model(model_dir)


@pytest.fixture(scope="module")
def server(served: ServedModel) -> Iterator[BackgroundServer]:
    worker = GenerationWorker(served.source, max_active=8)
    with BackgroundServer(create_app(served, worker)) as srv:
        srv.worker = worker  # type: ignore[attr-defined]
        yield srv
    worker.close()


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(content: str, **extra) -> dict:
    return {"model": "tiny-test", "messages": [{"role": "user", "content": content}], **extra}


# --- stop strings ----------------------------------------------------------------------------------------------


def test_stop_matcher_finds_a_stop_string_split_across_pieces() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)  # "E" might start END: held back
    assert m.feed("N") == ("", False)
    assert m.feed("Dxyz") == ("", True)


def test_stop_matcher_releases_held_text_that_was_not_a_stop() -> None:
    m = StopMatcher(["END", "停"])
    assert m.feed("aEN") == ("a", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("好E") == ("好", False)
    assert m.flush() == "E"
    assert m.feed("前停后") == ("前", True)


# --- worker ------------------------------------------------------------------------------------------------


def _collect(worker: GenerationWorker, params: RequestParams | None = None, max_new: int = 5,
             timeout: float = 10.0) -> list[dict]:
    events: list[dict] = []
    done = threading.Event()

    def emit(ev: dict) -> None:
        events.append(ev)
        if ev["type"] != "text":
            done.set()

    worker.submit(Job([1, 2, 3], params or RequestParams(), max_new, emit))
    assert done.wait(timeout), events
    return events


def test_worker_keeps_running_after_a_generation_error() -> None:
    calls = []

    def source(prompt_ids, params, max_new):
        calls.append(prompt_ids)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return iter([("a", 1), ("b", 2)])

    worker = GenerationWorker(source)
    try:
        first = _collect(worker)
        assert first[-1]["type"] == "error" and "boom" in first[-1]["message"]
        second = _collect(worker, max_new=2)
        assert [e.get("text") for e in second if e["type"] == "text"] == ["a", "b"]
        assert second[-1] == {"type": "done", "finish_reason": "length", "completion_tokens": 2}
    finally:
        worker.close()


def test_worker_cancel_closes_the_generation() -> None:
    closed = threading.Event()
    produced = []

    def source(prompt_ids, params, max_new):
        def gen():
            try:
                for i in range(1, 10_000):
                    produced.append(i)
                    time.sleep(0.001)
                    yield "x", i
            finally:
                closed.set()
        return gen()

    worker = GenerationWorker(source)
    try:
        got_text = threading.Event()
        events: list[dict] = []

        def emit(ev):
            events.append(ev)
            got_text.set()

        job = worker.submit(Job([1], RequestParams(), 10_000, emit))
        assert got_text.wait(5)
        job.cancel.set()
        assert closed.wait(5), "the generator was not closed after cancel"
        time.sleep(0.05)
        assert events[-1] == {"type": "cancelled"}
        assert len(produced) < 10_000
        assert worker.pending == 0
    finally:
        worker.close()


def test_worker_stop_string_ends_generation_with_reason_stop() -> None:
    worker = GenerationWorker(lambda p, s, m: iter([("he", 1), ("llo ST", 2), ("OP more", 3), ("never", 4)]))
    try:
        events = _collect(worker, RequestParams(stop=["STOP"]), max_new=10)
        assert "".join(e["text"] for e in events if e["type"] == "text") == "hello "
        assert events[-1] == {"type": "done", "finish_reason": "stop", "completion_tokens": 3}
    finally:
        worker.close()


# --- bad requests ---------------------------------------------------------------------------------------------

BAD_BODIES = (
    (b"{not json", 400, None),
    (b"", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "tiny-test"}).encode(), 400, "messages"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages[0].content"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), 400, "messages[0].content"),
    (json.dumps(_chat("hi", temperature="hot")).encode(), 400, "temperature"),
    (json.dumps(_chat("hi", temperature=5)).encode(), 400, "temperature"),
    (json.dumps(_chat("hi", max_tokens=0)).encode(), 400, "max_tokens"),
    (json.dumps(_chat("hi", max_tokens=100_000)).encode(), 400, "max_tokens"),
    (json.dumps(_chat("hi", max_tokens=2.5)).encode(), 400, "max_tokens"),
    (json.dumps(_chat("hi", max_tokens=True)).encode(), 400, "max_tokens"),
    (json.dumps(_chat("hi", stream="yes")).encode(), 400, "stream"),
    (json.dumps(_chat("hi", stop=["a", "b", "c", "d", "e"])).encode(), 400, "stop"),
    (json.dumps(_chat("hi", stop=5)).encode(), 400, "stop"),
    (json.dumps(_chat("hi", seed="x")).encode(), 400, "seed"),
    (json.dumps(_chat("hi", n=3)).encode(), 400, "n"),
    (json.dumps(_chat("hi", top_p=-1)).encode(), 400, "top_p"),
    (b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}', 400, "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "你好"}]}'.encode("gbk"), 400, None),
)


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_chat_requests_get_openai_errors(server: BackgroundServer, body: bytes, status: int, param) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err


def test_prompt_longer_than_the_context_is_a_clear_400(server: BackgroundServer) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat("北京是中华人民共和国的首都。" * 40))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "context is 128 tokens" in err["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-test", "prompt": "今天天气很好。" * 100})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_bad_completion_requests(server: BackgroundServer) -> None:
    for body, param in [({"model": "tiny-test"}, "prompt"), ({"prompt": 3}, "prompt"),
                        ({"prompt": ["a", "b"]}, "prompt"),
                        ({"prompt": ""}, "prompt"), ({"prompt": "hi", "max_tokens": -1}, "max_tokens")]:
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == param


def test_unknown_route_and_method_are_openai_shaped(server: BackgroundServer) -> None:
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert info.value.status_code == 400
    assert "max_tokens" in str(info.value)


# --- the official client -------------------------------------------------------------------------------------


def test_models_and_health(client: openai.OpenAI, server: BackgroundServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-test"]
    assert client.models.retrieve("tiny-test").id == "tiny-test"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-test"


def test_chat_completion_non_streaming(client: openai.OpenAI, served: ServedModel) -> None:
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "今天天气怎么样？"}]
    resp = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=6, temperature=0)
    assert resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt_ids, _ = served.tokenizer.encode_chat(messages, add_generation_prompt=True)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= resp.usage.completion_tokens <= 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 6


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny-test", messages=[{"role": "user", "content": "你好"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(server: BackgroundServer) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=_chat("你好", max_tokens=4, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    json.loads(lines[-2][6:])  # every event before [DONE] is JSON


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="tiny-test", prompt="今天天气", max_tokens=5, temperature=0)
    assert resp.object == "text_completion"
    assert isinstance(resp.choices[0].text, str) and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-test", prompt="今天天气", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == resp.choices[0].text


def test_stop_sequences_cut_the_answer(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny-test", prompt="北京是", max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    if len(full) < 4:
        pytest.skip(f"the random model's greedy answer is too short to cut: {full!r}")
    stop = full[2:4]
    cut = client.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny-test", messages=[{"role": "user", "content": "讲个故事"}], max_tokens=16,
                  temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


# --- concurrency and disconnects -------------------------------------------------------------------------------

PROMPTS = ("你好", "今天天气很好", "北京是首都", "这本书怎么样", "讲一个故事", "手机质量太差", "学习语言模型", "明天开会")


def _stream_text(url: str, body: dict) -> str:
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def _whole_text(url: str, body: dict) -> str:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_simultaneous_requests_get_the_answers_they_get_alone(server: BackgroundServer) -> None:
    bodies = [_chat(p, max_tokens=24, temperature=0) for p in PROMPTS]
    alone = [_whole_text(server.url, b) for b in bodies]
    assert len(set(alone)) > 1, "prompts should give different answers for this test to mean anything"
    barrier = threading.Barrier(len(bodies))

    def run(i: int) -> str:
        barrier.wait()
        return (_stream_text if i % 2 else _whole_text)(server.url, bodies[i])

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(run, range(len(bodies))))
    assert together == alone


def test_disconnect_mid_stream_stops_generation(served: ServedModel) -> None:
    prompt = [{"role": "user", "content": "你好"}]
    prompt_ids, _ = served.tokenizer.encode_chat(prompt, add_generation_prompt=True)
    greedy = RequestParams(sampling=GREEDY)
    full = list(served.source(prompt_ids, greedy, 100))
    assert full[-1][1] == 100, "this prompt should not hit a stop token early, or the test proves nothing"
    produced: list[int] = []

    def slow_source(ids, params, max_new):
        inner = served.source(ids, params, max_new)
        try:
            for piece, n in inner:
                produced.append(n)
                time.sleep(0.02)  # 100 tokens take 2 s: plenty of time to see that they stop early
                yield piece, n
        finally:
            inner.close()

    worker = GenerationWorker(slow_source)
    try:
        with BackgroundServer(create_app(dataclasses.replace(served, source=slow_source), worker)) as srv:
            body = {"model": served.name, "messages": prompt, "max_tokens": 100, "temperature": 0, "stream": True}
            with httpx.Client(timeout=30) as http:
                with http.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
                    pieces = 0
                    for line in r.iter_lines():
                        pieces += '"content": "' in line and '"content": ""' not in line
                        if pieces == 2:
                            break  # leave in the middle of the answer
                    assert worker.pending == 1
            deadline = time.monotonic() + 5
            while worker.pending and time.monotonic() < deadline:
                time.sleep(0.02)
            assert worker.pending == 0, "generation went on after the client left"
            assert len(produced) < 80  # all 100 would take 2 s or more: it stopped early
            # A non-streaming client that gives up (here: a read timeout) stops its generation too.
            produced.clear()
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
            deadline = time.monotonic() + 5
            while (worker.pending or not produced) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert worker.pending == 0 and 0 < len(produced) < 80
            assert httpx.get(srv.url + "/health").json()["status"] == "ok"
            assert isinstance(_whole_text(srv.url, _chat("再来", max_tokens=3)), str)
    finally:
        worker.close()


# --- API key and the command line ------------------------------------------------------------------------------


def test_api_key_required(served: ServedModel) -> None:
    worker = GenerationWorker(served.source)
    try:
        with BackgroundServer(create_app(served, worker, api_key=API_KEY)) as srv:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                r = httpx.post(srv.url + "/v1/chat/completions", json=_chat("hi"), headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(srv.url + "/v1/models").status_code == 401
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
            good = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
            resp = good.chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)
            assert resp.usage.completion_tokens <= 2
            assert httpx.get(srv.url + "/health").status_code == 200  # health stays open for probes
    finally:
        worker.close()


@pytest.mark.slow
def test_serve_command_line(model_dir: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "matelike", "serve", "--model", str(model_dir), "--port", str(port),
           "--api-key", API_KEY, "--model-name", "cli-model", "--log-level", "warning", "--threads", "1",
           "--max-batch", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["cli-model"]
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").json()["slots"] == {"total": 3, "running": 0}
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_server_leaves_one_core_to_the_http_side_unless_told(monkeypatch: pytest.MonkeyPatch, model_dir: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from matelike.cli import main
    from matelike.serve.app import serving_threads

    for cores, threads in ((16, 15), (2, 1), (1, 1)):
        monkeypatch.setattr(torch, "get_num_threads", lambda cores=cores: cores)
        assert serving_threads(None) == threads
        assert serving_threads(3) == 3  # an explicit --threads is taken as it is
    with pytest.raises(ValueError, match="--threads 0: must be at least 1"):
        serving_threads(0)
    assert main(["serve", "--model", str(model_dir), "--threads", "0"]) == 2
    assert "matelike serve: --threads 0: must be at least 1" in capsys.readouterr().err


def test_max_active_is_an_alias_of_max_batch_and_bad_sizes_are_refused(model_dir: Path, capsys) -> None:
    from matelike.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["serve", "--model", "m", "--max-active", "3"]).max_batch == 3
    assert parser.parse_args(["serve", "--model", "m"]).max_batch == 8
    assert main(["serve", "--model", str(model_dir), "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--max-queue", "-1"]) == 2
    assert "--max-batch must be at least 1 and --max-queue at least 0" in capsys.readouterr().err


def test_serve_command_reports_a_bad_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from matelike.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bench_serve_prints_one_json_line(tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from matelike.cli import main

    code = main(["bench", "serve", "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--clients", "1,3",
                 "--requests", "3", "--max-tokens", "4", "--prompt-tokens", "4,12", "--level-seconds", "30"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "serve" and [lv["clients"] for lv in result["levels"]] == [1, 3]
    assert result["max_batch"] == 3 and set(result["ratio_tokens_per_s_3_vs_1_clients"]) == {"batched",
                                                                                             "one_at_a_time"}
    for level in result["levels"]:
        for mode in ("batched", "one_at_a_time"):
            figures = level[mode]
            assert figures["requests"] == 3 and figures["errors"] == 0
            assert 0 < figures["latency_s"]["p50"] <= figures["latency_s"]["p95"]
            assert 0 < figures["time_to_first_token_s"]["p50"] <= figures["latency_s"]["p95"]
            assert figures["completion_tokens_per_s"] > 0 and figures["mean_prompt_tokens"] > 4
        assert level["ratio_batched_vs_one_at_a_time"]["completion_tokens_per_s"] == round(
            level["batched"]["completion_tokens_per_s"] / level["one_at_a_time"]["completion_tokens_per_s"], 2)


def test_bench_prompts_have_the_asked_lengths_and_differ(tokenizer) -> None:
    from matelike.bench.serve import make_prompts

    prompts = make_prompts(tokenizer, [5, 20], 6)
    assert len(set(prompts)) == 6
    for i, p in enumerate(prompts):
        # A cut drops the bytes of a split character at each end (up to 2 tokens each with this tokenizer).
        assert 0 <= (5, 20)[i % 2] - len(tokenizer.encode(p)) <= 4


def test_worker_close_ends_running_and_waiting_jobs() -> None:
    def endless(prompt_ids, params, max_new):
        def gen():
            for i in range(1, 10**9):
                time.sleep(0.001)
                yield "x", i
        return gen()

    worker = GenerationWorker(endless, max_active=1)
    finals: list[str] = []
    ended = threading.Event()

    def emit(ev: dict) -> None:
        if ev["type"] != "text":
            finals.append(ev["type"])
            if len(finals) == 3:
                ended.set()

    for _ in range(3):  # one runs, two wait in the queue
        worker.submit(Job([1], RequestParams(), 10**9, emit))
    time.sleep(0.1)
    worker.close()
    assert ended.wait(5) and finals == ["cancelled"] * 3


# --- continuous batching --------------------------------------------------------------------------------------

MIXED_PROMPTS = ("你好", "这家店的服务很好，菜的味道也不错，下次还会再来。" * 3, "北京是首都",
                 "手机的质量太差了，用了三天就坏了。" * 2, "今天天气很好，我们一起去公园散步吧。", "学习")


def test_answers_are_the_same_when_requests_join_a_running_batch_mid_way(served: ServedModel) -> None:
    engine = served.engine
    running: list[int] = []

    def paced(ids, params, max_new):  # 5 ms a token, so that every request is still running when the next joins
        inner = served.source(ids, params, max_new)
        try:
            for piece, n in inner:
                running.append(engine.running)
                time.sleep(0.005)
                yield piece, n
        finally:
            inner.close()

    worker = GenerationWorker(paced, max_active=8)
    try:
        with BackgroundServer(create_app(dataclasses.replace(served, source=paced), worker)) as srv:
            _check_joins_mid_way(srv)
    finally:
        worker.close()
    assert max(running) >= 4  # joins happened while others were decoding (a short answer may end before)


def test_a_quantized_server_answers_the_same_alone_and_among_requests_that_join(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matelike.model.quantize import Int8Linear

    compiled: list[dict] = []  # the --compile wiring, without paying a compilation
    decode_rows: list[int] = []

    def fake_compile(m, **kw):
        compiled.append(kw)

        def run(input_ids, **k):
            decode_rows.append(input_ids.shape[0])
            return m(input_ids, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    served = load_served_model(model_dir, quantize="int8", compile=True)
    assert isinstance(served.engine.model.lm_head, Int8Linear) and compiled == [{"dynamic": True}]
    # Warmed up before serving: decode steps of one row and of two ran, and left every slot free.
    assert set(decode_rows) == {1, 2} and served.engine.running == 0
    assert served.engine.free_slots == served.engine.max_batch and not served.engine.has_work()
    worker = GenerationWorker(served.source, max_active=8)
    try:
        with BackgroundServer(create_app(served, worker)) as srv:
            _check_joins_mid_way(srv)
    finally:
        worker.close()


def _check_joins_mid_way(server: BackgroundServer) -> None:
    bodies = [_chat(p, max_tokens=40, temperature=0) for p in MIXED_PROMPTS]
    alone = [_whole_text(server.url, b) for b in bodies]
    assert len(set(alone)) > 1
    results: dict[int, str] = {}
    started = [threading.Event() for _ in bodies]

    def run(i: int) -> None:
        text = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**bodies[i], "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        piece = chunk["choices"][0]["delta"].get("content") or ""
                        text.append(piece)
                        if piece:
                            started[i].set()
        started[i].set()
        results[i] = "".join(text)

    threads = []
    for i in range(len(bodies)):  # each joins once the one before has its first tokens: the batch is running
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        assert started[i].wait(30)
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(bodies))] == alone


def test_running_requests_share_one_batched_forward_per_step(served: ServedModel,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine = served.engine
    assert engine is not None
    batch_sizes: list[int] = []
    forward = engine.model.forward

    def counting(input_ids, *args, **kwargs):
        if input_ids.shape[1] == 1:
            batch_sizes.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counting)
    worker = GenerationWorker(served.source, max_active=4)
    try:
        ids = [served.tokenizer.encode(p) for p in ("北京", "今天天气很好", "手机", "这家店的服务很好")]
        done = [threading.Event() for _ in ids]
        counts: list[int] = [0] * len(ids)

        def emit(i: int):
            def inner(ev: dict) -> None:
                if ev["type"] == "done":
                    counts[i] = ev["completion_tokens"]
                if ev["type"] != "text":
                    done[i].set()
            return inner

        for i, p in enumerate(ids):
            worker.submit(Job(p, RequestParams(sampling=GREEDY), 12, emit(i)))
        assert all(d.wait(30) for d in done)
    finally:
        worker.close()
    assert max(batch_sizes) == 4  # the four decoded together
    assert len(batch_sizes) < sum(counts) - len(ids)  # fewer decode forwards than decoded tokens
    assert engine.running == 0


def test_seeded_sampling_gives_the_same_text_alone_and_in_a_crowd(server: BackgroundServer) -> None:
    seeded = _chat("讲个故事", max_tokens=20, temperature=1.0, top_p=0.9, seed=77)
    others = [_chat(p, max_tokens=30, temperature=1.0) for p in PROMPTS[:5]]
    alone = _whole_text(server.url, seeded)
    barrier = threading.Barrier(1 + len(others))

    def run(body: dict) -> str:
        barrier.wait()
        return _stream_text(server.url, body)

    with ThreadPoolExecutor(1 + len(others)) as pool:
        together = list(pool.map(run, [*others[:3], seeded, *others[3:]]))
    assert together[3] == alone


def test_cancelled_request_frees_its_slot(served: ServedModel) -> None:
    engine = served.engine

    def slow(ids, params, max_new):
        inner = served.source(ids, params, max_new)
        try:
            for piece, n in inner:
                time.sleep(0.02)  # 100 tokens take 2 s: the client leaves long before the end
                yield piece, n
        finally:
            inner.close()

    worker = GenerationWorker(slow, max_active=8)
    try:
        with BackgroundServer(create_app(dataclasses.replace(served, source=slow), worker)) as srv:
            body = _chat("你好", max_tokens=100, temperature=0, stream=True)
            with httpx.Client(timeout=30) as http:
                with http.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
                    for line in r.iter_lines():
                        if '"content": "' in line and '"content": ""' not in line:
                            assert httpx.get(srv.url + "/health").json()["slots"] == {"total": 8, "running": 1}
                            break  # leaving the stream closes the connection: the server cancels the request
            deadline = time.monotonic() + 5
            while engine.running and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.running == 0 and worker.pending == 0
    finally:
        worker.close()


def test_full_pool_and_queue_answer_503_in_openai_shape(served: ServedModel) -> None:
    release = threading.Event()

    def held(ids, params, max_new):  # a request that runs until the test lets it go
        def gen():
            yield "x", 1
            release.wait(20)
            yield "y", 2
        return gen()

    worker = GenerationWorker(held, max_active=1, max_queue=1)
    try:
        with BackgroundServer(create_app(dataclasses.replace(served, source=held), worker)) as srv:
            body = _chat("你好", max_tokens=2)
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=30)
                deadline = time.monotonic() + 5
                while worker.pending < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                second = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=30)
                while worker.pending < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                err = r.json()["error"]
                assert err["type"] == "server_error" and err["code"] == "server_overloaded"
                assert "1 requests are running and 1 waiting" in err["message"]
                with pytest.raises(openai.InternalServerError):
                    openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                        model=served.name, messages=[{"role": "user", "content": "hi"}])
                release.set()
                assert first.result().status_code == 200 and second.result().status_code == 200
            assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    finally:
        release.set()
        worker.close()
