"""The web chat page in a real headless Chromium (Debian's chromium + chromium-driver) through selenium.

Outside CI the test skips when the browser is not installed; with CI=true it fails instead, so the page is
always exercised where it counts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from matelike.serve.app import BackgroundServer, ServedModel, create_app, load_served_model
from matelike.serve.worker import GenerationWorker

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STATIC_FILES = ("index.html", "app.js", "style.css")


def test_page_is_self_contained() -> None:
    """No CDN: every script, style and font comes from the package itself."""
    static = resources.files("matelike.serve") / "static"
    for name in STATIC_FILES:
        text = (static / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|//cdn|@import", text), f"{name} loads something from outside"
    html = (static / "index.html").read_text(encoding="utf-8")
    for needed in ('id="system"', 'id="temperature"', 'id="max-tokens"', 'id="stop"', 'id="new-chat"'):
        assert needed in html




# One OpenMP thread for tiny models (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(make_chat_model) -> Path:
    return make_chat_model(max_seq_len=256)


@pytest.fixture(scope="module")
def page_server(model_dir: Path) -> Iterator[tuple[BackgroundServer, list[str], ServedModel, list[int]]]:
    """A server whose generation is slowed to 30 ms a piece (so streaming and the stop button are visible)
    and which records every prompt it is asked to continue and how many tokens each answer got."""
    served: ServedModel = load_served_model(model_dir, name="tiny-web")
    prompts: list[str] = []
    produced: list[int] = []

    def slow_source(ids, params, max_new):
        prompts.append(served.tokenizer.decode(ids))
        produced.append(0)
        inner = served.source(ids, params, max_new)
        try:
            for piece, n in inner:
                produced[-1] = n
                time.sleep(0.03)
                yield piece, n
        finally:
            inner.close()

    worker = GenerationWorker(slow_source)
    app = create_app(dataclasses.replace(served, source=slow_source), worker)
    with BackgroundServer(app) as srv:
        srv.worker = worker  # type: ignore[attr-defined]
        yield srv, prompts, served, produced
    worker.close()


def _start_browser(tmp_path_factory: pytest.TempPathFactory, language: str | None = None):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must run the browser test: " + message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    if language:
        options.add_argument(f"--lang={language}")
        options.add_experimental_option("prefs", {"intl.accept_languages": language})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    driver = _start_browser(tmp_path_factory, "en-US")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.browser
def test_page_speaks_chinese_to_a_browser_that_prefers_it(tmp_path_factory, browser, page_server) -> None:
    from selenium.webdriver.common.by import By

    server = page_server[0]
    browser.get(server.url + "/")
    assert browser.find_element(By.ID, "send").text == "Send"  # English otherwise
    chinese = _start_browser(tmp_path_factory, "zh-CN")
    try:
        chinese.get(server.url + "/")
        _wait(lambda: chinese.find_element(By.ID, "send").text == "发送", what="Chinese labels")
        assert chinese.find_element(By.ID, "new-chat").text == "新对话"
        assert "回车发送" in chinese.find_element(By.ID, "input").get_attribute("placeholder")
        assert chinese.execute_script("return document.documentElement.lang") == "zh-CN"
    finally:
        chinese.quit()


def _wait(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _assistant_bubbles(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def _send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


@pytest.mark.slow
@pytest.mark.browser
def test_chat_page_in_a_real_browser(browser, page_server) -> None:
    from selenium.webdriver.common.by import By

    server, prompts, served, produced = page_server
    worker: GenerationWorker = server.worker  # type: ignore[attr-defined]
    browser.get(server.url + "/")
    _wait(lambda: browser.find_element(By.ID, "model-name").text == "tiny-web", what="the model name")

    # Settings: a system prompt, greedy decoding, a short answer.
    browser.find_element(By.ID, "system").send_keys("你是助手。")
    for field, value in (("temperature", "0"), ("max-tokens", "12")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    _send(browser, "你好")
    bubble = _wait(lambda: _assistant_bubbles(browser), what="an answer bubble")[0]
    # Streamed: text shows up while the answer is still being written, then the answer completes.
    _wait(lambda: _text(bubble) and "streaming" in bubble.get_attribute("class"), what="a partial answer")
    _wait(lambda: bubble.get_attribute("data-done") == "1", what="the end of the answer")
    assert int(bubble.get_attribute("data-chunks")) >= 2
    first_answer = _text(bubble)
    assert first_answer
    assert prompts[-1].startswith("<|im_start|>system\n你是助手。<|im_end|>")

    # Multi-turn: the second request carries the first turn.
    _send(browser, "再说一遍")
    _wait(lambda: len(_assistant_bubbles(browser)) == 2
          and _assistant_bubbles(browser)[1].get_attribute("data-done") == "1", what="the second answer")
    assert "你好" in prompts[-1] and first_answer in prompts[-1] and prompts[-1].count("<|im_start|>user") == 2

    # New chat: the transcript empties and the next request has no history.
    browser.find_element(By.ID, "new-chat").click()
    _wait(lambda: not browser.find_elements(By.CSS_SELECTOR, "#messages .msg"), what="an empty transcript")

    # Stop button: a long answer stops early and the server stops generating it.
    message = _long_greedy_message(served, system="你是助手。", tokens=150)
    box = browser.find_element(By.ID, "max-tokens")
    box.clear()
    box.send_keys("200")
    _send(browser, message)
    _wait(lambda: len(_assistant_bubbles(browser)) == 1 and _text(_assistant_bubbles(browser)[0]),
          what="the answer in the new chat")
    assert prompts[-1].count("<|im_start|>user") == 1 and message in prompts[-1]
    browser.find_element(By.ID, "stop").click()
    answer = _assistant_bubbles(browser)[0]
    _wait(lambda: "stopped" in answer.get_attribute("class"), what="the stopped mark")
    _wait(lambda: worker.pending == 0, timeout=10, what="the server to stop generating")
    assert produced[-1] < 150  # all 200 tokens would take 6 s or more: generation stopped with the button
    assert browser.find_element(By.ID, "send").is_enabled()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _text(element) -> str:
    return element.get_attribute("textContent") or ""


def _long_greedy_message(served: ServedModel, system: str, tokens: int) -> str:
    """A message whose greedy answer from the random model runs at least `tokens` tokens (no early stop)."""
    from matelike.sampling import GREEDY
    from matelike.serve.schema import RequestParams

    for message in ("讲一个很长的故事", "你好", "今天天气很好", "北京是首都", "学习语言模型", "这本书怎么样"):
        ids, _ = served.tokenizer.encode_chat([{"role": "system", "content": system},
                                               {"role": "user", "content": message}], add_generation_prompt=True)
        pieces = list(served.source(ids, RequestParams(sampling=GREEDY), tokens))
        if pieces and pieces[-1][1] == tokens:
            return message
    raise AssertionError("no candidate message gives a long greedy answer from the random model")
