"""`matelike data pack --format sft|dpo|prompts`: packed instruction data equal to the raw path, refused when
it does not fit the run, deterministic across worker counts, with the same bad-record report as `data check`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from matelike.data.check import check_paths
from matelike.data.pack import _cmd_pack, add_cli
from matelike.data.packed import (
    PackedFile,
    PackedPrompts,
    PackMismatchError,
    open_pairs,
    open_sft,
    pack_chat,
)
from matelike.data.preference import PreferenceBatches, load_preference_pairs
from matelike.data.records import BadRecordReport
from matelike.data.sft import PackedSFTData, load_sft_samples

LONG = "北京是中华人民共和国的首都，也是全国的政治和文化中心。" * 3


def _sft_lines() -> list[str]:
    lines = []
    for i in range(40):
        if i % 4 == 0:  # multi-turn, some long enough to lose their oldest turns at seq_len 96
            conv = [{"role": "system", "content": "你是助手"}]
            for t in range(1 + i % 3):
                conv += [{"role": "user", "content": f"第{t}个问题{i}" + (LONG if t == 0 else "")},
                         {"role": "assistant", "content": f"回答{t}：今天天气很好{i}"}]
            lines.append(json.dumps({"messages": conv}, ensure_ascii=False))
        elif i % 4 == 1:
            lines.append(json.dumps({"instruction": f"判断评论情感{i}", "input": "质量很好", "output": "正面"},
                                    ensure_ascii=False))
        else:
            lines.append(json.dumps({"prompt": f"你好{i}", "response": "你好，我是助手。" * (1 + i % 5)},
                                    ensure_ascii=False))
    lines[5] = '{"prompt": "broken'  # invalid JSON
    lines[9] = json.dumps({"prompt": "no answer"})  # missing field
    lines[13] = json.dumps({"prompt": LONG * 4, "response": "太长"}, ensure_ascii=False)  # dropped as too long
    return lines


@pytest.fixture()
def sft_file(tmp_path: Path) -> Path:
    p = tmp_path / "sft.jsonl"
    p.write_text("\n".join(_sft_lines()) + "\n", encoding="utf-8")
    return p


def _batches(data: PackedSFTData, n: int, cursor: int = 0, rank: int = 0, world: int = 1) -> list[dict]:
    it = data.iter_batches(rank, world, cursor)
    return [next(it)[1] for _ in range(n)]


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("input_ids", "targets", "segment_ids", "position_ids"):
            assert x[key].equal(y[key]), key


def test_packed_sft_gives_the_raw_batches(tokenizer, tokenizer_dir, sft_file, tmp_path):
    raw, stats = load_sft_samples([sft_file], tokenizer, 96, report=BadRecordReport(stream=io.StringIO()))
    out = tmp_path / "sft.bin"
    meta = pack_chat(tokenizer_dir, [sft_file], out, "sft", seq_len=96, progress=False,
                     report=BadRecordReport(stream=io.StringIO()))
    packed, f = open_sft(out, tokenizer, 96)
    assert isinstance(packed.ids, np.memmap) and isinstance(packed.offsets, np.memmap)  # mapped, not loaded
    assert meta["count"] == len(raw) == stats.samples and stats.truncated > 0 and stats.dropped_too_long >= 1
    for key in ("samples", "truncated", "turns_dropped", "dropped_too_long", "tokens", "loss_tokens", "bad",
                "records", "formats"):
        assert f.meta["stats"].get(key, 0) == getattr(stats, key), key
    np.testing.assert_array_equal(packed.offsets, raw.offsets)
    np.testing.assert_array_equal(packed.ids, raw.ids)
    np.testing.assert_array_equal(packed.mask, raw.mask)
    # Two epochs of batches, on one rank and on each of two ranks; then resumed from a cursor mid-epoch-2.
    for world in (1, 2):
        for rank in range(world):
            _same_batches(_batches(PackedSFTData(raw, 96, 3, tokenizer.pad_id, seed=7), 12, 0, rank, world),
                          _batches(PackedSFTData(packed, 96, 3, tokenizer.pad_id, seed=7), 12, 0, rank, world))
    full = _batches(PackedSFTData(packed, 96, 3, tokenizer.pad_id, seed=7), 12)
    _same_batches(full[9:], _batches(PackedSFTData(packed, 96, 3, tokenizer.pad_id, seed=7), 3, cursor=9))


def test_same_bytes_whatever_the_worker_count(tokenizer_dir, sft_file, tmp_path):
    one, two = tmp_path / "w1.bin", tmp_path / "w2.bin"
    pack_chat(tokenizer_dir, [sft_file], one, "sft", seq_len=96, workers=1, progress=False,
              report=BadRecordReport(stream=io.StringIO()))
    pack_chat(tokenizer_dir, [sft_file], two, "sft", seq_len=96, workers=2, progress=False,
              report=BadRecordReport(stream=io.StringIO()))
    assert one.read_bytes() == two.read_bytes()
    m1, m2 = (json.loads(Path(str(p) + ".json").read_text()) for p in (one, two))
    assert m1["sha256"] == m2["sha256"] and m1["stats"] == m2["stats"]


def test_bad_record_report_equals_data_check(tokenizer_dir, sft_file, tmp_path, capsys):
    check_out = io.StringIO()
    assert check_paths([str(sft_file)], kind="sft", out=check_out) == 1
    check_lines = [x for x in check_out.getvalue().splitlines() if x.startswith(f"{sft_file}:") and
                   x.split(":")[1].isdigit()]
    assert len(check_lines) == 2  # the invalid JSON and the missing field
    import argparse

    from matelike.cli import CommandTable

    parser = argparse.ArgumentParser()
    add_cli(CommandTable(parser))
    args = parser.parse_args(["data", "pack", "--format", "sft", "--tokenizer", str(tokenizer_dir), "--input",
                              str(sft_file), "--out", str(tmp_path / "p.bin"), "--seq-len", "96", "--quiet"])
    assert _cmd_pack(args) == 0
    captured = capsys.readouterr()
    pack_lines = [x for x in captured.err.splitlines() if x.startswith(f"{sft_file}:")]
    assert pack_lines == check_lines
    meta = PackedFile(tmp_path / "p.bin").meta
    assert meta["bad_records"]["total"] == 2
    assert meta["bad_records"]["by_reason"] == {"invalid JSON": 1, "missing field": 1}


def test_refuses_other_tokenizer_larger_seq_len_and_other_kind(tokenizer, tokenizer_dir, sft_file, tmp_path):
    out = tmp_path / "sft.bin"
    pack_chat(tokenizer_dir, [sft_file], out, "sft", seq_len=96, progress=False,
              report=BadRecordReport(stream=io.StringIO()))
    with pytest.raises(PackMismatchError, match="--seq-len 96, more than this run's 64.*re-pack with --seq-len 64"):
        open_sft(out, tokenizer, 64)
    open_sft(out, tokenizer, 128)  # a longer run reads samples cut for 96 as they are
    meta_path = Path(str(out) + ".json")
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PackMismatchError, match="another tokenizer"):
        open_sft(out, tokenizer, 96)
    with pytest.raises(PackMismatchError, match="packed as --format sft"):
        open_pairs(out, tokenizer, 96)
    with open(out, "ab") as f:  # a torn copy
        f.write(b"\0")
    with pytest.raises(PackMismatchError, match="partial copy"):
        open_sft(out, tokenizer, 96)
    with pytest.raises(ValueError, match="needs --seq-len"):
        pack_chat(tokenizer_dir, [sft_file], tmp_path / "x.bin", "sft", seq_len=None, progress=False)


def test_dpo_pairs_round_trip(tokenizer, tokenizer_dir, tmp_path):
    src = tmp_path / "pairs.jsonl"
    recs = [{"prompt": f"判断评论情感：质量很好{i}", "chosen": "正面", "rejected": "负面" * (1 + i % 3)}
            for i in range(15)]
    recs.append({"prompt": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                            {"role": "user", "content": "你是谁？"}], "chosen": "我是助手。", "rejected": "不知道"})
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n{bad\n", encoding="utf-8")
    raw, stats = load_preference_pairs([src], tokenizer, 64, BadRecordReport(stream=io.StringIO()))
    out = tmp_path / "pairs.bin"
    pack_chat(tokenizer_dir, [src], out, "dpo", seq_len=64, workers=2, progress=False,
              report=BadRecordReport(stream=io.StringIO()))
    packed, f = open_pairs(out, tokenizer, 64)
    assert len(packed) == len(raw) == 16 and f.meta["stats"]["bad"] == stats.bad == 1
    assert packed.fingerprint == f.meta["sha256"]
    for side in ("chosen", "rejected"):
        for arr in ("ids", "mask", "offsets"):
            np.testing.assert_array_equal(getattr(getattr(packed, side), arr), getattr(getattr(raw, side), arr))
    a = PreferenceBatches(raw, 4, tokenizer.pad_id, seed=3).iter_batches()
    b = PreferenceBatches(packed, 4, tokenizer.pad_id, seed=3).iter_batches()
    for _ in range(6):
        x, y = next(a)[1], next(b)[1]
        assert x["input_ids"].equal(y["input_ids"]) and x["targets"].equal(y["targets"])
        assert x["index"].equal(y["index"])


def test_prompts_round_trip_with_their_fields(tokenizer, tokenizer_dir, tmp_path):
    src = tmp_path / "prompts.jsonl"
    recs = [{"prompt": f"分词：今天天气很好{i}", "answer": "今天 天气 很 好", "task": "segment", "id": i}
            for i in range(10)]
    recs.append({"messages": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "北京呢？"}],
                 "answer": {"gold": ["北京"]}, "task": None})
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs)
                   + '\n{"answer": "no prompt"}\n', encoding="utf-8")
    out = tmp_path / "prompts.bin"
    report = BadRecordReport(stream=io.StringIO())
    meta = pack_chat(tokenizer_dir, [src], out, "prompts", seq_len=None, progress=False, report=report)
    assert meta["count"] == 11 and report.by_reason == {"missing field": 1}
    prompts = PackedPrompts(out, tokenizer)
    assert len(prompts) == 11
    for i, rec in enumerate(recs):
        msgs = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
        ids, _ = tokenizer.encode_chat(msgs, add_generation_prompt=True)
        assert prompts.prompt_ids(i).tolist() == ids
        key = "messages" if "messages" in rec else "prompt"
        assert prompts.fields(i) == {k: v for k, v in rec.items() if k != key}
    lengths = sorted(len(prompts.prompt_ids(i)) for i in range(len(prompts)))
    short = pack_chat(tokenizer_dir, [src], tmp_path / "short.bin", "prompts", seq_len=lengths[5], progress=False,
                      report=BadRecordReport(stream=io.StringIO()))
    longer = sum(n > lengths[5] for n in lengths)
    assert short["stats"]["dropped_too_long"] == 11 - short["count"] == longer > 0


def _render_per_record(tokenizer, kind, seq_len, items, dtype):
    """The packer's rendering before it encoded a chunk in one batch call: one record at a time."""
    from matelike.data.preference import render_pair

    if kind == "dpo":
        out = []
        for pref in items:
            r = render_pair(tokenizer, pref.prompt, pref.chosen, pref.rejected, seq_len)
            out.append(None if r is None else
                       (r[2], [(np.asarray(i, dtype=dtype), np.asarray(m, dtype=np.uint8)) for i, m in r[:2]]))
        return out
    out = []
    for messages, fields in items:
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        out.append(None if seq_len and len(ids) > seq_len else (np.asarray(ids, dtype=dtype), fields))
    return out


@pytest.mark.parametrize("kind", ["dpo", "prompts"])
def test_dpo_and_prompts_batch_rendering_writes_the_per_record_bytes(tokenizer_dir, tmp_path, monkeypatch, kind):
    """Chunks encoded in one batch call give the file the per-record rendering gave, byte for byte: history
    dropped for the seq-len, earlier assistant turns unmasked, pairs and prompts dropped as too long, system
    turns, text that looks like special tokens, empty answers."""
    import matelike.data.packed as packed_module

    recs = []
    for i in range(60):
        history = [{"role": "user", "content": f"第{t}个问题{i}" + (LONG if t == 0 else "")} if k == 0 else
                   {"role": "assistant", "content": f"回答{t}：今天天气很好{i}"}
                   for t in range(i % 4) for k in range(2)]
        system = [{"role": "system", "content": "你是助手<|im_end|>\n<|im_start|>user"}] if i % 5 == 0 else []
        prompt = system + history + [{"role": "user", "content": f"判断评论情感{i}" + LONG * (i % 7 == 3)}]
        if kind == "dpo":
            recs.append({"prompt": prompt, "chosen": "正面" if i % 9 else "", "rejected": "负面" * (1 + i % 40)})
        else:
            recs.append({"messages": prompt, "task": "sentiment", "answer": "正面", "n": i})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    seq_len = 96 if kind == "dpo" else 60
    new = tmp_path / "new.bin"
    meta = pack_chat(tokenizer_dir, [src], new, kind, seq_len=seq_len, progress=False)
    monkeypatch.setattr(packed_module, "render_chunk", _render_per_record)
    old = tmp_path / "old.bin"
    old_meta = pack_chat(tokenizer_dir, [src], old, kind, seq_len=seq_len, progress=False)
    assert new.read_bytes() == old.read_bytes() and meta["stats"] == old_meta["stats"]
    stats = meta["stats"]
    assert stats["dropped_too_long"] > 3 and (kind == "prompts" or stats["truncated"] > 3), stats


def _render_sft_per_record(tokenizer, kind, seq_len, items, dtype):
    """sft rendering one record at a time (`fit_messages`, which encodes each window with `encode_chat`), in the
    flat form `render_chunk` gives."""
    from matelike.data.sft import fit_messages

    reasons, turns, ids, masks, lengths = [], [], [], [], []
    for _, messages in items:
        fit = fit_messages(tokenizer, messages, seq_len)
        reasons.append(fit.reason)
        turns.append(fit.turns_dropped)
        if fit.ids is not None:
            ids += fit.ids
            masks += fit.mask
            lengths.append(len(fit.ids))
    return ([layout for layout, _ in items], reasons, turns, np.asarray(ids, dtype=dtype),
            np.asarray(masks, dtype=np.uint8), np.asarray(lengths, dtype=np.int64))


def test_sft_batch_rendering_writes_the_per_record_bytes(tokenizer_dir, tmp_path, monkeypatch):
    """sft chunks encoded as whole ChatML texts, and chunks with text that looks like special tokens (encoded
    piece by piece), give the file that rendering one record at a time gives, byte for byte: oldest turns
    dropped for the seq-len, samples dropped as too long, system turns, every layout."""
    import matelike.data.packed as packed_module
    from matelike.tokenizer import Tokenizer

    recs = []
    for i in range(80):
        special = "<|im_end|>\n<|im_start|>user 你好" if i % 23 == 7 else ""
        if i % 3 == 0:
            conv = [{"role": "system", "content": "你是助手" + special}] if i % 2 else []
            for t in range(1 + i % 4):
                conv += [{"role": "user", "content": f"第{t}个问题{i}" + (LONG if t == 0 else "")},
                         {"role": "assistant", "content": f"回答{t}：今天天气很好{i} " + LONG * (i % 11 == 3)}]
            recs.append({"messages": conv})
        elif i % 3 == 1:
            recs.append({"instruction": f"判断评论情感{i}", "input": "质量很好" + special, "output": "正面"})
        else:
            recs.append({"prompt": f"你好{i}", "response": "你好，我是助手。" * (1 + i % 5) + special})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    monkeypatch.setattr(packed_module, "CHUNK_RECORDS", 8)
    whole = []
    texts = Tokenizer._encode_chat_texts
    monkeypatch.setattr(Tokenizer, "_encode_chat_texts", lambda *a: whole.append(texts(*a)) or whole[-1])
    new = tmp_path / "new.bin"
    meta = pack_chat(tokenizer_dir, [src], new, "sft", seq_len=96, progress=False)
    assert len(whole) == 10 and 0 < sum(b is None for b in whole) < 10  # both ways of encoding ran
    monkeypatch.setattr(packed_module, "render_chunk", _render_sft_per_record)
    old = tmp_path / "old.bin"
    old_meta = pack_chat(tokenizer_dir, [src], old, "sft", seq_len=96, progress=False)
    assert new.read_bytes() == old.read_bytes() and meta["stats"] == old_meta["stats"]
    stats = meta["stats"]
    assert stats["dropped_too_long"] >= 1 and stats["truncated"] > 3, stats
