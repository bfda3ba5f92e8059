"""`matelike run`: stage order, skip-if-complete, resume after a failure, --force, pair split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from matelike.run import STAGES, Pipeline, _parse_stages, split_pairs, stage_commands


class FakeRunner:
    """Records the commands; the pair stage writes a pairs file so the dpo stage can split it."""

    def __init__(self, out: Path, fail_on: str | None = None) -> None:
        self.out, self.fail_on, self.calls = out, fail_on, []

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        if self.fail_on and argv[0] == self.fail_on:
            return 3
        if argv[:2] == ["dpo", "make-pairs"]:
            p = Path(argv[argv.index("--out") + 1])
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n"
                                 for i in range(20)), encoding="utf-8")
        return 0


def test_runs_every_stage_in_order_then_skips_completed(tmp_path: Path) -> None:
    runner = FakeRunner(tmp_path)
    assert Pipeline(tmp_path, "micro", list(STAGES), force=False, runner=runner).run() == 0
    firsts = [c[0] if c[0] not in ("data", "tokenizer", "dpo") else " ".join(c[:2]) for c in runner.calls]
    assert firsts[:6] == ["data demo", "tokenizer train", "data pack", "pretrain", "data pack", "sft"]
    assert "--format" in runner.calls[4] and runner.calls[5][runner.calls[5].index("--data") + 1].endswith("sft.bin")
    assert firsts[6:11] == ["dpo make-pairs", "data pack", "dpo --init", "data pack", "rl"]
    assert [c[0] for c in runner.calls[11:15]] == ["eval"] * 4 and runner.calls[-1][0] == "report"
    for stage in STAGES:
        marker = json.loads((tmp_path / ".stages" / f"{stage}.json").read_text())
        assert marker["stage"] == stage and marker["commands"][0][0] == "matelike"

    again = FakeRunner(tmp_path)
    assert Pipeline(tmp_path, "micro", list(STAGES), force=False, runner=again).run() == 0
    assert again.calls == []  # everything complete: nothing re-run

    forced = FakeRunner(tmp_path)
    assert Pipeline(tmp_path, "micro", ["pretrain"], force=True, runner=forced).run() == 0
    assert [c[0] for c in forced.calls] == ["pretrain"]


def test_failure_stops_and_rerun_continues_from_the_failed_stage(tmp_path: Path) -> None:
    failing = FakeRunner(tmp_path, fail_on="sft")
    assert Pipeline(tmp_path, "micro", list(STAGES), force=False, runner=failing).run() == 3
    assert failing.calls[-1][0] == "sft"
    assert (tmp_path / ".stages" / "pretrain.json").is_file()
    assert not (tmp_path / ".stages" / "sft.json").exists()

    resumed = FakeRunner(tmp_path)
    assert Pipeline(tmp_path, "micro", list(STAGES), force=False, runner=resumed).run() == 0
    assert resumed.calls[1][0] == "sft"  # after packing its data again
    # training stages resume from their newest checkpoint rather than starting over
    assert "--resume" in resumed.calls[1]


def test_training_commands_resume_and_chain_models(tmp_path: Path) -> None:
    cmds = stage_commands(tmp_path, "tiny")
    sft = cmds["sft"][-1]
    assert sft[sft.index("--init") + 1] == str(tmp_path / "pretrain")
    dpo = cmds["dpo"][-1]
    assert dpo[dpo.index("--init") + 1] == str(tmp_path / "sft")
    rl = cmds["rl"][-1]
    assert rl[rl.index("--init") + 1] == str(tmp_path / "dpo")
    # DPO and RL read the files packed just before them, with the tokenizer of the model they start from
    for stage, fmt, source, packed in (("dpo", "dpo", tmp_path / "pairs" / "train.jsonl", "dpo.bin"),
                                       ("rl", "prompts", tmp_path / "data" / "rl_train.jsonl", "rl_prompts.bin")):
        pack, train = cmds[stage]
        assert pack[:4] == ["data", "pack", "--format", fmt] and pack[pack.index("--input") + 1] == str(source)
        assert pack[pack.index("--tokenizer") + 1] == train[train.index("--init") + 1]
        assert pack[pack.index("--out") + 1] == train[train.index("--data") + 1] == str(tmp_path / "pack" / packed)
    assert all("--resume" in cmds[s][-1] for s in ("pretrain", "sft", "dpo", "rl"))
    assert [c[c.index("--model") + 1] for c in cmds["eval"]] == [str(tmp_path / n)
                                                                 for n in ("pretrain", "sft", "dpo", "rl")]


def test_split_pairs_holds_out_every_tenth(tmp_path: Path) -> None:
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(f'{{"prompt": "p{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(25)))
    n_train, n_val = split_pairs(src, tmp_path / "t.jsonl", tmp_path / "v.jsonl")
    assert (n_train, n_val) == (23, 2)
    val = [json.loads(x)["prompt"] for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert val == ["p9", "p19"]
    train = (tmp_path / "t.jsonl").read_text()
    assert "p9\"" not in train and "p0\"" in train


def test_split_pairs_without_pairs_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "pairs.jsonl"
    src.write_text("")
    with pytest.raises(RuntimeError, match="no preference pairs"):
        split_pairs(src, tmp_path / "t.jsonl", tmp_path / "v.jsonl")


def test_stage_list_is_validated_and_ordered() -> None:
    assert _parse_stages("sft,pretrain") == ["pretrain", "sft"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown stage"):
        _parse_stages("pretrain,bogus")


def test_dpo_stage_without_pairs_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    class NoPairs(FakeRunner):
        def __call__(self, argv: list[str]) -> int:
            self.calls.append(argv)
            if argv[:2] == ["dpo", "make-pairs"]:
                p = Path(argv[argv.index("--out") + 1])
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("")
            return 0

    runner = NoPairs(tmp_path)
    assert Pipeline(tmp_path, "micro", list(STAGES), force=False, runner=runner).run() == 1
    assert "no preference pairs" in capsys.readouterr().err
    assert runner.calls[-1][:2] == ["dpo", "make-pairs"]  # dpo itself never started
    assert not (tmp_path / ".stages" / "dpo.json").exists()


def test_eta_is_shrunk_towards_the_expected_pace_and_says_it(tmp_path: Path) -> None:
    pipe = Pipeline(tmp_path, "tiny", list(STAGES), force=False, runner=FakeRunner(tmp_path))
    expected = dict(zip(STAGES, pipe.budget.expected_s))
    # A 5-second stage taking 12 s (2.4x) barely moves a 12-minute estimate, and the line says by how much.
    line = pipe._eta(1, 0.0, {"data": 12.0})
    pace = (12.0 + 60.0) / (expected["data"] + 60.0)
    assert f"at {pace:.2f}x the expected pace" in line and pace < 1.15
    fresh = pipe._eta(0, 0.0, {})
    assert "at 1.00x the expected pace" in fresh
