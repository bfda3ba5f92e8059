"""`matelike bench rl` runs the real GRPO stage and prints one JSON line (the figures themselves are not
checked here: speed claims come from running the command)."""

from __future__ import annotations

import json

import pytest

from matelike.cli import main


@pytest.mark.slow
def test_bench_rl_prints_one_json_line(capsys) -> None:
    args = ["bench", "rl", "--preset", "tiny", "--batch-size", "1", "--group", "2", "--prompt-len", "4",
            "--max-new-tokens", "4", "--steps", "1", "--warmup", "1", "--dtype", "fp32", "--device", "cpu"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "rl" and result["dtype"] == "fp32" and result["trained_tokens_per_step"] == 8
    assert result["rollout_tokens_per_s"] > 0 and result["optimizer_steps_per_s"] > 0
    assert 0 < result["rollout_share"] < 1
