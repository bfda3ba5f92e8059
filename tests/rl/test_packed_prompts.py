"""RL prompts from a file packed by `data pack --format prompts`: read lazily (memory flat in the record count),
the same rollouts as the raw records, exact resume, damaged or foreign packs refused."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from matelike.data.packed import pack_chat
from matelike.data.records import BadRecordReport, DataFileError
from matelike.rl import GRPOTask
from matelike.rl.rewards import check_task_record, hack_references, task_reward
from matelike.rl.rollout import PackedPromptSet, load_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORDS = [
    {"prompt": "判断评论情感（正面/负面）：这家店的服务很好", "task": "sentiment", "answer": "正面"},
    {"prompt": "中文分词：今天天气很好", "task": "segmentation", "answer": "今天 天气 很 好"},
    {"prompt": "没有任务", "answer": "x"},  # bad under --reward task
    {"prompt": "找出句子中的人名、地名、机构名：江泽民在北京", "task": "entities", "answer": "人名：江泽民；地名：北京"},
    {"prompt": "长" * 300, "task": "sentiment", "answer": "正面"},  # too long for 100 tokens
    {"prompt": "续写：北京是中华人民共和国的首都，也是全国的政治和文化中心。", "task": "continuation",
     "answer": "经济建设取得了巨大的成就"},
    {"prompt": "聊聊天气", "task": "chat"},
    {"prompt": "判断评论情感（正面/负面）：手机的质量太差了", "task": "sentiment", "answer": "负面"},
]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def _both(tokenizer_dir: Path, tokenizer, tmp_path: Path, records=RECORDS, max_len: int = 100):
    raw = _jsonl(tmp_path / "p.jsonl", records)
    packed = tmp_path / "p.bin"
    pack_chat(tokenizer_dir, [raw], packed, "prompts", seq_len=None, progress=False, report=BadRecordReport())
    a = load_prompts([str(raw)], tokenizer, max_len, BadRecordReport(max_shown=0), check_task_record)
    b = load_prompts([str(packed)], tokenizer, max_len, BadRecordReport(max_shown=0), check_task_record)
    return raw, packed, a, b


def test_the_lazy_set_reads_what_the_raw_records_give(tokenizer, tokenizer_dir, tmp_path: Path) -> None:
    raw, packed, a, b = _both(tokenizer_dir, tokenizer, tmp_path)
    assert isinstance(b, PackedPromptSet) and len(a) == len(b) == 6
    assert [b.record(k) + 1 for k in range(len(b))] == [1, 2, 4, 6, 7, 8]  # records 3 and 5 left out
    assert list(b.sources) == [f"{packed}:{r}" for r in (1, 2, 4, 6, 7, 8)]
    assert b.ids[-1] == a.ids[-1] and b.ids[2:4] == a.ids[2:4]
    with pytest.raises(IndexError):
        b.ids[6]
    assert a.task_counts() == b.task_counts() == {"chat": 1, "continuation": 1, "entities": 1, "segmentation": 1,
                                                  "sentiment": 2}
    assert a.tasks() == b.tasks()
    # the task filter of `rl --reward task`: a second lazy set over the same file
    sa, sb = (p.keep_if(lambda f: f.get("task") != "chat") for p in (a, b))
    assert sa.ids == sb.ids and sa.fields == sb.fields and sb.task_counts() == sa.task_counts()
    assert "chat" not in sb.tasks() and list(sb.excluded) == [2, 4, 6]
    assert sb.keep_if(lambda f: True) is sb
    # hack references read the prompt text of the continuation items: the rendered prompt's text contains it
    ha, hb = hack_references(a.prompts, a.fields), hack_references(b.prompts, b.fields)
    assert ha.keys() == hb.keys() and ha["entities_always_none"] == hb["entities_always_none"]
    assert hb["continuation_copy_prompt"] == pytest.approx(ha["continuation_copy_prompt"], abs=0.05)


def test_packed_and_raw_prompts_give_the_same_rollouts(make_chat_model, tokenizer_dir, tmp_path: Path) -> None:
    from matelike.model.io import load_model

    model, tok = load_model(make_chat_model(max_seq_len=128))
    records = [r for r in RECORDS if r.get("task") not in ("chat", "continuation")]
    _, _, a, b = _both(tokenizer_dir, tok, tmp_path, records)
    assert len(b) == 4

    def rollouts(prompts) -> list[dict]:
        task = GRPOTask(model, prompts, [task_reward], decode=tok.decode, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                        batch_size=2, group=3, max_new_tokens=5, seed=7, temperature=1.0)
        it = task.batches(0, 1, None)
        return [next(it)[0] for _ in range(3)]  # the third draws from the second epoch's order

    for x, y in zip(rollouts(a), rollouts(b)):
        for key in ("input_ids", "targets", "advantages"):
            assert torch.equal(x[key], y[key]), key
        assert x["stats"] == y["stats"]


def _records(n: int) -> list[dict]:
    return [{"prompt": f"判断评论情感（正面/负面）：第{i}条，质量很好", "task": "sentiment", "answer": "正面"}
            for i in range(n)]


def test_the_lazy_set_holds_nothing_per_record(tokenizer, tokenizer_dir, tmp_path: Path) -> None:
    """Memory kept by the set of 10 and of 10,000 records differs by a bounded amount, and so does the peak of
    making it (one chunk of the scan at a time); the lists of `Prompts` hold about 1 kB per prompt."""
    sizes = {}
    for n in (10, 10_000):
        src = _jsonl(tmp_path / f"p{n}.jsonl", _records(n))
        packed = tmp_path / f"p{n}.bin"
        pack_chat(tokenizer_dir, [src], packed, "prompts", seq_len=None, progress=False)
        load_prompts([str(packed)], tokenizer, 100, BadRecordReport(), check_task_record)  # imports, caches
        tracemalloc.start()
        prompts = load_prompts([str(packed)], tokenizer, 100, BadRecordReport(), check_task_record)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(prompts) == n and prompts.fields[n - 1]["answer"] == "正面"
        sizes[n] = kept, peak
    assert sizes[10_000][0] - sizes[10][0] < 16_000, sizes  # eager lists: ~10 MB
    assert sizes[10_000][1] - sizes[10][1] < 2_000_000, sizes


def test_damaged_or_foreign_packs_are_refused(tokenizer, tokenizer_dir, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "p.jsonl", RECORDS[:2])
    packed = tmp_path / "p.bin"
    pack_chat(tokenizer_dir, [src], packed, "prompts", seq_len=None, progress=False)
    meta = json.loads(Path(f"{packed}.json").read_text(encoding="utf-8"))
    good = packed.read_bytes()

    def refused(data: bytes, match: str, meta_change: dict | None = None) -> None:
        packed.write_bytes(data)
        Path(f"{packed}.json").write_text(json.dumps({**meta, **(meta_change or {})}), encoding="utf-8")
        with pytest.raises(DataFileError, match=match):
            load_prompts([str(packed)], tokenizer, 100, BadRecordReport())

    fields = meta["sections"]["fields"]["offset"]
    refused(good[:fields] + b"x" + good[fields + 1:], r"record 1: its fields are not JSON")
    offsets = meta["sections"]["offsets"]
    broken = bytearray(good)
    # record 1 ends after record 2 ends: offsets run backwards
    broken[offsets["offset"] + 8: offsets["offset"] + 16] = np.int64(10**4).tobytes()
    refused(bytes(broken), r"record 2: offsets run backwards")
    refused(good[:-8], "a partial copy")
    refused(good, "another tokenizer", {"tokenizer_sha256": "0" * 64})
    sections = {**meta["sections"], "offsets": {**offsets, "count": offsets["count"] - 1}}
    refused(good, "offsets for 2 prompts; the file is damaged", {"sections": sections})


def _run_args(init: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["rl", "--init", str(init), "--data", str(data), "--out", str(out), "--batch-size", "2", "--group", "3",
            "--max-new-tokens", "6", "--lr", "1e-3", "--min-lr", "1e-3", "--log-every", "1", "--dtype", "fp32",
            "--no-progress", "--device", "cpu", *extra]


def test_a_damaged_pack_stops_the_command_with_one_line(make_chat_model, tokenizer_dir, tmp_path: Path,
                                                       capsys) -> None:
    from matelike.cli import main

    packed = tmp_path / "p.bin"
    pack_chat(tokenizer_dir, [_jsonl(tmp_path / "p.jsonl", RECORDS)], packed, "prompts", seq_len=None,
              progress=False)
    meta = json.loads(Path(f"{packed}.json").read_text(encoding="utf-8"))
    data = bytearray(packed.read_bytes())
    data[meta["sections"]["fields"]["offset"]] = ord("[")
    packed.write_bytes(bytes(data))
    assert main(_run_args(make_chat_model(max_seq_len=128), packed, tmp_path / "out", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {packed}: record 1: its fields are not") and "Traceback" not in "".join(err)


@pytest.mark.slow
def test_resume_from_a_packed_run_continues_exactly(make_chat_model, tokenizer_dir, tmp_path: Path,
                                                     capsys) -> None:
    """A packed run interrupted between two updates of a rollout and resumed gives the uninterrupted run's
    losses and rewards, which are the raw records' run's too; rl_data.json says the same."""
    from matelike.cli import main

    init = make_chat_model(max_seq_len=128)
    raw = _jsonl(tmp_path / "p.jsonl", RECORDS * 2)
    packed = tmp_path / "p.bin"
    pack_chat(tokenizer_dir, [raw], packed, "prompts", seq_len=None, progress=False)
    extra = ("--updates-per-rollout", "2", "--save-every", "1", "--temperature", "0.9", "--seq-len", "106")
    runs = {"raw": (raw, 4), "whole": (packed, 4), "split": (packed, 3)}
    for name, (data, steps) in runs.items():
        assert main(_run_args(init, data, tmp_path / name, "--max-steps", str(steps), *extra)) == 0
    assert main(_run_args(init, packed, tmp_path / "split", "--max-steps", "4", "--resume", *extra)) == 0
    err = capsys.readouterr().err
    assert f"{packed}:3: missing field: 'task'" in err and f"{packed}:5: prompt too long" in err

    def metrics(name: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    raw_m, whole, split = metrics("raw"), metrics("whole"), metrics("split")
    assert [m["step"] for m in split] == [1, 2, 3, 4]
    for key in ("loss", "reward", "reward_std", "entropy", "ratio", "completion_len"):
        assert [m[key] for m in whole] == [m[key] for m in split] == [m[key] for m in raw_m], key
    summaries = [json.loads((tmp_path / n / "rl_data.json").read_text(encoding="utf-8")) for n in ("raw", "whole")]
    for key in ("prompts", "tasks", "left_out_by_task"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[1]["left_out_by_task"] == {"chat": 2} and summaries[1]["prompts"] == 10
