"""`matelike run`: stage order, skip-if-complete, resume after a failure, --force, pair split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from matelike.run import (BUDGETS, MIN_SCALE, SCALED, STAGES, TIME_PLAN, Pipeline, _fmt_s, _parse_stages,
                          calibration_command, plan_time, split_pairs, stage_commands)


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


def _steps(cmds: dict, stage: str) -> int:
    train = cmds[stage][-1]
    return int(train[train.index("--max-steps") + 1])


def test_a_time_budget_scales_pretraining_and_sft_by_hand() -> None:
    b = BUDGETS["tiny"]
    exp = dict(zip(STAGES, b.expected_s))
    rest = [s for s in STAGES if s not in ("data", "tokenizer", "pack")]
    fixed, scaled = sum(exp[s] for s in rest if s not in SCALED), sum(exp[s] for s in rest if s in SCALED)
    # the reference machine's pace: the preset's steps fit
    same = plan_time(b, 1.0, "calibration", 900, 20, rest)
    assert same.scale == 1.0 and same.predicted_s == pytest.approx(fixed + scaled) and "steps fit" in same.describe()
    # a machine 1.6x slower: the fixed stages take 1.6x, the scaled ones share what is left, in twentieths
    slow = plan_time(b, 1.6, "calibration", 900, 20, rest)
    exact = (880 - 1.6 * fixed) / (1.6 * scaled)
    assert slow.scale == pytest.approx(int(exact * 20) / 20) and exact - 0.05 < slow.scale <= exact
    assert slow.planned_s == pytest.approx(1.6 * (fixed + scaled * slow.scale))
    assert f"pretraining and SFT run {slow.scale:.0%} of the preset's steps" in slow.describe()
    # within the tolerance the preset's steps stay; past it they shrink
    just_over = 880 / (fixed + scaled) * 1.03  # predicted 3% over what is left
    within = plan_time(b, just_over, "c", 900, 20, rest, tolerance=0.05)
    assert within.scale == 1.0 and "steps stay" in within.describe() and "SFT plans again" in within.describe()
    assert plan_time(b, just_over, "c", 900, 20, rest).scale < 1.0
    # far too slow: never under MIN_SCALE, and the line says the budget will be exceeded
    crawl = plan_time(b, 10, "calibration", 900, 20, rest)
    assert crawl.scale == MIN_SCALE and "more than the budget holds" in crawl.describe()
    # before SFT only SFT is left to scale
    sft = plan_time(b, 1.6, "pretraining took 10m", 900, 500, rest[1:])
    assert "so SFT runs" in sft.describe() and sft.stage == "sft"
    cmds = stage_commands(Path("o"), "tiny", {"pretrain": 0.5, "sft": 0.25})
    assert _steps(cmds, "pretrain") == b.pretrain_steps // 2 and _steps(cmds, "sft") == b.sft_steps // 4
    assert _steps(cmds, "dpo") == b.dpo_steps and _steps(cmds, "rl") == b.rl_steps
    warm = cmds["pretrain"][0]
    assert warm[warm.index("--warmup-steps") + 1] == str(b.pretrain_steps // 2 // 20)


class SlowRunner(FakeRunner):
    """Each pretraining command takes `pretrain_s` of the pipeline's clock."""

    def __init__(self, out: Path, clock: list[float], pretrain_s: float) -> None:
        super().__init__(out)
        self.clock, self.pretrain_s = clock, pretrain_s

    def __call__(self, argv: list[str]) -> int:
        if argv[0] == "pretrain":
            self.clock[0] += self.pretrain_s
        return super().__call__(argv)


def test_the_pipeline_plans_before_pretraining_and_again_before_sft(tmp_path: Path, monkeypatch) -> None:
    import matelike.run as run

    b = BUDGETS["tiny"]
    exp = dict(zip(STAGES, b.expected_s))
    clock = [1000.0]
    monkeypatch.setattr(run.time, "time", lambda: clock[0])
    asked: list[list[str]] = []

    def slow_machine(argv: list[str]) -> float:
        asked.append(argv)
        return b.reference_tok_s / 1.6

    # pretraining then runs slower still than the calibration said (1.8x its share of the reference time)
    runner = SlowRunner(tmp_path, clock, 0.0)
    pipe = Pipeline(tmp_path, "tiny", list(STAGES), force=False, runner=runner, calibrate=slow_machine)
    real_plan = pipe._plan

    def plan_and_set_pace(stage, index, started, observed):
        real_plan(stage, index, started, observed)
        if stage == "pretrain":
            runner.pretrain_s = 1.8 * exp["pretrain"] * pipe.plans[0]["scale"]

    pipe._plan = plan_and_set_pace
    assert pipe.run() == 0
    assert asked == [calibration_command("tiny")]
    assert asked[0][:2] == ["bench", "train"] and asked[0][asked[0].index("--dtypes") + 1] == b.dtype
    plans = json.loads((tmp_path / TIME_PLAN).read_text())
    assert [p["stage"] for p in plans] == ["pretrain", "sft"] and plans[0]["slow"] == pytest.approx(1.6)
    assert plans[1]["slow"] == pytest.approx(1.8) and plans[1]["scale"] < plans[0]["scale"] < 1
    by_name = {c[0]: c for c in runner.calls if c[0] in ("pretrain", "sft")}
    assert _steps({"x": [by_name["pretrain"]]}, "x") == round(b.pretrain_steps * plans[0]["scale"])
    assert _steps({"x": [by_name["sft"]]}, "x") == round(b.sft_steps * plans[1]["scale"])
    # the markers (and so the report's commands) hold the steps that ran
    marker = json.loads((tmp_path / ".stages" / "sft.json").read_text())
    assert marker["commands"][-1] == ["matelike", *by_name["sft"]]
    # the ETA from SFT on is the last plan's: its pace and steps
    eta = Pipeline(tmp_path, "tiny", list(STAGES), force=False, runner=FakeRunner(tmp_path))
    eta.plans = plans
    assert f"ETA {_fmt_s(plans[1]['planned_s'])} at 1.00x" in eta._eta(STAGES.index("sft"), 0.0, {})

    # A re-run after an interrupted SFT keeps both decisions without measuring again.
    (tmp_path / ".stages" / "sft.json").unlink()
    again = FakeRunner(tmp_path)
    assert Pipeline(tmp_path, "tiny", list(STAGES), force=False, runner=again, calibrate=slow_machine).run() == 0
    assert len(asked) == 1 and [c for c in again.calls if c[0] == "sft"] == [by_name["sft"]]

    # --time-budget 0: the preset's steps, no calibration, and a forced re-run drops the old plan
    off = FakeRunner(tmp_path)
    assert Pipeline(tmp_path, "tiny", ["pretrain", "sft"], force=True, runner=off, calibrate=slow_machine,
                    time_budget_min=0).run() == 0
    assert len(asked) == 1 and not (tmp_path / TIME_PLAN).exists()
    assert [_steps({"x": [c]}, "x") for c in off.calls if c[0] in ("pretrain", "sft")] == [b.pretrain_steps,
                                                                                         b.sft_steps]


def test_a_failed_calibration_runs_the_presets_steps(tmp_path: Path) -> None:
    runner = FakeRunner(tmp_path)
    assert Pipeline(tmp_path, "tiny", ["pretrain"], force=False, runner=runner, calibrate=lambda argv: None).run() == 0
    assert _steps({"x": [runner.calls[0]]}, "x") == BUDGETS["tiny"].pretrain_steps
    assert not (tmp_path / TIME_PLAN).exists()
    # presets without a budget (micro, the GPU ones) never calibrate
    never = FakeRunner(tmp_path / "m")
    assert Pipeline(tmp_path / "m", "micro", ["pretrain"], force=False, runner=never,
                    calibrate=lambda argv: pytest.fail("calibrated")).run() == 0


def test_the_calibration_command_measures_this_machine(one_torch_thread) -> None:
    tok_s = Pipeline._calibrate_subprocess(calibration_command("tiny"))
    assert tok_s is not None and tok_s > 100


def test_a_calibration_that_fails_says_why(capsys: pytest.CaptureFixture) -> None:
    assert Pipeline._calibrate_subprocess(["bench", "train", "--preset", "no-such-preset"]) is None
    assert "the calibration failed" in capsys.readouterr().err


def test_a_bad_time_budget_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from matelike.cli import main

    for bad in ("-1", "nan", "inf"):
        assert main(["run", "--out", str(tmp_path / "r"), "--time-budget", bad]) == 2
        assert "--time-budget must be >= 0 minutes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
