"""SFT data: loss mask positions, every layout, truncation accounting, packing, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from matelike.data.records import BadRecordReport
from matelike.data.sft import (
    IGNORE_INDEX,
    PackedSFTData,
    SFTSamples,
    collate,
    fit_batch,
    fit_messages,
    load_sft_samples,
    pack_rows,
    plan_rows,
)


def _write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def _expected_targets(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """(input position, target id) pairs that must carry loss, built turn by turn from plain encodes.

    Each assistant turn is `<|im_start|>assistant\\n` + content + `<|im_end|>`; the loss covers the
    content tokens and `<|im_end|>`. Special tokens split the text, so rendering a prefix and counting
    its tokens gives where each answer starts.
    """
    out: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:k]) + "<|im_start|>assistant\n"
        start = len(tokenizer.encode(prefix))
        answer = tokenizer.encode(m["content"]) + [tokenizer.im_end_id]
        # Target at input position p is token p + 1.
        out += [(start + j - 1, t) for j, t in enumerate(answer)]
    return out


def _loss_positions(samples: SFTSamples, i: int, pad_id: int) -> list[tuple[int, int]]:
    batch = collate(samples, [[i]], pad_id)
    t = batch["targets"][0].tolist()
    return [(p, v) for p, v in enumerate(t) if v != IGNORE_INDEX]


SINGLE = [{"role": "user", "content": "今天天气怎么样？"}, {"role": "assistant", "content": "晴天，适合出门。"}]
MULTI = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "讲个笑话"},
    {"role": "assistant", "content": "从前有座山。"},
]


def test_loss_mask_single_turn_exact(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"messages": SINGLE}])
    samples, stats = load_sft_samples([path], tokenizer, seq_len=256)
    assert stats.samples == 1 and stats.bad == 0
    got = _loss_positions(samples, 0, tokenizer.pad_id)
    want = _expected_targets(tokenizer, SINGLE)
    assert got == want
    assert tokenizer.decode([t for _, t in got]) == "晴天，适合出门。<|im_end|>"
    # Nothing after the answer's <|im_end|> is kept: the last target is <|im_end|>.
    ids, _ = samples.sample(0)
    assert int(ids[-1]) == tokenizer.im_end_id
    assert stats.loss_tokens == len(want)


def test_loss_mask_multi_turn_every_assistant_turn(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"messages": MULTI}])
    samples, stats = load_sft_samples([path], tokenizer, seq_len=256)
    got = _loss_positions(samples, 0, tokenizer.pad_id)
    want = _expected_targets(tokenizer, MULTI)
    assert got == want
    text = tokenizer.decode([t for _, t in got])
    assert text == "你好！有什么可以帮你？<|im_end|>从前有座山。<|im_end|>"
    # System and user text never carries loss.
    assert "乐于助人" not in text and "笑话" not in text


def test_every_layout_reads_to_the_same_conversation(tokenizer, tmp_path):
    conv = [{"role": "user", "content": "把这句话翻译成英文：\n你好"}, {"role": "assistant", "content": "Hello"}]
    files = [
        _write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "把这句话翻译成英文：\n你好", "response": "Hello"}]),
        _write_jsonl(tmp_path / "alpaca.jsonl",
                     [{"instruction": "把这句话翻译成英文：", "input": "你好", "output": "Hello"}]),
        _write_jsonl(tmp_path / "conv.jsonl", [{"conversations": conv}]),
        _write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
            {"from": "human", "value": conv[0]["content"]}, {"from": "gpt", "value": "Hello"}]}]),
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["把这句话翻译成英文：\n你好"], "response": ["Hello"]}), tmp_path / "b.parquet")
    files.append(tmp_path / "b.parquet")
    samples, stats = load_sft_samples(files, tokenizer, seq_len=256)
    assert stats.samples == 5 and stats.bad == 0
    assert stats.formats == {"prompt_response": 2, "alpaca": 1, "messages": 2}
    ref_ids, ref_mask = tokenizer.encode_chat(conv)
    for i in range(5):
        ids, mask = samples.sample(i)
        n = len(ids)
        assert ids.tolist() == list(ref_ids)[:n] and mask.tolist() == list(ref_mask)[:n]


def test_forced_format_rejects_other_layouts(tokenizer, tmp_path, capsys):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "你好", "response": "好"}, {"messages": SINGLE}])
    samples, stats = load_sft_samples([path], tokenizer, seq_len=256, fmt="alpaca")
    assert stats.samples == 0 and stats.bad == 2
    err = capsys.readouterr().err
    assert f"{path}:1: missing field" in err and f"{path}:2: " in err
    samples, stats = load_sft_samples([path], tokenizer, seq_len=256, fmt="conversations")
    assert stats.samples == 1 and stats.bad == 1
    with pytest.raises(ValueError, match="unknown SFT format"):
        load_sft_samples([path], tokenizer, seq_len=256, fmt="sharegpt-xml")


def _three_exchanges() -> list[dict]:
    return [
        {"role": "system", "content": "系统提示"},
        {"role": "user", "content": "第一个问题" * 10},
        {"role": "assistant", "content": "第一个回答" * 10},
        {"role": "user", "content": "第二个问题"},
        {"role": "assistant", "content": "第二个回答"},
        {"role": "user", "content": "第三个问题"},
        {"role": "assistant", "content": "第三个回答"},
    ]


def test_truncation_drops_oldest_whole_exchanges_and_keeps_system(tokenizer, tmp_path):
    msgs = _three_exchanges()
    keep_two = msgs[:1] + msgs[3:]
    n_two = len(tokenizer.encode_chat(keep_two)[0]) - 1  # input positions incl. trailing newline
    n_full = len(tokenizer.encode_chat(msgs)[0]) - 1
    assert n_two < n_full - 5
    fit = fit_messages(tokenizer, msgs, seq_len=n_two)
    assert fit.turns_dropped == 2
    ids, mask = tokenizer.encode_chat(keep_two)
    assert fit.ids == list(ids)[: len(fit.ids)] and fit.mask == list(mask)[: len(fit.mask)]
    assert "系统提示" in tokenizer.decode(fit.ids) and "第一个" not in tokenizer.decode(fit.ids)
    # Fits exactly: not truncated at all.
    assert fit_messages(tokenizer, msgs, seq_len=n_full).turns_dropped == 0

    # Even system + last exchange too long: dropped, counted, the other records kept.
    last_only = msgs[:1] + msgs[5:]
    n_last = len(tokenizer.encode_chat(last_only)[0]) - 2  # without the trailing newline
    assert fit_messages(tokenizer, msgs, seq_len=n_last).turns_dropped == 4
    too_short = n_last - 1
    fit = fit_messages(tokenizer, msgs, seq_len=too_short)
    assert fit.ids is None and fit.reason == "too_long"

    path = _write_jsonl(tmp_path / "a.jsonl", [{"messages": msgs}, {"messages": SINGLE}, {"messages": keep_two}])
    samples, stats = load_sft_samples([path], tokenizer, seq_len=n_two)
    assert (stats.samples, stats.truncated, stats.turns_dropped, stats.dropped_too_long) == (3, 1, 2, 0)
    samples, stats = load_sft_samples([path], tokenizer, seq_len=too_short)
    # Both records ending in the long last exchange are dropped; the short one is kept.
    assert (stats.samples, stats.truncated, stats.dropped_too_long, stats.records) == (1, 0, 2, 3)
    assert "2 dropped as too long" in stats.summary()
    # No kept sample ever exceeds seq_len or loses its answer's <|im_end|>.
    for i in range(len(samples)):
        ids, mask = samples.sample(i)
        assert len(ids) - 1 <= too_short and int(ids[-1]) == tokenizer.im_end_id and mask[-1] == 1


def test_bad_records_reported_with_file_line_and_good_ones_kept(tokenizer, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "你好", "response": "你好呀"}
    lines = [
        json.dumps(good, ensure_ascii=False).encode(),
        b'{"prompt": "truncated',  # line 2: invalid JSON
        b'{"prompt": "\xff\xfe", "response": "x"}',  # line 3: invalid UTF-8
        json.dumps({"prompt": "only a prompt"}).encode(),  # 4: missing field
        json.dumps({"prompt": 3, "response": "x"}).encode(),  # 5: wrong type
        json.dumps({"prompt": "  ", "response": "x"}).encode(),  # 6: empty
        b"[1, 2]",  # 7: not an object
        json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(),  # 8: bad order
        json.dumps({"instruction": "说你好", "output": "你好"}, ensure_ascii=False).encode(),
    ]
    path.write_bytes(b"\n".join(lines))  # no final newline
    (tmp_path / "empty.jsonl").write_bytes(b"")
    report = BadRecordReport()
    samples, stats = load_sft_samples([path, tmp_path / "empty.jsonl"], tokenizer, seq_len=128, report=report)
    assert stats.records == 9 and stats.bad == 7 and stats.samples == 2 and len(samples) == 2
    err = capsys.readouterr().err
    for line in range(2, 9):
        assert f"{path}:{line}: " in err
    assert f"{path}:3: invalid UTF-8" in err and f"{path}:4: missing field" in err
    assert f"{path}:5: wrong type" in err
    assert report.total == 7


def test_missing_file_raises_naming_it(tokenizer, tmp_path):
    from matelike.data.records import DataFileError

    with pytest.raises(DataFileError, match="nope.jsonl"):
        load_sft_samples([tmp_path / "nope.jsonl"], tokenizer, seq_len=64)


def _toy_samples(lengths: list[int], seed: int = 0) -> SFTSamples:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 100, n + 1).tolist() for n in lengths]
    masks = [[0] * (n // 2) + [1] * (n + 1 - n // 2) for n in lengths]
    return SFTSamples.from_lists(ids, masks)


def test_pack_rows_places_each_sample_once_within_seq_len():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 60, 500)
    samples = _toy_samples(lengths.tolist())
    rows = pack_rows(samples.lengths, 64, rng.permutation(500), block=128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(sum(int(lengths[i]) for i in r) <= 64 for r in rows)
    fill = lengths.sum() / (64 * len(rows))
    assert fill > 0.9, fill
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_rows(samples.lengths, 10, np.arange(500))



def _first_fit_one_by_one(lengths: np.ndarray, seq_len: int, order: np.ndarray, block: int) -> list[list[int]]:
    """First-fit decreasing per block, one sample at a time: the rule `plan_rows` vectorises."""
    rows: list[list[int]] = []
    for b in range(0, len(order), block):
        chunk = order[b : b + block]
        free: list[int] = []
        block_rows: list[list[int]] = []
        for i in chunk[np.argsort(-lengths[chunk], kind="stable")].tolist():
            n = int(lengths[i])
            r = next((r for r, space in enumerate(free) if space >= n), None)
            if r is None:
                block_rows.append([])
                free.append(seq_len)
                r = len(free) - 1
            block_rows[r].append(i)
            free[r] -= n
        rows += block_rows
    return rows


def test_plan_rows_equals_first_fit_one_sample_at_a_time():
    rng = np.random.default_rng(4)
    for trial in range(60):
        seq_len = int(rng.integers(1, 90))
        n = int(rng.integers(0, 600))
        lengths = rng.integers(0 if trial % 3 == 0 else 1, seq_len + 1, n)
        if trial % 4 == 1:  # few distinct lengths: long runs of equal ones
            lengths = rng.choice(np.unique(lengths)[:3], n) if n else lengths
        order = rng.permutation(n)
        block = int(rng.integers(1, 300))
        want = _first_fit_one_by_one(lengths, seq_len, order, block)
        rows = plan_rows(lengths, seq_len, order, block)
        assert [r.tolist() for r in rows] == want == pack_rows(lengths, seq_len, order, block)
        assert len(rows) == len(want) and (not want or rows[-1].tolist() == want[-1])
        assert [r.tolist() for r in rows[1:5:2]] == want[1:5:2]

def test_collate_segments_positions_targets_and_padding():
    samples = _toy_samples([5, 3, 4])
    batch = collate(samples, [[0, 1], [2]], pad_id=0)
    seg = batch["segment_ids"].tolist()
    assert seg == [[1] * 5 + [2] * 3, [1] * 4 + [0] * 4]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    ids0, mask0 = samples.sample(0)
    ids1, mask1 = samples.sample(1)
    assert batch["input_ids"][0].tolist() == ids0[:-1].tolist() + ids1[:-1].tolist()
    want = [int(t) if m else IGNORE_INDEX for t, m in zip(ids0[1:], mask0[1:])]
    want += [int(t) if m else IGNORE_INDEX for t, m in zip(ids1[1:], mask1[1:])]
    assert batch["targets"][0].tolist() == want
    assert batch["targets"][1, 4:].tolist() == [IGNORE_INDEX] * 4
    assert batch["padding_fraction"] == pytest.approx(4 / 16)
    assert batch["real_tokens"] == 12 and batch["n_samples"] == 3


def test_batches_mix_long_and_short_samples():
    """Rows are packed longest first; the batches must not follow that order through the epoch."""
    lengths = np.random.default_rng(3).integers(2, 60, 2000)
    data = PackedSFTData(_toy_samples(lengths.tolist()), seq_len=64, batch_size=4, pad_id=0, seed=1)
    rows = data.rows(0)
    longest = np.array([max(lengths[i] for i in row) for row in rows], dtype=float)
    position = np.arange(len(rows), dtype=float)
    assert abs(np.corrcoef(position, longest)[0, 1]) < 0.2  # first-fit decreasing order alone: about -0.9
    assert sorted(i for row in rows for i in row) == list(range(2000))


def test_packed_batches_resume_from_cursor_and_split_ranks():
    samples = _toy_samples(np.random.default_rng(2).integers(1, 30, 200).tolist())
    data = PackedSFTData(samples, seq_len=32, batch_size=4, pad_id=0, seed=7)
    per_epoch = data.batches_per_epoch(0)
    it = data.iter_batches()
    full = [next(it) for _ in range(per_epoch + 5)]  # crosses into epoch 1
    assert [c for c, _ in full] == list(range(1, per_epoch + 6))
    resumed = data.iter_batches(cursor=per_epoch - 2)
    for k in range(per_epoch - 2, per_epoch + 5):
        c, b = next(resumed)
        assert c == k + 1
        assert b["input_ids"].equal(full[k][1]["input_ids"])
    # Epoch 0 sees every sample once.
    seen = sum(b["n_samples"] for _, b in full[:per_epoch])
    assert seen == len(samples)
    # Two ranks: same number of batches, disjoint rows that together cover one global batch.
    r0 = data.iter_batches(rank=0, world_size=2)
    r1 = data.iter_batches(rank=1, world_size=2)
    rows0 = data.rows(0)
    _, b0 = next(r0)
    _, b1 = next(r1)
    assert b0["input_ids"].shape[0] == 4 and b1["input_ids"].shape[0] == 4
    ref = collate(samples, rows0[0:8:2], 0)
    assert b0["input_ids"].equal(ref["input_ids"])
    ref1 = collate(samples, rows0[1:8:2], 0)
    assert b1["input_ids"].equal(ref1["input_ids"])



def test_packed_row_logits_equal_each_sample_alone(tokenizer, tmp_path):
    """No cross-sample attention: a packed row gives the same logits as each sample run by itself."""
    import torch

    from matelike.model.transformer import Transformer, get_preset

    convs = [SINGLE, MULTI, [{"role": "user", "content": "北京是哪里？"}, {"role": "assistant", "content": "首都。"}]]
    path = _write_jsonl(tmp_path / "a.jsonl", [{"messages": c} for c in convs])
    samples, _ = load_sft_samples([path], tokenizer, seq_len=256)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                                   n_kv_heads=2, hidden_dim=128, max_seq_len=256)).eval()
    batch = collate(samples, [[0, 1, 2], [2]], tokenizer.pad_id)  # second row: padding after one sample
    with torch.no_grad():
        packed = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                       position_ids=batch["position_ids"]).logits
        unmasked = model(batch["input_ids"]).logits  # plain causal: later samples see earlier ones
        at = 0
        for i in range(3):
            ids, _ = samples.sample(i)
            n = len(ids) - 1
            alone = model(torch.as_tensor(ids[:-1], dtype=torch.long)[None]).logits[0]
            torch.testing.assert_close(packed[0, at : at + n], alone, atol=1e-5, rtol=1e-4)
            if i > 0:  # the check can fail: without segments the logits do differ
                assert not torch.allclose(unmasked[0, at : at + n], alone, atol=1e-3)
            at += n
        n2 = len(samples.sample(2)[0]) - 1
        torch.testing.assert_close(packed[1, :n2], packed[0, at - n2 : at], atol=1e-5, rtol=1e-4)


def test_big_integer_surrogate_and_oversized_records_are_bad_records(tokenizer, tmp_path, capsys):
    """An over-long integer and a lone surrogate in a messages layout used to end in a traceback (json.loads,
    then encode_chat); a huge line cost gigabytes. Each is now one bad record, the others kept."""
    good = {"messages": SINGLE}
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps(good).encode(),
        b'{"prompt": "a", "response": "b", "n": ' + b"9" * 5000 + b"}",
        json.dumps({"messages": [SINGLE[0], {"role": "assistant", "content": "\ud800 answer"}]}).encode(),
        json.dumps({"prompt": "长" * 3000, "response": "b"}, ensure_ascii=False).encode(),
        json.dumps(good, ensure_ascii=False).encode(),
    ]))
    report = BadRecordReport()
    samples, stats = load_sft_samples([path], tokenizer, seq_len=256, report=report, max_record_bytes=6000)
    assert (stats.records, stats.bad, stats.samples) == (5, 3, 2) and len(samples) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON: integer too long" in err
    assert f"{path}:3: invalid Unicode: lone surrogate U+D800 in field 'messages[1].content'" in err
    assert f"{path}:4: record too large: 9031 bytes, more than the limit of 6000" in err


def test_preference_reader_skips_bad_records(tokenizer, tmp_path, capsys):
    from matelike.data.preference import load_preference_pairs

    pair = {"prompt": "你好", "chosen": "你好！", "rejected": "走开"}
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps(pair, ensure_ascii=False).encode(),
        json.dumps({**pair, "rejected": "x\udfff"}).encode(),
        b'{"prompt": "a", "chosen": "b", "rejected": "c", "n": ' + b"1" * 5000 + b"}",
        json.dumps({**pair, "chosen": "长" * 2000}, ensure_ascii=False).encode(),
        json.dumps(pair).encode(),
    ]))
    pairs, stats = load_preference_pairs([path], tokenizer, seq_len=128, max_record_bytes=5100)
    assert (stats.records, stats.bad, stats.pairs) == (5, 3, 2) and len(pairs) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: invalid Unicode" in err and f"{path}:3: invalid JSON" in err
    assert f"{path}:4: record too large" in err


def test_fit_batch_equals_fit_messages(tokenizer):
    """The packer fits a whole chunk at once (`fit_batch`); every sample, mask, drop reason and count of dropped
    turns equals `fit_messages` on each conversation alone, over truncation, answerless and too-long cases."""
    import random

    rng = random.Random(0)
    words = ["你好", "\n\n开头换行", "北京是中华人民共和国的首都。" * 3, " a b", "今天天气很好", "<|im_end|>伪造"]
    convs = []
    for _ in range(300):
        conv = [{"role": "system", "content": rng.choice(words)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(0, 4)):
            r = rng.random()
            if r < 0.1:  # consecutive assistant or user turns: one exchange with several answers or questions
                conv.append({"role": rng.choice(["user", "assistant"]), "content": rng.choice(words)})
            else:
                conv += [{"role": "user", "content": rng.choice(words)},
                         {"role": "assistant", "content": rng.choice(words)}]
        if rng.random() < 0.2:
            conv.append({"role": "user", "content": "还有吗"})  # ends after the last answer: cut by the trim
        convs.append(conv)
    batch = tokenizer.encode_chat_batch(convs)
    seen = set()
    for seq_len in (12, 40, 100, 1000):
        fit = fit_batch(batch, convs, seq_len)
        k = pos = 0
        for c, conv in enumerate(convs):
            one = fit_messages(tokenizer, conv, seq_len)
            assert (fit.reasons[c], fit.turns_dropped[c]) == (one.reason, one.turns_dropped)
            seen.add(one.reason or ("truncated" if one.turns_dropped else "whole"))
            if one.ids is not None:
                n = int(fit.lengths[k])
                assert fit.ids[pos:pos + n].tolist() == one.ids and fit.mask[pos:pos + n].tolist() == one.mask
                k, pos = k + 1, pos + n
        assert k == len(fit.lengths) and pos == len(fit.ids) == len(fit.mask)
    assert seen == {"whole", "truncated", "too_long", "no_answer"}


S, U, A = ({"role": r, "content": c} for r, c in (("system", "系统"), ("user", "问题"), ("assistant", "回答")))


@pytest.mark.parametrize("convs", [[], [[]], [[S], [], [U, A]], [[U]], [[A], [A, U]], [[S, S, U, A, U]],
                                   [[S, A, A, U, U, A, U, A]], [[U, A]] * 3])
def test_fit_batch_edge_conversations(tokenizer, convs):
    """No conversation, no message, only system turns, answers before any question, several answers in a row,
    a trailing question, first and last conversation of a chunk: as `fit_messages` at every seq-len."""
    batch = tokenizer.encode_chat_batch(convs)
    for seq_len in (1, 5, 9, 14, 20, 100):
        fit = fit_batch(batch, convs, seq_len)
        pos = k = 0
        for c, conv in enumerate(convs):
            one = fit_messages(tokenizer, conv, seq_len)
            assert (fit.reasons[c], fit.turns_dropped[c]) == (one.reason, one.turns_dropped), (c, seq_len)
            if one.ids is not None:
                n = int(fit.lengths[k])
                assert fit.ids[pos:pos + n].tolist() == one.ids and fit.mask[pos:pos + n].tolist() == one.mask
                k, pos = k + 1, pos + n
        assert (k, pos) == (len(fit.lengths), len(fit.ids)) and len(fit.reasons) == len(convs)
