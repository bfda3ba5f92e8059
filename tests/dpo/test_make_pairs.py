"""make-pairs: choosing the rejected answer, the output layout, counts, resume, bad input, the command."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from matelike.data.records import BadRecordReport
from matelike.dpo.make_pairs import SAMPLING, PairsError, PromptItem, make_pairs, pick_rejected


def _item(gold: str, task: str | None) -> PromptItem:
    return PromptItem(1, "p", [{"role": "user", "content": "p"}], gold, task)


def test_pick_rejected_by_the_task_scorer() -> None:
    assert pick_rejected(_item("正面", "sentiment"), ["正面", "负面", "正面"]) == ("负面", "pairs")
    assert pick_rejected(_item("正面", "sentiment"), ["正面", "正面。"]) == (None, "already_right")
    assert pick_rejected(_item("正面", "sentiment"), ["", "正面"]) == (None, "no_answer")
    # segmentation: the lowest F1 is rejected, a perfect one is not a candidate
    samples = ["我们 是 学生", "我 们是 学生", "我们是学 生"]
    assert pick_rejected(_item("我们 是 学生", "segmentation"), samples) == ("我们是学 生", "pairs")


def test_pick_rejected_open_ended_takes_a_different_answer() -> None:
    assert pick_rejected(_item("晴天。", None), [" 晴天。", "下雨。", "阴天。"]) == ("下雨。", "pairs")
    assert pick_rejected(_item("晴天。", None), ["晴天。", "晴天。\n"]) == (None, "already_right")


ANSWERS = ["正面", "负面", "北京 是 首都", "北京是 首都", "人名：江泽民", "无"]


def _fake_generate(tokenizer, calls: list | None = None, fail_on: int | None = None):
    """A stand-in for matelike.model.generation.generate: sampled answers depend only on the seed and the row."""

    def gen(model, prompts, *, max_new_tokens, sampling, stop_ids):
        seed = sampling.seed
        if sampling.temperature == 0:  # greedy: one fixed answer per prompt
            return [tokenizer.encode(ANSWERS[sum(p) % len(ANSWERS)]) + [tokenizer.im_end_id] for p in prompts]
        if calls is not None:
            calls.append(seed)
            if fail_on is not None and len(calls) == fail_on:
                raise KeyboardInterrupt  # killed in the middle of a run
        rng = random.Random(seed)
        return [tokenizer.encode(rng.choice(ANSWERS)) + [tokenizer.im_end_id] for _ in prompts]

    return gen


def _tasks_file(tmp_path: Path, n: int = 10) -> Path:
    rows = []
    for i in range(n):
        kind = ("sentiment", "segmentation", "entities", "open")[i % 4]
        if kind == "sentiment":
            rows.append({"task": "sentiment", "prompt": f"判断评论情感：第{i}条很好。", "answer": "正面"})
        elif kind == "segmentation":
            rows.append({"task": "segmentation", "prompt": f"分词{i}：北京是首都", "answer": "北京 是 首都"})
        elif kind == "entities":
            rows.append({"task": "entities", "prompt": f"实体{i}：江泽民讲话", "answer": "人名：江泽民"})
        else:
            rows.append({"prompt": [{"role": "user", "content": f"问题{i}"}], "chosen": "回答"})
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pairs_are_trl_columns_and_counted(tmp_path: Path, tokenizer) -> None:
    from matelike.data.preference import load_preference_pairs

    data, out = _tasks_file(tmp_path), tmp_path / "pairs.jsonl"
    counts = make_pairs(None, tokenizer, data, out, samples=3, batch_size=4, sampling=SAMPLING.with_seed(5),
                        generate_fn=_fake_generate(tokenizer))
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert counts.prompts == 10 and counts.pairs == len(recs)
    assert counts.pairs + counts.already_right + counts.no_answer + counts.too_long == 10
    assert sum(v.get("pairs", 0) for v in counts.by_task.values()) == counts.pairs
    for r in recs:
        assert set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
        assert r["rejected"] in ANSWERS
    # and the DPO stage reads them back without a single bad record
    report = BadRecordReport(stream=io.StringIO())
    pairs, stats = load_preference_pairs([out], tokenizer, seq_len=256, report=report)
    assert stats.pairs == counts.pairs and stats.bad == 0


def test_the_greedy_answer_is_a_candidate_for_rejected(tmp_path: Path, tokenizer) -> None:
    """Sampling finds only right answers, greedy decoding a wrong one: that wrong one is what DPO must see."""
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"task": "sentiment", "prompt": "判断评论情感：很好", "answer": "正面"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    seen: list[float] = []

    def gen(model, prompts, *, max_new_tokens, sampling, stop_ids):
        seen.append(sampling.temperature)
        answer = "负面" if sampling.temperature == 0 else "正面"
        return [tokenizer.encode(answer) + [tokenizer.im_end_id] for _ in prompts]

    counts = make_pairs(None, tokenizer, data, tmp_path / "g.jsonl", samples=3, generate_fn=gen)
    assert seen == [1.0, 0.0] and counts.pairs == 1
    assert json.loads((tmp_path / "g.jsonl").read_text(encoding="utf-8"))["rejected"] == "负面"
    seen.clear()
    counts = make_pairs(None, tokenizer, data, tmp_path / "s.jsonl", samples=3, greedy=False, generate_fn=gen)
    assert seen == [1.0] and counts.already_right == 1 and counts.pairs == 0


def test_limit_takes_the_first_prompts(tmp_path: Path, tokenizer) -> None:
    counts = make_pairs(None, tokenizer, _tasks_file(tmp_path), tmp_path / "p.jsonl", samples=2, limit=3,
                        batch_size=2, generate_fn=_fake_generate(tokenizer))
    assert counts.prompts == 3


def test_resume_after_interruption_writes_what_one_run_writes(tmp_path: Path, tokenizer) -> None:
    data = _tasks_file(tmp_path, n=11)
    whole = tmp_path / "whole.jsonl"
    make_pairs(None, tokenizer, data, whole, samples=3, batch_size=3, sampling=SAMPLING.with_seed(7),
               generate_fn=_fake_generate(tokenizer))

    out = tmp_path / "resumed.jsonl"
    calls: list = []
    with pytest.raises(KeyboardInterrupt):  # dies while generating the third batch
        make_pairs(None, tokenizer, data, out, samples=3, batch_size=3, sampling=SAMPLING.with_seed(7),
                   generate_fn=_fake_generate(tokenizer, calls, fail_on=3))
    with open(out, "ab") as f:  # and a half-written line, as from a crash in the middle of a write
        f.write(b'{"prompt": "trunc')
    calls2: list = []
    counts = make_pairs(None, tokenizer, data, out, samples=3, batch_size=3, sampling=SAMPLING.with_seed(7),
                        generate_fn=_fake_generate(tokenizer, calls2))
    assert calls2 == calls[2:] + calls2[1:]  # restarted at the third batch, not at the start
    assert len(calls2) == 2 and counts.prompts == 11
    assert out.read_bytes() == whole.read_bytes()
    # finished: a re-run generates nothing and changes nothing
    calls3: list = []
    make_pairs(None, tokenizer, data, out, samples=3, batch_size=3, sampling=SAMPLING.with_seed(7),
               generate_fn=_fake_generate(tokenizer, calls3))
    assert calls3 == [] and out.read_bytes() == whole.read_bytes()


def test_resume_refuses_other_settings_or_a_foreign_file(tmp_path: Path, tokenizer) -> None:
    data, out = _tasks_file(tmp_path), tmp_path / "p.jsonl"
    make_pairs(None, tokenizer, data, out, samples=2, limit=4, batch_size=2, generate_fn=_fake_generate(tokenizer))
    with pytest.raises(PairsError, match="samples"):
        make_pairs(None, tokenizer, data, out, samples=3, batch_size=2, generate_fn=_fake_generate(tokenizer))
    with pytest.raises(PairsError, match="greedy"):
        make_pairs(None, tokenizer, data, out, samples=2, limit=4, batch_size=2, greedy=False,
                   generate_fn=_fake_generate(tokenizer))
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    with pytest.raises(PairsError, match="no progress file"):
        make_pairs(None, tokenizer, data, foreign, generate_fn=_fake_generate(tokenizer))


def test_bad_input_reported_with_file_and_line(tmp_path: Path, tokenizer) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"prompt": "a", "answer": "b", "task": "sentiment"}\n'
                     b'{"prompt": "a"}\n'
                     b'{"prompt": 5, "answer": "b"}\n'
                     b'\xff\n'
                     b'{"prompt": "", "response": "b"}\n'
                     b'{"prompt": "a", "response": "b"')
    stream = io.StringIO()
    counts = make_pairs(None, tokenizer, data, tmp_path / "p.jsonl", samples=2,
                        report=BadRecordReport(stream=stream), generate_fn=_fake_generate(tokenizer))
    shown = stream.getvalue()
    assert counts.bad == 5 and counts.prompts == 1
    for line in (2, 3, 4, 5, 6):
        assert f"{data}:{line}: " in shown
    assert "missing field" in shown and "invalid UTF-8" in shown and "invalid JSON" in shown


@pytest.mark.slow
def test_command_with_a_real_model(tmp_path: Path, tokenizer, capsys) -> None:
    import torch

    from matelike.cli import main
    from matelike.model.io import save_model
    from matelike.model.transformer import Transformer, get_preset

    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=128, max_seq_len=256)
    save_model(Transformer(cfg), tokenizer, tmp_path / "model")
    out = tmp_path / "pairs.jsonl"
    args = ["dpo", "make-pairs", "--model", str(tmp_path / "model"), "--data", str(_tasks_file(tmp_path)),
            "--out", str(out), "--samples", "2", "--limit", "4", "--batch-size", "2", "--max-new-tokens", "6",
            "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 4
    assert summary["pairs"] + summary["already_right"] + summary["no_answer"] + summary["too_long"] == 4
    assert len(out.read_text(encoding="utf-8").splitlines()) == summary["pairs"]
    assert main(args) == 0  # already complete: nothing more to do, same counts
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_resume_refuses_another_model(tmp_path: Path, tokenizer) -> None:
    data, out = _tasks_file(tmp_path), tmp_path / "p.jsonl"
    make_pairs(None, tokenizer, data, out, samples=2, limit=2, batch_size=2, generate_fn=_fake_generate(tokenizer),
               model_id="aaa")
    with pytest.raises(PairsError, match="model"):
        make_pairs(None, tokenizer, data, out, samples=2, batch_size=2, generate_fn=_fake_generate(tokenizer),
                   model_id="bbb")


def test_alpaca_records_give_prompt_and_gold() -> None:
    from matelike.data.formats import RecordError
    from matelike.dpo.make_pairs import prompt_item

    item = prompt_item(7, {"instruction": "把句子翻译成英文", "input": "你好", "output": "Hello"})
    assert item.prompt == "把句子翻译成英文\n你好" and item.gold == "Hello" and item.task is None
    assert item.messages[-1] == {"role": "user", "content": "把句子翻译成英文\n你好"}
    with pytest.raises(RecordError, match="output"):
        prompt_item(8, {"instruction": "只有指令"})


def test_messages_layout_sft_file_gives_prompts(tmp_path: Path, tokenizer) -> None:
    """The demo's own sft.jsonl layout: the last assistant turn is the gold answer, the turns before it the prompt.
    Every record used to be rejected ("expected 'answer', 'chosen' or 'response'") with 0 pairs and exit 0."""
    from matelike.data.preference import load_preference_pairs
    from matelike.dpo.make_pairs import read_prompt_items

    conv = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "判断评论情感：很好"},
            {"role": "assistant", "content": "正面"}]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"messages": conv, "task": "sentiment"},
        {"conversations": [{"from": "human", "value": "问题"}, {"from": "gpt", "value": "回答"}]},
        {"messages": conv[:2]},  # no answer to learn from: bad
    ]) + "\n", encoding="utf-8")
    stream = io.StringIO()
    items, records = read_prompt_items(data, BadRecordReport(stream=stream))
    assert records == 3 and len(items) == 2
    assert items[0].prompt == items[0].messages == conv[:-1] and items[0].gold == "正面"
    assert items[0].task == "sentiment" and items[0].line == 1
    assert items[1].messages == [{"role": "user", "content": "问题"}] and items[1].gold == "回答"
    assert items[1].task is None and items[1].line == 2
    assert f"{data}:3: bad turn order" in stream.getvalue()
    out = tmp_path / "pairs.jsonl"
    counts = make_pairs(None, tokenizer, data, out, samples=2, generate_fn=_fake_generate(tokenizer),
                        report=BadRecordReport(stream=io.StringIO()))
    assert counts.prompts == 2 and counts.bad == 1 and counts.pairs >= 1
    pairs, stats = load_preference_pairs([out], tokenizer, seq_len=256)
    assert stats.pairs == counts.pairs and stats.bad == 0


def test_nothing_usable_is_an_error(tmp_path: Path, tokenizer, make_chat_model, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "pretraining text, no prompt"}\n{"prompt": "no answer"}\n', encoding="utf-8")
    with pytest.raises(PairsError, match=r"no usable prompt with a gold answer in 2 records \(2 bad records"):
        make_pairs(None, tokenizer, data, tmp_path / "p.jsonl", generate_fn=_fake_generate(tokenizer),
                   report=BadRecordReport(stream=io.StringIO()))
    assert not (tmp_path / "p.jsonl").exists()
    from matelike.cli import main

    args = ["dpo", "make-pairs", "--model", str(make_chat_model()), "--data", str(data),
            "--out", str(tmp_path / "p.jsonl"), "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    assert "no usable prompt" in capsys.readouterr().err


def test_open_ended_rejected_is_the_reply_least_like_the_reference() -> None:
    item = PromptItem(1, "你好", [{"role": "user", "content": "你好"}], "你好！很高兴见到你。", None)
    rejected, outcome = pick_rejected(item, ["你好！很高兴认识你。", "你 好", "你好！很高兴见到你。"])
    assert (rejected, outcome) == ("你 好", "pairs")  # the segmented echo, not the near-paraphrase
    assert pick_rejected(item, ["你好！很高兴见到你。"]) == (None, "already_right")


def test_greedy_candidates_are_each_prompts_own_greedy_answer(tmp_path: Path, tokenizer) -> None:
    """make-pairs generates through the batched engine; its greedy candidates are what each prompt gives alone."""
    import torch

    from matelike.model.generation import generate
    from matelike.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                    hidden_dim=64, max_seq_len=128, init_std=0.3)).eval()
    calls: list[tuple[list[list[int]], list[list[int]]]] = []

    def recording(model, prompts, *, max_new_tokens, sampling, stop_ids):
        out = generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids)
        if sampling.greedy:
            calls.append((prompts, out))
        return out

    make_pairs(model, tokenizer, _tasks_file(tmp_path, 6), tmp_path / "p.jsonl", samples=2, batch_size=4,
               max_new_tokens=8, generate_fn=recording)
    assert [len(p) for p, _ in calls] == [4, 2]  # one greedy call per batch, one row per prompt
    stops = set(tokenizer.stop_ids)
    for prompts, outs in calls:
        assert len({len(p) for p in prompts}) > 1  # mixed prompt lengths in one batch
        for p, out in zip(prompts, outs):
            x, alone = torch.tensor([p]), []
            with torch.no_grad():
                for _ in range(8):
                    t = int(model(x).logits[0, -1].argmax())
                    if t in stops:
                        break
                    alone.append(t)
                    x = torch.cat([x, torch.tensor([[t]])], dim=1)
            assert out == alone
