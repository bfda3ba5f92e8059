"""`matelike report`: the report card from a run folder's metrics, markers and eval results."""

from __future__ import annotations

import json
from pathlib import Path

from matelike.report import build_report, read_metrics


def _write_run(run: Path) -> None:
    (run / ".stages").mkdir(parents=True)
    # written in this order so that alphabetical order is not pipeline order
    for stage, wall in (("sft", 60.0), ("data", 3.0), ("dpo", 30.0), ("pretrain", 120.0)):
        (run / ".stages" / f"{stage}.json").write_text(json.dumps(
            {"stage": stage, "wall_s": wall, "commands": [["matelike", stage, "--out", str(run / stage)]]}))
    for stage, base in (("pretrain", 6.0), ("sft", 3.0), ("dpo", 0.7)):
        (run / stage).mkdir()
        lines = [json.dumps({"step": s, "tokens": 1000 * s, "loss": base - 0.1 * s, "lr": 1e-3,
                             "tokens_per_s": 5000.0, "dtype": "fp32"}) for s in range(1, 6)]
        lines.append(json.dumps({"step": 5, "tokens": 5000, "loss": base - 0.5, "lr": 1e-3, "tokens_per_s": 5000.0,
                                 "val_loss": base - 0.4, "val_bpb": 2.0}))
        if stage == "dpo":
            lines.append(json.dumps({"step": 5, "tokens": 5000, "val_reward_accuracy": 0.75,
                                     "val_reward_margin": 0.3}))
        lines.append('{"step": 6, "tok')  # torn last line of a killed run
        (run / stage / "metrics.jsonl").write_text("\n".join(lines))
    (run / "eval").mkdir()
    for name, acc in (("pretrain", 0.5), ("sft", 0.85), ("dpo", 0.9)):
        (run / "eval" / f"{name}.json").write_text(json.dumps({
            "tasks": {"sentiment": {"accuracy": acc, "n": 10, "ci95": [acc - 0.2, min(1.0, acc + 0.1)]},
                      "segmentation": {"f1": acc - 0.1, "n": 10}},
            "val": {"loss": 3.0, "bpb": 1.5},
            "baselines": {"sentiment": {"accuracy": 0.5, "n": 10, "ci95": [0.24, 0.76]}},
            "chat": {"open": {"n": 40, "leak": {"rate": 1 - acc, "ci95": [0.0, 0.3]},
                              "identity": {"rate": acc, "n": 4, "ci95": [0.3, 1.0]},
                              "char_f1": {"mean": 0.2, "ci95": [0.1, 0.3]}, "rouge_l": {"mean": 0.1, "ci95": [0.05, 0.2]},
                              "baseline": {"char_f1": {"mean": 0.1, "ci95": [0.05, 0.15]},
                                           "rouge_l": {"mean": 0.05, "ci95": [0.0, 0.1]}}}},
            "samples": {"sentiment": {"task": "sentiment", "prompt": "判断评论情感：很好", "answer": "正面",
                                      "prediction": "正面"}}}))


def test_metrics_reader_skips_torn_line(tmp_path: Path) -> None:
    _write_run(tmp_path)
    rows = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert len(rows) == 6 and rows[-1]["val_loss"] == 2.6


def test_report_has_stages_curves_eval_table_samples_and_commands(tmp_path: Path) -> None:
    _write_run(tmp_path)
    text = build_report(tmp_path)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == text
    assert "| pretrain | – | fp32 | 5,000 | 120 s | 5,000 | 5.5000 | 5.6000 |" in text
    for stage in ("pretrain", "sft", "dpo"):
        png = tmp_path / f"loss_{stage}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png.name})" in text
    assert "| metric | pretrain | sft | dpo | rule baseline |" in text
    assert ("| sentiment accuracy (n=10) | 0.50 [0.30, 0.60] | 0.85 [0.65, 0.95] | 0.90 [0.70, 1.00] "
            "| 0.50 [0.24, 0.76] |") in text
    assert "| chat: task-format leak on open prompts (n=40, lower is better) | 0.50 [0.00, 0.30] |" in text
    assert "| held-out bpb | 1.5000 | 1.5000 | 1.5000 | – |" in text
    assert "判断评论情感：很好" in text and "model: 正面" in text
    commands = text.split("## Commands to reproduce")[1]
    order = [commands.index(f"matelike {stage} --out") for stage in ("data", "pretrain", "sft", "dpo")]
    assert order == sorted(order)  # pipeline order, runnable top to bottom
    assert "## Machine" in text and "torch" in text
    from matelike.device import cpu_description

    assert f"- CPU: {cpu_description()}," in text and cpu_description().endswith(")")  # with its bf16 support
    assert "DPO on held-out pairs: reward accuracy 0.7500, reward margin 0.3000." in text


def test_report_leaves_out_a_rate_with_no_items(tmp_path: Path) -> None:
    _write_run(tmp_path)
    assert "identity questions naming the model (n=4)" in build_report(tmp_path)
    for name in ("pretrain", "sft", "dpo"):  # a chat file without identity questions, as the demo's dev split
        f = tmp_path / "eval" / f"{name}.json"
        result = json.loads(f.read_text(encoding="utf-8"))
        result["chat"]["open"]["identity"] = {"rate": 0.0, "n": 0, "ci95": [0.0, 1.0]}
        f.write_text(json.dumps(result), encoding="utf-8")
    assert "identity questions" not in build_report(tmp_path)


def test_report_has_the_rl_stage_reward_curve_and_hack_references(tmp_path: Path) -> None:
    _write_run(tmp_path)
    (tmp_path / "rl").mkdir()
    rows = [{"step": s, "tokens": 100 * s, "loss": 0.01, "dtype": "bf16", "reward": 0.1 * s,
             "reward_segmentation": 0.2 * s, "reward_entities": 0.05 * s, "reward_std": 0.3} for s in range(1, 41)]
    (tmp_path / "rl" / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "rl" / "rl_data.json").write_text(json.dumps({"reward_hack_references": {
        "entities_always_none": 0.0, "entities_always_none_unguarded": 0.53}}))
    (tmp_path / "eval" / "rl.json").write_text((tmp_path / "eval" / "dpo.json").read_text().replace("0.9", "0.95"))
    text = build_report(tmp_path)
    assert "| rl | – | bf16 | 4,000 |" in text
    # the means of steps 1-10 and 31-40
    assert ("mean of the first and the last 10 steps: reward 0.550 → 3.550, entities 0.275 → 1.775, "
            "segmentation 1.100 → 7.100.") in text
    assert "entities always none 0.000 (0.530)" in text
    png = tmp_path / "reward_rl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(reward_rl.png)" in text
    assert "| metric | pretrain | sft | dpo | rl | rule baseline |" in text
    assert "| sentiment accuracy (n=10) | 0.50 [0.30, 0.60] | 0.85 [0.65, 0.95] | 0.90 [0.70, 1.00] | 0.95" in text


def test_report_has_paired_differences_between_consecutive_models(tmp_path: Path) -> None:
    _write_run(tmp_path)
    golds = ["正面", "负面"] * 50
    right = {"pretrain": 50, "sft": 80, "dpo": 82}  # the first k items right, the rest wrong
    flip = {"正面": "负面", "负面": "正面"}
    for name, k in right.items():
        rows = [{"task": "sentiment", "prompt": f"p{i}", "answer": g, "prediction": g if i < k else flip[g]}
                for i, g in enumerate(golds)]
        rows.append({"task": "chat", "kind": "open", "prompt": "你好", "answer": "你好", "prediction": "你好"})
        (tmp_path / "eval" / f"{name}_predictions.jsonl").write_text("\n".join(map(json.dumps, rows)))
    text = build_report(tmp_path)
    assert "| metric | sft − pretrain | dpo − sft |" in text
    row = next(line for line in text.splitlines() if line.startswith("| sentiment accuracy (n=100) | +0.300 ["))
    sft_minus_pretrain, dpo_minus_sft = row.split(" | ")[1:3]
    lo, hi = (float(x) for x in sft_minus_pretrain.split("[")[1].rstrip("]").split(", "))
    assert 0 < lo < 0.3 < hi  # 30 more right of 100: excludes 0
    assert dpo_minus_sft.startswith("+0.020 [+0.000, +0.0")  # only 2 items differ: never below 0


def test_report_says_how_the_time_budget_sized_the_run(tmp_path: Path) -> None:
    from matelike.run import BUDGETS, STAGES, TIME_PLAN, plan_time

    _write_run(tmp_path)
    assert "time budget" not in build_report(tmp_path)
    plans = [plan_time(BUDGETS["tiny"], 1.6, "calibration", 900, 20, list(STAGES[3:])),
             plan_time(BUDGETS["tiny"], 1.7, "pretraining's time", 900, 400, list(STAGES[4:]))]
    (tmp_path / TIME_PLAN).write_text(json.dumps([{"stage": p.stage, "describe": p.describe()} for p in plans]))
    lines = [x for x in build_report(tmp_path).splitlines() if "time budget" in x]
    assert lines == ["- " + p.describe() for p in plans]
    assert f"pretraining and SFT run {plans[0].scale:.0%}" in lines[0] and "before sft" in lines[1]


def test_report_has_the_constrained_answers_rows_and_their_differences(tmp_path: Path) -> None:
    """An eval with constrained segmentation answers adds their row, with the rule's and the classical tool's
    scores repeated there (their answers already spell the sentence), and its paired difference row."""
    _write_run(tmp_path)
    for name, f1 in (("pretrain", 0.1), ("sft", 0.7), ("dpo", 0.8)):
        f = tmp_path / "eval" / f"{name}.json"
        result = json.loads(f.read_text(encoding="utf-8"))
        result["constrained"] = {"segmentation": {"f1": f1, "n": 4, "ci95": [f1 - 0.1, f1 + 0.1]}}
        result["baselines"]["segmentation"] = {"f1": 0.35, "n": 4, "ci95": [0.3, 0.4]}
        result["classical"] = {"segmentation": {"f1": 0.81, "n": 4, "ci95": [0.79, 0.84], "method": "jieba"}}
        f.write_text(json.dumps(result), encoding="utf-8")
        rows = [{"task": "segmentation", "prompt": f"p{i}", "answer": "我们 去", "prediction": "我们去", **kind}
                for kind in ({}, {"kind": "constrained"}) for i in range(4)]
        if name != "pretrain":
            for r in rows[4:]:
                r["prediction"] = "我们 去"
        (tmp_path / "eval" / f"{name}_predictions.jsonl").write_text("\n".join(map(json.dumps, rows)))
    text = build_report(tmp_path)
    assert ("| segmentation f1, answer held to the sentence's characters (n=4) | 0.10 [0.00, 0.20] | "
            "0.70 [0.60, 0.80] | 0.80 [0.70, 0.90] | 0.35 [0.30, 0.40] | 0.81 [0.79, 0.84] |") in text
    assert "answered under constrained decoding" in text
    # The free answers are equally wrong in every model; the constrained ones all right after pretraining.
    assert "| segmentation f1 (n=4) | +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] |" in text
    assert ("| segmentation f1, answer held to the sentence's characters (n=4) | +1.000 [+1.000, +1.000] | "
            "+0.000 [+0.000, +0.000] |") in text
