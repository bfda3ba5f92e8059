"""Classical baselines (matelike/eval/classical.py): the naive Bayes against a hand computation, the SFT reviews
it learns from, jieba's answers in the demo formats, the eval JSON's `classical` section, the note when jieba
is missing, and the report's column."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from matelike.cli import main
from matelike.data.records import BadRecordReport
from matelike.eval.classical import (
    INSTALL_HINT,
    NaiveBayes,
    classical_baselines,
    jieba_entities,
    jieba_segmentation,
    load_jieba,
    sft_reviews,
)
from matelike.eval.scoring import PHRASINGS, TASKS, make_prompt, prompt_input, score_task

REVIEWS = [("质量很好，非常满意", "正面"), ("很好用，推荐购买", "正面"), ("物流很快，好评", "正面"),
           ("质量太差，非常失望", "负面"), ("很差劲，不推荐", "负面"),
           ("坏了，退货，差评", "负面")]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- naive Bayes


def test_naive_bayes_log_scores_match_a_hand_computation() -> None:
    nb = NaiveBayes().fit(["好好", "差"], ["正面", "负面"])
    # Features: 好好 -> 好, 好, 好好; 差 -> 差. Vocabulary {好, 好好, 差}: |V| = 3; 正面 has 3 features, 负面 1.
    # "好差" -> 好, 差 and the bigram 好差, never seen in training, so left out.
    scores = nb.log_scores("好差")
    assert scores["正面"] == pytest.approx(math.log(1 / 2) + math.log((2 + 1) / (3 + 3))
                                         + math.log((0 + 1) / (3 + 3)))
    assert scores["负面"] == pytest.approx(math.log(1 / 2) + math.log((0 + 1) / (1 + 3))
                                         + math.log((1 + 1) / (1 + 3)))
    assert nb.predict("好差") == "负面"  # log(1/2 * 3/6 * 1/6) < log(1/2 * 1/4 * 2/4)
    assert nb.docs == {"正面": 1, "负面": 1}


def test_naive_bayes_classifies_an_obvious_review() -> None:
    nb = NaiveBayes().fit([t for t, _ in REVIEWS], [y for _, y in REVIEWS])
    assert nb.predict("非常满意，质量很好，推荐") == "正面"
    assert nb.predict("太差了，非常失望，退货") == "负面"
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        NaiveBayes().fit(["a", "b"], ["正面"])


# ---------------------------------------------------------------------------------------------- training reviews


def test_prompt_input_inverts_every_demo_phrasing() -> None:
    rng = random.Random(0)
    for task in TASKS:
        for phrasing in PHRASINGS[task]:
            text = "评论：很好\n真的" if task == "sentiment" else "江泽民在北京。"
            assert prompt_input(task, phrasing.format(text=text)) == text
        assert prompt_input(task, make_prompt(task, "你好", rng)) == "你好"
    assert prompt_input("sentiment", "请问这是什么？") is None


def test_sft_reviews_are_the_labelled_sentiment_turns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(1)
    small_talk = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    sft = _write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": [{"role": "user", "content": make_prompt("sentiment", "质量很好", rng)},
                           {"role": "assistant", "content": "正面"}]},
        {"messages": [*small_talk, {"role": "user", "content": make_prompt("sentiment", "太差了", rng)},
                      {"role": "assistant", "content": "负面"}]},  # asked after small talk: a review too
        {"conversations": [{"role": "user", "content": make_prompt("segmentation", "今天很好", rng)},
                           {"role": "assistant", "content": "今天 很 好"}]},
        {"messages": [{"role": "user", "content": "这个好吗？"}, {"role": "assistant", "content": "正面"}]},
        {"messages": "not a list"},
    ])
    report = BadRecordReport()
    assert sft_reviews(sft, report) == (["质量很好", "太差了"], ["正面", "负面"])
    assert report.total == 1 and f"{sft}:5: wrong type" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- jieba


def test_jieba_answers_in_the_demo_formats() -> None:
    jb = load_jieba()
    sentence = "江泽民在北京会见了新华社记者。"
    assert jieba_entities(jb, sentence) == "人名：江泽民；地名：北京；机构名：新华社"
    assert jieba_entities(jb, "今天天气很好。") == "无"
    seg = jieba_segmentation(jb, sentence)
    assert seg == "江泽民 在 北京 会见 了 新华社 记者 。"
    assert score_task("segmentation", ["江泽民 在 北京 会见 了 新华社 记者 。"], [seg])["f1"] == 1.0


def test_classical_baselines_score_with_intervals_and_say_what_is_left_out(tmp_path: Path) -> None:
    sft = _write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": [{"role": "user", "content": f"判断评论情感（正面/负面）：{t}"},
                           {"role": "assistant", "content": y}]} for t, y in REVIEWS])
    items = {"sentiment": [{"prompt": "判断评论情感（正面/负面）：非常满意，推荐", "answer": "正面"},
                           {"prompt": "x", "input": "非常失望，差评", "answer": "负面"}],
             "entities": [{"prompt": "中文分词：no demo phrasing here", "answer": "无"}],
             "continuation": [{"prompt": "续写新闻段落：今天", "answer": "天气很好。"}]}
    out, notes = classical_baselines(items, reviews=sft, report=BadRecordReport(), jieba=load_jieba())
    assert set(out) == {"sentiment"}  # continuation has no tool; the entity item's text cannot be recovered
    s = out["sentiment"]
    assert s["n"] == 2 and s["accuracy"] == 1.0 and s["train_reviews"] == 6
    assert s["ci95"] == pytest.approx([0.342, 1.0], abs=1e-3)  # Wilson, as every eval rate
    assert notes == ["classical entities baseline left out: 1 of its 1 items have no `input` field and a prompt "
                     "in none of the demo's phrasings"]
    _, notes = classical_baselines(items, reviews=None, report=BadRecordReport(), jieba=None)
    assert notes[0] == f"classical baselines for entities need jieba: {INSTALL_HINT}"
    assert "no SFT file" in notes[1]


# ---------------------------------------------------------------------------------------------- eval and report

TEST_ITEMS = [
    {"task": "sentiment", "prompt": "判断评论情感（正面/负面）：非常满意，推荐", "answer": "正面"},
    {"task": "sentiment", "prompt": "判断评论情感（正面/负面）：非常失望，差评", "answer": "负面"},
    {"task": "segmentation", "prompt": "中文分词：我们去北京。", "answer": "我们 去 北京 。", "input": "我们去北京。"},
    {"task": "segmentation", "prompt": "中文分词：今天很好。", "answer": "今天 很 好 。"},
    {"task": "entities", "prompt": "找出句子中的人名、地名、机构名：江泽民在北京。", "answer": "人名：江泽民；地名：北京"},
    {"task": "entities", "prompt": "找出句子中的人名、地名、机构名：今天很好。", "answer": "无"},
    {"task": "continuation", "prompt": "续写新闻段落：今天", "answer": "天气很好。"},
]


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from matelike.model.io import save_model
    from matelike.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                      max_seq_len=64)
    return save_model(Transformer(cfg).eval(), tokenizer, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "tasks_test.jsonl", TEST_ITEMS)
    _write_jsonl(data / "pretrain_val.jsonl", [{"text": "人民日报一九九八年元旦献词。"}])
    _write_jsonl(data / "sft.jsonl", [{"conversations": [{"role": "user", "content": f"中文分词：{t}"},
                                                         {"role": "assistant", "content": " ".join(t)}]}
                                      for t, _ in REVIEWS[:1]]
                 + [{"conversations": [{"role": "user", "content": f"判断评论情感（正面/负面）：{t}"},
                                       {"role": "assistant", "content": y}]} for t, y in REVIEWS])
    return data


def _eval(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> int:
    return main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--limit", "2", "--out", str(out),
                 "--batch-size", "4", "--device", "cpu", "--quiet", *extra])


def test_eval_json_has_a_classical_section_beside_the_baselines(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    assert _eval(model_dir, data_dir, out) == 0  # on by default with --data
    printed = capsys.readouterr()
    assert "classical" in printed.out.splitlines()[0] and "note:" not in printed.err
    result = json.loads(out.read_text(encoding="utf-8"))
    classical = result["classical"]
    assert set(classical) == {"sentiment", "segmentation", "entities"}  # continuation has no classical tool
    for task, m in classical.items():
        assert m["n"] == 2 and m["n"] == result["baselines"][task]["n"]  # the same items
        key = {"sentiment": "accuracy", "segmentation": "f1", "entities": "f1"}[task]
        lo, hi = m["ci95"]
        assert 0.0 <= lo <= m[key] <= hi <= 1.0
    assert classical["sentiment"]["accuracy"] == 1.0 and classical["sentiment"]["train_reviews"] == len(REVIEWS)
    assert classical["entities"]["f1"] == 1.0  # jieba finds 江泽民 and 北京, and says 无 for the other
    assert _eval(model_dir, data_dir, out, "--no-classical") == 0
    assert "classical" not in json.loads(out.read_text(encoding="utf-8"))


def test_eval_without_jieba_says_how_to_install_it(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "jieba", None)  # `import jieba` now raises ImportError
    monkeypatch.setitem(sys.modules, "jieba.posseg", None)
    out = tmp_path / "eval.json"
    assert _eval(model_dir, data_dir, out) == 0
    err = capsys.readouterr().err
    assert f"note: classical baselines for segmentation and entities need jieba: {INSTALL_HINT}" in err
    assert "Traceback" not in err
    assert set(json.loads(out.read_text(encoding="utf-8"))["classical"]) == {"sentiment"}  # needs no jieba
    # Asked for explicitly, a missing jieba is an error: one line, exit code 2, before any model is loaded.
    assert _eval(model_dir, data_dir, out, "--classical") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --classical needs jieba for segmentation and entities: {INSTALL_HINT}"]


def test_a_reviews_file_turns_the_classical_sentiment_on_without_data(model_dir: Path, data_dir: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--tasks-file", str(data_dir / "tasks_test.jsonl"), "--tasks",
                 "sentiment", "--classical-reviews", str(data_dir / "sft.jsonl"), "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["classical"]["sentiment"]["accuracy"] == 1.0


def test_eval_with_a_missing_reviews_file_is_a_one_line_error(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    assert _eval(model_dir, data_dir, tmp_path / "e.json", "--classical-reviews", str(missing)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0]


def test_report_has_a_classical_column_naming_the_tools(tmp_path: Path) -> None:
    from matelike.report import build_report

    (tmp_path / "eval").mkdir()
    base = {"baselines": {"sentiment": {"accuracy": 0.5, "n": 300, "ci95": [0.44, 0.56]}}}
    for name, acc in (("sft", 0.80), ("dpo", 0.85)):
        result = {"tasks": {"sentiment": {"accuracy": acc, "n": 300, "ci95": [acc - 0.05, acc + 0.04]},
                            "segmentation": {"f1": 0.7, "n": 300, "ci95": [0.67, 0.73]}}, **base}
        if name == "dpo":  # only the final model's eval is read for the references
            result["classical"] = {
                "sentiment": {"accuracy": 0.827, "n": 300, "ci95": [0.78, 0.865], "method": "naive Bayes X"},
                "segmentation": {"f1": 0.815, "n": 300, "ci95": [0.792, 0.836], "method": "jieba Y"}}
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(result), encoding="utf-8")
    text = build_report(tmp_path)
    assert "| metric | sft | dpo | rule baseline | classical |" in text
    assert "| sentiment accuracy (n=300) | 0.80 [0.75, 0.84] | 0.85 [0.80, 0.89] | 0.50 [0.44, 0.56] | " \
           "0.83 [0.78, 0.86] |" in text
    assert "| segmentation f1 (n=300) | 0.70 [0.67, 0.73] | 0.70 [0.67, 0.73] | – | 0.81 [0.79, 0.84] |" in text
    assert "classical column is what standard tools score on the same items: sentiment: naive Bayes X; " \
           "segmentation: jieba Y." in text
    (tmp_path / "eval" / "dpo.json").write_text(json.dumps({"tasks": {}, **base}), encoding="utf-8")
    text = build_report(tmp_path)
    assert "| metric | sft | dpo | rule baseline |" in text and "classical column" not in text


def test_the_demo_scores_the_classical_tools_once_beside_the_final_model(tmp_path: Path) -> None:
    from matelike.run import TRAINED, stage_commands

    evals = stage_commands(tmp_path, "tiny")["eval"]
    skipped = [c[c.index("--model") + 1] for c in evals if "--no-classical" in c]
    assert skipped == [str(tmp_path / n) for n in TRAINED[:-1]] and "--data" in evals[-1]
