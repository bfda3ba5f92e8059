"""`matelike eval`: JSON schema and --limit on a tiny random model, held-out loss/bpb against a direct
computation, C-Eval letter scoring on a hand-checkable model, bad input reported with FILE:LINE."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from matelike.cli import main
from matelike.data.records import BadRecordReport, DataFileError
from matelike.eval import (
    answer_budget,
    choice_logprobs,
    encode_prompt,
    evaluate_mc,
    heldout_loss,
    load_mc_rows,
    load_task_items,
    mc_prompt,
)
from matelike.eval.scoring import TASKS, parse_entities

TEST_ITEMS = [
    {"task": "sentiment", "prompt": "判断评论情感（正面/负面）：这本书写得很好。", "answer": "正面"},
    {"task": "sentiment", "prompt": "判断评论情感（正面/负面）：质量太差了。", "answer": "负面"},
    {"task": "sentiment", "prompt": "判断评论情感（正面/负面）：服务很好。", "answer": "正面"},
    {"task": "segmentation", "prompt": "对句子分词，词语之间用空格分隔：今天天气很好。", "answer": "今天 天气 很 好 。"},
    {"task": "segmentation", "prompt": "中文分词：我们去公园。", "answer": "我们 去 公园 。"},
    {"task": "segmentation", "prompt": "中文分词：北京是首都。", "answer": "北京 是 首都 。"},
    {"task": "entities", "prompt": "找出句子中的人名、地名、机构名：江泽民在北京。", "answer": "人名：江泽民；地名：北京"},
    {"task": "entities", "prompt": "找出句子中的人名、地名、机构名：今天天气很好。", "answer": "无"},
    {"task": "entities", "prompt": "找出句子中的人名、地名、机构名：新华社报道。", "answer": "机构名：新华社"},
    {"task": "continuation", "prompt": "续写新闻段落：我们的祖国正在发生深刻的变化，", "answer": "经济建设取得了巨大的成就。"},
    {"task": "continuation", "prompt": "续写新闻段落：中国人民银行宣布下调存款利率，", "answer": "以促进经济增长。"},
    {"task": "continuation", "prompt": "续写新闻段落：学习语言模型需要", "answer": "大量的文本数据和计算资源。"},
]
VAL_DOCS = ["人民日报一九九八年元旦献词。", "这家店的服务很好，菜的味道也不错。", "The quick brown fox."]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from matelike.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                      max_seq_len=64)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tiny_model, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from matelike.model.io import save_model

    return save_model(tiny_model, tokenizer, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    _write_jsonl(tmp_path / "tasks_test.jsonl", TEST_ITEMS)
    _write_jsonl(tmp_path / "pretrain_val.jsonl", [{"text": t} for t in VAL_DOCS])
    return tmp_path


def _csv(path: Path, rows: list[str], header: str = "id,question,A,B,C,D,answer") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- command


def test_eval_writes_one_entry_per_task_with_metrics_in_range(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ceval = _csv(tmp_path / "math_val.csv", ["0,1+1=?,1,2,3,4,B", "1,2+2=?,4,5,6,7,A", "2,3+3=?,5,6,7,8,B"])
    out = tmp_path / "eval.json"
    preds = tmp_path / "preds.jsonl"
    code = main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--limit", "2", "--ceval", str(ceval),
                 "--out", str(out), "--predictions", str(preds), "--batch-size", "3", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "segmentation" in printed and "bpb" in printed and "math_val.csv" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["tasks"]) == set(TASKS)
    main_metric = {"sentiment": "accuracy", "segmentation": "f1", "entities": "f1", "continuation": "rouge_l"}
    for task, m in result["tasks"].items():
        assert m["n"] == 2  # --limit
        assert main_metric[task] in m
        assert all(0.0 <= v <= 1.0 for k, v in m.items() if k not in ("n", "ci95"))
        lo, hi = m["ci95"]  # the interval of the main metric holds it
        assert 0.0 <= lo <= m[main_metric[task]] <= hi <= 1.0
    val = result["val"]
    assert val["docs"] == 3 and val["bytes"] == sum(len(t.encode()) for t in VAL_DOCS)
    assert val["loss"] > 0 and val["bpb"] > 0
    assert result["ceval"][str(ceval)]["n"] == 2  # --limit applies per C-Eval file too
    assert 0 <= result["ceval"][str(ceval)]["accuracy"] <= 1
    assert result["bad_records"] == 0
    # Rule-based floors on the same items, for every task that has a rule.
    assert set(result["baselines"]) == set(TASKS)
    assert all(m["n"] == 2 for m in result["baselines"].values())
    assert "baseline" in printed
    assert set(result["samples"]) == set(TASKS)
    rows = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12 and {"task", "prompt", "answer", "prediction"} <= set(rows[0])
    # Segmentation and entities answered a second time under their constraints: the segmentation answers spell
    # the gold's sentence exactly, every entity named is in the sentence.
    constrained = [r for r in rows if r.get("kind") == "constrained"]
    assert [r["task"] for r in constrained] == ["segmentation"] * 2 + ["entities"] * 2
    assert all(r["prediction"].replace(" ", "") == r["answer"].replace(" ", "") for r in constrained[:2])
    for r in constrained[2:]:
        assert r["prediction"] == "无" or parse_entities(r["prediction"])
        # (an answer cut by its token budget may end inside a character: its last name is cut, still a span)
        assert all(name.rstrip("\ufffd") in r["prompt"] for _, name in parse_entities(r["prediction"]))
    assert {t: m["n"] for t, m in result["constrained"].items()} == {"segmentation": 2, "entities": 2}
    assert "segmentation (constrained)" in printed and "entities (constrained)" in printed


def test_eval_split_dev_reads_the_development_files(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    dev = [r for r in TEST_ITEMS if r["task"] == "sentiment"][:2]
    _write_jsonl(data_dir / "tasks_dev.jsonl", dev)
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--split", "dev", "--tasks", "sentiment",
                 "--out", str(out)])
    assert code == 0
    assert json.loads(out.read_text(encoding="utf-8"))["tasks"]["sentiment"]["n"] == 2  # the test file holds 3


def test_eval_subset_of_tasks_and_plain_prompts(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(model_dir), "--tasks-file", str(data_dir / "tasks_test.jsonl"),
                 "--tasks", "sentiment,entities", "--prompt-format", "plain", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert list(result["tasks"]) == ["sentiment", "entities"] and "val" not in result
    assert result["tasks"]["sentiment"]["n"] == 3


def test_eval_usage_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(model_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--val", str(tmp_path / "v.jsonl")]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(model_dir), "--tasks", "sentiment,poetry"])
    assert "poetry" in capsys.readouterr().err
    # a task asked for but absent from the file
    only = _write_jsonl(tmp_path / "t.jsonl", TEST_ITEMS[:3])
    assert main(["eval", "--model", str(model_dir), "--tasks-file", str(only), "--tasks", "sentiment,entities"]) == 2
    assert "no test items for task(s) entities" in capsys.readouterr().err


def test_bad_task_records_are_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join([
        json.dumps(TEST_ITEMS[0], ensure_ascii=False),
        '{"task": "sentiment", "prompt": "截断',
        json.dumps({"task": "sentiment", "answer": "正面"}),
        json.dumps({"task": "poetry", "prompt": "写诗", "answer": "好"}, ensure_ascii=False),
        json.dumps({"task": "sentiment", "prompt": "好", "answer": 1}, ensure_ascii=False),
        json.dumps(TEST_ITEMS[1], ensure_ascii=False),
    ]) + "\n", encoding="utf-8")
    err = io.StringIO()
    report = BadRecordReport(stream=err)
    items = load_task_items(path, ["sentiment"], None, report)
    assert [r["answer"] for r in items["sentiment"]] == ["正面", "负面"]  # good records all kept
    lines = err.getvalue().splitlines()
    assert lines[0].startswith(f"{path}:2: invalid JSON")
    assert lines[1] == f"{path}:3: missing field: 'prompt'"
    assert lines[2].startswith(f"{path}:4: unknown task: 'poetry'")
    assert lines[3] == f"{path}:5: wrong type: field 'answer' is not a string"
    assert report.total == 4


def test_limit_takes_the_first_items_in_file_order(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "t.jsonl", TEST_ITEMS)
    items = load_task_items(path, list(TASKS), 2, BadRecordReport())
    assert [r["prompt"] for r in items["sentiment"]] == [TEST_ITEMS[0]["prompt"], TEST_ITEMS[1]["prompt"]]


def test_answer_budget(tokenizer) -> None:
    n = len(tokenizer.encode("经济建设取得了巨大的成就。"))
    assert answer_budget(tokenizer, "经济建设取得了巨大的成就。") == math.ceil(1.5 * n) + 8
    assert answer_budget(tokenizer, "") == 8


def test_chat_prompt_ends_with_the_assistant_header(tokenizer) -> None:
    ids = encode_prompt(tokenizer, "你好", "chat")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(encode_prompt(tokenizer, "你好", "plain")) == "你好\n"


# ---------------------------------------------------------------------------------------------- held-out loss


def test_heldout_loss_matches_a_direct_computation(tiny_model, tokenizer, tmp_path: Path) -> None:
    docs = VAL_DOCS * 3
    path = _write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in docs])
    result = heldout_loss(tiny_model, tokenizer, path, BadRecordReport(), batch_size=2)
    stream = []
    for t in docs:
        stream += [tokenizer.eos_id] + tokenizer.encode(t)
    T = tiny_model.config.max_seq_len
    assert len(stream) > T  # several windows, so window stitching is exercised
    nll_all, nll_text = [], []
    with torch.no_grad():
        for s in range(0, len(stream) - 1, T):
            chunk = torch.tensor(stream[s:s + T + 1])
            logits = tiny_model(chunk[None, :-1]).logits[0].float()
            nll = F.cross_entropy(logits, chunk[1:], reduction="none")
            nll_all += nll.tolist()
            nll_text += [v for v, tok in zip(nll.tolist(), chunk[1:].tolist()) if tok != tokenizer.eos_id]
    assert result["tokens"] == len(stream) - 1 == len(nll_all)
    assert result["loss"] == pytest.approx(sum(nll_all) / len(nll_all), rel=1e-5)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    assert result["bpb"] == pytest.approx(sum(nll_text) / math.log(2) / n_bytes, rel=1e-5)
    # --val-max-tokens reads whole documents only
    short = heldout_loss(tiny_model, tokenizer, path, BadRecordReport(), max_tokens=3)
    assert short["docs"] == 1 and short["bytes"] == len(VAL_DOCS[0].encode("utf-8"))


def test_heldout_loss_reports_bad_documents(tiny_model, tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "val.jsonl"
    path.write_bytes(b'{"text": "\xe5\xa5\xbd\xe7\x9a\x84"}\n{"text": 3}\n\xff\xfe\n{"text": ""}\n')
    err = io.StringIO()
    report = BadRecordReport(stream=err)
    result = heldout_loss(tiny_model, tokenizer, path, report)
    assert result["docs"] == 1
    out = err.getvalue()
    assert f"{path}:2: wrong type" in out and f"{path}:3: invalid UTF-8" in out and f"{path}:4: empty text" in out


# ---------------------------------------------------------------------------------------------- multiple choice


class FavouriteTokenModel(torch.nn.Module):
    """Logits 0 everywhere except `favourite`, so the letter whose token it is wins by a known margin."""

    def __init__(self, vocab: int, favourite: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=512, vocab_size=vocab)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.favourite = vocab, favourite

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 5.0
        return SimpleNamespace(logits=logits)


def test_multiple_choice_picks_the_most_likely_letter(tokenizer, tmp_path: Path) -> None:
    (c_id,) = tokenizer.encode("C")
    model = FavouriteTokenModel(tokenizer.vocab_size, c_id)
    scores = choice_logprobs(model, tokenizer, tokenizer.encode("问题"))
    # log-softmax by hand: one logit of 5, the rest 0
    log_z = math.log(math.exp(5.0) + tokenizer.vocab_size - 1)
    assert scores[2] == pytest.approx(5.0 - log_z, abs=1e-5)
    assert scores[0] == scores[1] == scores[3] == pytest.approx(-log_z, abs=1e-5)
    row = {"question": "1+1=? ", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}
    assert mc_prompt(row) == "以下是单项选择题，请选出其中的正确答案。\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    path = _csv(tmp_path / "dev.csv", ["0,问一,甲,乙,丙,丁,C", "1,问二,甲,乙,丙,丁,c", "2,问三,甲,乙,丙,丁,A"])
    result = evaluate_mc(model, tokenizer, path, BadRecordReport())
    assert result == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3), "bad": 0}


def test_multiple_choice_scores_match_brute_force(tiny_model, tokenizer) -> None:
    prompt = tokenizer.encode("1+1=? A. 1 B. 2 C. 3 D. 4 答案：")
    assert len(prompt) < tiny_model.config.max_seq_len - 1  # no truncation in this comparison
    scores = choice_logprobs(tiny_model, tokenizer, prompt)
    with torch.no_grad():
        for letter, score in zip("ABCD", scores):
            ids = prompt + tokenizer.encode(letter)
            logp = F.log_softmax(tiny_model(torch.tensor([ids])).logits[0].float(), dim=-1)
            expect = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tokenizer.encode(letter)))
            assert score == pytest.approx(expect, abs=1e-4)


def test_bad_csv_rows_are_reported_with_file_and_line(tmp_path: Path) -> None:
    path = _csv(tmp_path / "bad.csv", [
        "0,好问题,甲,乙,丙,丁,A",
        "1,,甲,乙,丙,丁,B",
        "2,问题,甲,乙,丙,丁,E",
        "3,问题,甲,乙",
        '4,"多行\n问题",甲,乙,丙,丁,D',
    ])
    err = io.StringIO()
    report = BadRecordReport(stream=err)
    rows = load_mc_rows(path, report)
    assert [r["answer"] for r in rows] == ["A", "D"]
    lines = err.getvalue().splitlines()
    assert lines == [f"{path}:3: empty text: field 'question'",
                     f"{path}:4: bad answer: 'E' (expected one of A, B, C, D)",
                     f"{path}:5: wrong number of columns: 4, header has 7"]
    with pytest.raises(DataFileError, match=r"nohdr\.csv:1: CSV header lacks column\(s\) answer"):
        load_mc_rows(_csv(tmp_path / "nohdr.csv", ["0,q,a,b,c,d"], header="id,question,A,B,C,D"), report)


def test_eval_accepts_a_bf16_mixture_of_experts_model(tokenizer, data_dir: Path, tmp_path: Path) -> None:
    from matelike.eval import run_eval
    from matelike.model.io import save_model
    from matelike.model.transformer import ModelConfig, Transformer

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32,
                      max_seq_len=64, n_experts=2, n_experts_per_tok=1)
    path = save_model(Transformer(cfg).to(torch.bfloat16), tokenizer, tmp_path / "moe")
    result = run_eval(path, tasks_file=data_dir / "tasks_test.jsonl", tasks=["sentiment"], limit=1,
                      val=data_dir / "pretrain_val.jsonl")
    assert result["tasks"]["sentiment"]["n"] == 1
    assert math.isfinite(result["val"]["loss"]) and result["val"]["bpb"] > 0


def test_batched_answers_equal_each_prompt_decoded_alone(tokenizer) -> None:
    """The engine decodes 3 prompts at a time, each to its own budget; every answer is the one greedy decoding
    of that prompt alone gives (recomputed here without any cache), cut at its budget and at a stop id."""
    from matelike.eval import generate_answers
    from matelike.model.generation import default_stop_ids
    from matelike.model.transformer import ModelConfig, Transformer

    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                    hidden_dim=64, max_seq_len=64, init_std=0.3)).eval()
    prompts = [encode_prompt(tokenizer, it["prompt"], fmt) for it in TEST_ITEMS for fmt in ("chat", "plain")]
    budgets = [answer_budget(tokenizer, it["answer"]) for it in TEST_ITEMS for _ in range(2)]
    assert len({len(p) for p in prompts}) > 3 and any(len(p) + b > 64 for p, b in zip(prompts, budgets))
    stops = set(default_stop_ids(tokenizer))
    expected = []
    for ids, budget in zip(prompts, budgets):
        x = torch.tensor([ids[-(64 - budget):]])
        new: list[int] = []
        with torch.no_grad():
            for _ in range(budget):
                t = int(model(x).logits[0, -1].argmax())
                if t in stops:
                    break
                new.append(t)
                x = torch.cat([x, torch.tensor([[t]])], dim=1)
        expected.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    done: list[int] = []
    assert generate_answers(model, tokenizer, prompts, budgets, batch_size=3, progress=done.append) == expected
    assert sum(done) == len(prompts)
