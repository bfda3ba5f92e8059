"""The whole pipeline end to end with the micro budget: every stage's outputs, skip-if-complete, resume,
the report card and eval on each saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "matelike", "run", "--preset", "micro", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("e2e") / "run"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_stage_writes_its_outputs(run_dir: tuple[Path, str]) -> None:
    out, stdout = run_dir
    for name in ("pretrain.jsonl", "pretrain_val.jsonl", "sft.jsonl", "tasks_train.jsonl", "tasks_test.jsonl"):
        assert (out / "data" / name).stat().st_size > 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    meta = json.loads((out / "pack" / "pretrain.bin.json").read_text())
    assert meta["tokens"] * 2 == (out / "pack" / "pretrain.bin").stat().st_size  # uint16 tokens
    for stage in ("pretrain", "sft", "dpo", "rl"):
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"):
            assert (out / stage / name).is_file(), f"{stage}/{name}"
        rows = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and all({"step", "tokens", "loss", "lr", "tokens_per_s"} <= r.keys() for r in rows if "loss" in r)
        assert any((out / stage / "checkpoints").glob("step-*"))
    pairs = (out / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert pairs and set(json.loads(pairs[0])) == {"prompt", "chosen", "rejected"}
    assert stdout.count(": done in") == 10
    rl = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_segmentation" in r and "reward_entities" in r for r in rl)


def test_eval_scores_each_saved_model(run_dir: tuple[Path, str]) -> None:
    out, _ = run_dir
    for stage in ("pretrain", "sft", "dpo", "rl"):
        result = json.loads((out / "eval" / f"{stage}.json").read_text())
        assert set(result["tasks"]) == {"sentiment", "segmentation", "entities", "continuation"}
        assert 0.0 <= result["tasks"]["sentiment"]["accuracy"] <= 1.0
        assert 0.0 <= result["tasks"]["segmentation"]["f1"] <= 1.0
        assert result["val"]["loss"] > 0 and result["val"]["bpb"] > 0
        # The classical tools (jieba from the `test` extra) are scored once, beside the final model.
        assert ("classical" in result) == (stage == "rl")
    assert set(result["classical"]) == {"sentiment", "segmentation", "entities"}


def test_report_card_has_every_section(run_dir: tuple[Path, str]) -> None:
    out, _ = run_dir
    report = (out / "report.md").read_text(encoding="utf-8")
    for needed in ("## Stages", "| pretrain |", "| sft |", "| dpo |", "| rl |", "## Curves", "loss_pretrain.png",
                   "reward_rl.png", "RL training reward", "entities always none",
                   "## Evaluation (held-out)", "| metric | pretrain | sft | dpo | rl | rule baseline | classical |",
                   "sentiment accuracy",
                   "## Sample answers", "## Machine", "## Commands to reproduce", "matelike pretrain --preset tiny"):
        assert needed in report, needed
    assert (out / "loss_sft.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_completed_and_resumes_an_interrupted_stage(run_dir: tuple[Path, str]) -> None:
    out, _ = run_dir
    again = _run(out)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 10

    # An interrupted DPO stage: its marker is gone but its checkpoints are there, so it resumes from them.
    for stage in ("dpo", "rl", "eval", "report"):
        (out / ".stages" / f"{stage}.json").unlink()
    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("complete, skipped") == 6
    assert "resuming from" in resumed.stdout + resumed.stderr
