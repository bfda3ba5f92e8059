"""Exact resume after kill -9 and clean stop on SIGTERM, in real subprocesses (toy Task, fp32, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TOY = [sys.executable, str(Path(__file__).parents[1] / "toy.py"), "--max-steps", "12", "--save-every", "3", "--keep", "0",
       "--dtype", "fp32", "--seq-len", "8"]


def env() -> dict[str, str]:
    # The same thread count in every process keeps fp32 reductions bitwise identical.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def start_and_wait_for(out: Path, step_dir: str, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(TOY + ["--out", str(out), "--sleep", "0.1", *extra], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "checkpoints" / step_dir).is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"toy run ended early: {proc.stderr.read()}")
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    return proc


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a / "toy_model.pt"), torch.load(b / "toy_model.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run that both tests compare with."""
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(TOY + ["--out", str(out)], env=env(), check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path, ref: Path) -> None:
    cut = tmp_path / "cut"
    proc = start_and_wait_for(cut, "step-6", [])
    time.sleep(0.15)  # inside step 7 or 8: the steps after the checkpoint are lost
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(TOY + ["--out", str(cut), "--resume"], env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert losses(cut) == losses(ref)  # float equality: bitwise, step by step
    assert [s for s, _ in losses(cut)] == list(range(1, 13))
    assert_same_weights(ref, cut)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path: Path, ref: Path) -> None:
    cut = tmp_path / "cut"
    proc = start_and_wait_for(cut, "step-3", [])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    from matelike.train import checkpoint as ckpt

    steps = ckpt.list_steps(cut / "checkpoints")
    stopped_at = max(steps)
    assert 3 <= stopped_at < 12 and ckpt.verify(ckpt.step_dir(cut / "checkpoints", stopped_at)) is None
    assert losses(cut)[-1][0] == stopped_at  # nothing past the saved step was lost
    assert (cut / "toy_model.pt").is_file()
    done = subprocess.run(TOY + ["--out", str(cut), "--resume"], env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert losses(cut) == losses(ref)
    assert_same_weights(ref, cut)
