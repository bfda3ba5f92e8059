"""The README's Python snippets run as written, against a tiny saved model and a real `matelike serve`."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reward_model_from(model_dir: Path, out: Path) -> Path:
    """A reward model directory (`matelike reward train`'s output) on the chat model's weights, new head."""
    from matelike.model.io import load_model
    from matelike.reward.model import RewardModel, save_reward_model

    backbone, tokenizer = load_model(model_dir)
    return save_reward_model(RewardModel(backbone.config, backbone=backbone), tokenizer, out)


@pytest.mark.slow
def test_every_python_snippet_runs(make_chat_model, tmp_path: Path) -> None:
    snippets = python_snippets()
    assert len(snippets) >= 2
    model_dir = make_chat_model(name="dpo")
    reward_dir = _reward_model_from(model_dir, tmp_path / "reward")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "matelike", "serve", "--model", str(model_dir), "--port",
                               str(port), "--log-level", "warning"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
            time.sleep(0.3)
        for code in snippets:
            # The snippets name the demo's output folder and the default port; point them at the test's.
            code = code.replace('"runs/demo/rl"', repr(str(model_dir))).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            code = code.replace('"runs/demo/reward"', repr(str(reward_dir)))
            script = tmp_path / "snippet.py"
            script.write_text(code, encoding="utf-8")
            run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f"README snippet failed:\n{code}\n{run.stderr[-3000:]}"
            assert run.stdout.strip(), code  # each snippet prints an answer
    finally:
        server.terminate()
        server.wait(timeout=30)
