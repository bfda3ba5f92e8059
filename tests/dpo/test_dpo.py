"""DPO stage: the losses against hand-computed values, data reading, reference log-probs, a tiny training run."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from matelike.data.preference import PreferenceBatches, collate_pairs, load_preference_pairs
from matelike.data.records import BadRecordReport
from matelike.data.sft import IGNORE_INDEX
from matelike.train.losses import needs_reference, preference_loss, sequence_logps


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# One pair, worked by hand: policy log-probs -10 (chosen, 4 tokens) and -12 (rejected, 2 tokens), reference
# -11 for both. Log-ratios +1 and -1, so the DPO logit is β·2.
PAIR = dict(
    policy_chosen=_t(-10.0), policy_rejected=_t(-12.0), chosen_tokens=_t(4), rejected_tokens=_t(2),
    ref_chosen=_t(-11.0), ref_rejected=_t(-11.0),
)


def test_sigmoid_dpo_hand_computed() -> None:
    out = preference_loss("sigmoid", **PAIR, beta=0.1)
    # -log σ(0.2) = log(1 + e^-0.2)
    assert out.losses.item() == pytest.approx(0.5981388693, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)


def test_sigmoid_dpo_is_log2_when_policy_equals_reference() -> None:
    pc, pr = _t(-3.0, -40.0), _t(-7.5, -2.0)
    out = preference_loss("sigmoid", pc, pr, _t(3, 9), _t(5, 1), pc.clone(), pr.clone(), beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.0, 0.0]


def test_ipo_hand_computed() -> None:
    # per-token log-ratios 1/4 and -1/2: (0.75 - 1/(2·0.1))² = (0.75 - 5)² = 18.0625
    out = preference_loss("ipo", **PAIR, beta=0.1)
    assert out.losses.item() == pytest.approx(18.0625)


def test_simpo_hand_computed_and_reference_free() -> None:
    args = {k: v for k, v in PAIR.items() if not k.startswith("ref")}
    out = preference_loss("simpo", **args, beta=2.0, simpo_gamma=0.5)
    # averages -2.5 and -6: -log σ(2·3.5 - 0.5) = log(1 + e^-6.5)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-6.5)), rel=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(-5.0)
    assert not needs_reference("simpo") and not needs_reference("orpo") and needs_reference("ipo")


def test_orpo_hand_computed() -> None:
    args = {k: v for k, v in PAIR.items() if not k.startswith("ref")}
    out = preference_loss("orpo", **args, beta=0.1)
    pw, pl = math.exp(-2.5), math.exp(-6.0)
    log_odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
    expected = 2.5 - 0.1 * math.log(1 / (1 + math.exp(-log_odds)))
    assert out.losses.item() == pytest.approx(expected, rel=1e-9)


def test_reference_losses_demand_reference() -> None:
    args = {k: v for k, v in PAIR.items() if not k.startswith("ref")}
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", **args, beta=0.1)
    with pytest.raises(ValueError, match="unknown"):
        preference_loss("kto", **PAIR, beta=0.1)


def test_sequence_logps_counts_only_labelled_tokens() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[0, 1, -100]])
    total, n = sequence_logps(logits, labels)
    assert total.item() == pytest.approx(math.log(0.5) + math.log(0.8), rel=1e-6)
    assert n.item() == 2


# ---- data --------------------------------------------------------------------------------------------------

def _write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


STRING_PAIR = {"prompt": "判断评论情感：质量很好，物流也快。", "chosen": "正面", "rejected": "负面"}
MESSAGE_PAIR = {
    "prompt": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
               {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "讲个笑话"}],
    "chosen": [{"role": "assistant", "content": "从前有座山。"}],
    "rejected": [{"role": "assistant", "content": "不会。"}],
}


def _completion_targets(tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """Target ids that must carry loss: the answer's tokens and <|im_end|>, nothing of the prompt."""
    return tokenizer.encode(answer) + [tokenizer.im_end_id]


def test_string_and_message_layouts_mask_only_the_answer(tmp_path: Path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [STRING_PAIR, MESSAGE_PAIR])
    pairs, stats = load_preference_pairs([path], tokenizer, seq_len=256)
    assert stats.pairs == 2 and stats.bad == 0 and len(pairs) == 2
    batch = collate_pairs(pairs, [0, 1], tokenizer.pad_id)
    t = batch["targets"]
    assert t.shape[0] == 4 and batch["index"].tolist() == [0, 1]
    expect = [("正面", 0), ("从前有座山。", 1), ("负面", 2), ("不会。", 3)]
    for answer, row in expect:
        got = [v for v in t[row].tolist() if v != IGNORE_INDEX]
        assert got == tokenizer.encode(answer) + [tokenizer.im_end_id], answer
    # Inputs are the rendered conversation, so the earlier assistant turn "你好！" is input but not target.
    full = tokenizer.encode_chat(MESSAGE_PAIR["prompt"] + MESSAGE_PAIR["chosen"])[0]
    assert full[-2] == tokenizer.im_end_id
    full = full[:-1]  # the newline after the last <|im_end|> carries no loss and is cut
    n = len(full) - 1
    assert batch["input_ids"][1, :n].tolist() == full[:-1]
    assert batch["targets"][1, :n].tolist()[-1] == tokenizer.im_end_id


def test_parquet_layout(tmp_path: Path, tokenizer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: [STRING_PAIR[k]] * 3 for k in ("prompt", "chosen", "rejected")})
    pq.write_table(table, tmp_path / "p.parquet")
    pairs, stats = load_preference_pairs([tmp_path / "p.parquet"], tokenizer, seq_len=256)
    assert stats.pairs == 3 and len(pairs) == 3


def test_bad_records_named_with_file_and_line(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(STRING_PAIR, ensure_ascii=False)
    lines = [
        good.encode(),
        b'{"prompt": "x", "chosen": "a"}',  # missing rejected
        good.encode(),
        b'{"prompt": "x", "chosen": 3, "rejected": "b"}',  # wrong type
        b"\xff\xfe not utf-8",
        b'{"prompt": "x", "chosen": "a", "rejected": "a"}',  # identical
        b"",
        good.encode(),
        b'{"prompt": "x", "chosen": "a", "rej',  # truncated last line
    ]
    path.write_bytes(b"\n".join(lines))
    stream = io.StringIO()
    pairs, stats = load_preference_pairs([path], tokenizer, seq_len=256, report=BadRecordReport(stream=stream))
    assert (stats.pairs, stats.bad, stats.records) == (3, 5, 8)
    shown = stream.getvalue()
    for line in (2, 4, 5, 6, 9):
        assert f"{path}:{line}: " in shown
    assert "'rejected'" in shown and "invalid UTF-8" in shown and "invalid JSON" in shown


def test_empty_file_gives_no_pairs_and_a_clear_error(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "e.jsonl").write_text("")
    pairs, stats = load_preference_pairs([tmp_path / "e.jsonl"], tokenizer, seq_len=64)
    assert len(pairs) == 0 and stats.records == 0
    with pytest.raises(ValueError, match="no preference pairs"):
        PreferenceBatches(pairs, batch_size=2, pad_id=0)


def test_too_long_pairs_are_counted_not_cut(tmp_path: Path, tokenizer) -> None:
    long = {"prompt": "短", "chosen": "很长的回答" * 100, "rejected": "否"}
    path = _write_jsonl(tmp_path / "p.jsonl", [long, STRING_PAIR])
    pairs, stats = load_preference_pairs([path], tokenizer, seq_len=150)
    assert stats.pairs == 1 and stats.dropped_too_long == 1


def test_batches_resume_from_cursor(tmp_path: Path, tokenizer) -> None:
    rows = [dict(STRING_PAIR, chosen="正面" * (i + 1)) for i in range(7)]
    pairs, _ = load_preference_pairs([_write_jsonl(tmp_path / "p.jsonl", rows)], tokenizer, seq_len=256)
    data = PreferenceBatches(pairs, batch_size=2, pad_id=tokenizer.pad_id, seed=3)
    it = data.iter_batches()
    first = [next(it) for _ in range(9)]  # 4 batches per epoch: crosses two epoch boundaries
    assert [c for c, _ in first] == list(range(1, 10))
    seen = sorted(i for _, b in first[:4] for i in b["index"].tolist())
    assert seen == list(range(7))  # one epoch covers every pair once
    again = data.iter_batches(cursor=5)
    for (c1, b1), (c2, b2) in zip(first[5:], (next(again) for _ in range(4))):
        assert c1 == c2 and torch.equal(b1["input_ids"], b2["input_ids"])
    # two ranks split each global batch without overlap
    r0, r1 = data.iter_batches(0, 2), data.iter_batches(1, 2)
    _, a = next(r0)
    _, b = next(r1)
    assert not set(a["index"].tolist()) & set(b["index"].tolist())


# ---- reference log-probs and the task ---------------------------------------------------------------------

def _tiny_model(tokenizer, seed: int = 0):
    from matelike.model.transformer import Transformer, get_preset

    torch.manual_seed(seed)
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=128, max_seq_len=256)
    return Transformer(cfg)


def _pairs(tmp_path: Path, tokenizer, n: int = 6):
    rows = []
    for i in range(n):
        rows.append({"prompt": f"判断评论情感：第{i}条，质量很好。", "chosen": "正面" * (1 + i % 3), "rejected": "负面"})
    if n > 1:
        rows[1] = MESSAGE_PAIR
    return load_preference_pairs([_write_jsonl(tmp_path / "pairs.jsonl", rows)], tokenizer, seq_len=256)[0]


def test_precomputed_reference_equals_on_the_fly(tmp_path: Path, tokenizer) -> None:
    import copy

    from matelike.dpo import DPOTask, compute_reference_logps

    pairs = _pairs(tmp_path, tokenizer)
    model = _tiny_model(tokenizer)
    table = compute_reference_logps(model, pairs, batch_size=4, pad_id=tokenizer.pad_id)
    data = PreferenceBatches(pairs, batch_size=3, pad_id=tokenizer.pad_id, seed=1)
    pre = DPOTask(data, ref_logps=table)
    mem = DPOTask(data, ref_model=copy.deepcopy(model).eval())
    it = pre.batches(0, 1, None)
    for step in range(3):  # different batch compositions and paddings than the precompute pass
        batch, cursor = next(it)
        assert cursor == step + 1
        a = pre._reference(batch, pre.ref_logps, torch.device("cpu"))
        b = mem._reference(batch, None, torch.device("cpu"))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4)
        # policy == reference at the start: sigmoid DPO is exactly log 2, rewards are 0
        loss, metrics, n_tokens = pre.loss(model, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-4)
        assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-4) and n_tokens > 0


def test_reference_split_over_ranks_matches_one_process(tmp_path: Path, tokenizer) -> None:
    from matelike.dpo import compute_reference_logps

    pairs = _pairs(tmp_path, tokenizer)
    model = _tiny_model(tokenizer)
    whole = compute_reference_logps(model, pairs, batch_size=2, pad_id=tokenizer.pad_id)
    # without a process group the shares are not summed: each rank's rows are exactly its share
    shares = [compute_reference_logps(model, pairs, 2, tokenizer.pad_id, rank=r, world_size=2) for r in (0, 1)]
    torch.testing.assert_close(shares[0] + shares[1], whole, rtol=0, atol=1e-5)
    assert (shares[0] != 0).all(dim=1).sum() + (shares[1] != 0).all(dim=1).sum() == len(pairs)


def test_reference_free_losses_need_no_reference(tmp_path: Path, tokenizer) -> None:
    from matelike.dpo import DPOTask

    pairs = _pairs(tmp_path, tokenizer, n=4)
    data = PreferenceBatches(pairs, batch_size=4, pad_id=tokenizer.pad_id)
    model = _tiny_model(tokenizer)
    _, batch = next(data.iter_batches())
    for kind in ("simpo", "orpo"):
        loss, metrics, _ = DPOTask(data, loss_type=kind).loss(model, batch)
        assert torch.isfinite(loss) and loss.requires_grad
        assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= set(metrics)
    with pytest.raises(ValueError, match="reference"):
        DPOTask(data, loss_type="ipo")


def test_reference_cache_reused_and_invalidated(tmp_path: Path, tokenizer, monkeypatch) -> None:
    import matelike.dpo as dpo
    from matelike.train.distributed import DistInfo
    from matelike.train.precision import Precision

    pairs = _pairs(tmp_path, tokenizer)
    model = _tiny_model(tokenizer)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    prec = Precision.create("fp32", torch.device("cpu"))
    kw = dict(batch_size=4, pad_id=tokenizer.pad_id, precision=prec, info=info)
    first, _ = dpo.reference_tables(model, pairs, None, tmp_path / "out", **kw)
    assert (tmp_path / "out" / dpo.REFERENCE_FILE).is_file()

    def boom(*a, **k):
        raise AssertionError("recomputed although the cache matches")

    monkeypatch.setattr(dpo, "compute_reference_logps", boom)
    again, _ = dpo.reference_tables(model, pairs, None, tmp_path / "out", **kw)
    assert torch.equal(first, again)
    monkeypatch.undo()
    other = _tiny_model(tokenizer, seed=1)  # other weights: the cache must not be used
    changed, _ = dpo.reference_tables(other, pairs, None, tmp_path / "out", **kw)
    assert not torch.allclose(changed, first)


# ---- the stage end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    from matelike.model.io import save_model

    out = tmp_path_factory.mktemp("dpo_init") / "init"
    save_model(_tiny_model(tokenizer), tokenizer, out)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_raises_reward_accuracy_on_its_pairs(tmp_path: Path, tokenizer, init_dir: Path) -> None:
    from matelike.cli import main
    from matelike.dpo import DPOTask, compute_reference_logps
    from matelike.model.io import load_model

    # Answers never conflict (no pair prefers what another rejects), so a tiny model can learn them in a few steps.
    answers = [("正面", "负面"), ("晴天，适合出门。", "不知道"), ("北京", "上海")]
    rows = [{"prompt": f"第{i}个问题：请回答。", "chosen": answers[i % 3][0], "rejected": answers[i % 3][1]}
            for i in range(8)]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, _ = load_preference_pairs([data], tokenizer, seq_len=256)
    before_model, _ = load_model(init_dir, dtype=torch.float32)
    ref = compute_reference_logps(before_model, pairs, 8, tokenizer.pad_id)
    task = DPOTask(PreferenceBatches(pairs, 4, tokenizer.pad_id), ref_logps=ref, val=pairs, val_ref_logps=ref)
    before = task.evaluate(before_model)
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(before["val_reward_margin"]) < 1e-4  # policy == reference: no preference yet

    out = tmp_path / "out"
    code = main(["dpo", "--init", str(init_dir), "--data", str(data), "--val", str(data), "--out", str(out),
                 "--max-steps", "12", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "0",
                 "--log-every", "1", "--dtype", "fp32", "--no-progress"])
    assert code == 0
    lines = _metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 13))
    for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
        assert all(math.isfinite(m[key]) for m in lines), key
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # first step: policy == reference
    last = lines[-1]
    assert last["val_reward_accuracy"] == 1.0 and last["val_reward_margin"] > 0.05
    assert last["val_loss"] < math.log(2) - 0.02
    # the saved model directory is the trained policy: it prefers the chosen answers
    after_model, _ = load_model(out, dtype=torch.float32)
    after = task.evaluate(after_model)
    assert after["val_reward_accuracy"] == 1.0
    assert after["val_reward_margin"] == pytest.approx(last["val_reward_margin"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--loss", "ipo"], ["--loss", "simpo"], ["--loss", "orpo"], ["--ref-in-memory"]])
def test_every_loss_runs_on_the_engine(tmp_path: Path, tokenizer, init_dir: Path, extra: list[str]) -> None:
    from matelike.cli import main
    from matelike.dpo import REFERENCE_FILE

    data = _write_jsonl(tmp_path / "pairs.jsonl", [STRING_PAIR, MESSAGE_PAIR, STRING_PAIR])
    out = tmp_path / "out"
    code = main(["dpo", "--init", str(init_dir), "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1", "--dtype", "fp32",
                 "--no-progress", *extra])
    assert code == 0
    lines = _metrics(out)
    assert len(lines) == 2 and all(math.isfinite(m["loss"]) for m in lines)
    assert (out / "model.safetensors").is_file()
    # only the precomputing losses write the reference table
    assert (out / REFERENCE_FILE).is_file() == (extra == ["--loss", "ipo"])


def test_cli_reports_bad_input_and_refuses_empty_data(tmp_path: Path, init_dir: Path, capsys) -> None:
    from matelike.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "x", "chosen": "a"}\n{"prompt": 1, "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    code = main(["dpo", "--init", str(init_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--max-steps", "1", "--dtype", "fp32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{data}:1: missing field: 'rejected'" in err and f"{data}:2: " in err
    assert "no usable preference pairs" in err


def _run_args(init_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--init", str(init_dir), "--data", str(data), "--out", str(out), "--batch-size", "2", "--lr", "1e-3",
            "--min-lr", "1e-3", "--warmup-steps", "0", "--log-every", "1", "--dtype", "fp32", "--no-progress",
            "--save-every", "100", *extra]


@pytest.mark.slow
def test_resume_continues_exactly_with_the_cached_reference(tmp_path: Path, init_dir: Path) -> None:
    from matelike.cli import main
    from matelike.dpo import REFERENCE_FILE

    data = _write_jsonl(tmp_path / "p.jsonl", [STRING_PAIR, MESSAGE_PAIR, dict(STRING_PAIR, chosen="好评")] * 2)
    whole, split = tmp_path / "whole", tmp_path / "split"
    # flat learning rate (min = peak), so stopping at 3 and going on to 6 follows the same schedule as 6 at once
    assert main(["dpo", *_run_args(init_dir, data, whole, "--max-steps", "6")]) == 0
    assert main(["dpo", *_run_args(init_dir, data, split, "--max-steps", "3")]) == 0
    stamp = (split / REFERENCE_FILE).stat().st_mtime_ns
    assert main(["dpo", *_run_args(init_dir, data, split, "--max-steps", "6", "--resume")]) == 0
    assert (split / REFERENCE_FILE).stat().st_mtime_ns == stamp  # reused, not recomputed from the trained model
    a, b = _metrics(whole), _metrics(split)
    assert [m["step"] for m in b] == list(range(1, 7))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bitwise in fp32 on CPU


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, init_dir: Path) -> None:
    import os
    import subprocess
    import sys

    from matelike.cli import main

    data = _write_jsonl(tmp_path / "p.jsonl", [STRING_PAIR, MESSAGE_PAIR, dict(STRING_PAIR, chosen="好评")] * 2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["dpo", *_run_args(init_dir, data, one, "--max-steps", "3", "--val", str(data))]) == 0
    args = _run_args(init_dir, data, two, "--max-steps", "3", "--val", str(data))
    args[args.index("--batch-size") + 1] = "1"  # 2 ranks x 1 pair = 1 rank x 2 pairs
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "matelike",
           "dpo", *args]
    proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-5)
    for key in ("val_reward_margin", "val_loss", "val_reward_accuracy"):
        assert a[-1][key] == pytest.approx(b[-1][key], abs=1e-5)


def test_rpo_alpha_adds_the_chosen_nll(tmp_path: Path, tokenizer) -> None:
    from matelike.dpo import DPOTask, compute_reference_logps

    pairs = _pairs(tmp_path, tokenizer, n=4)
    model = _tiny_model(tokenizer)
    data = PreferenceBatches(pairs, batch_size=4, pad_id=tokenizer.pad_id)
    ref = compute_reference_logps(model, pairs, 4, tokenizer.pad_id)
    batch, _ = next(DPOTask(data, ref_logps=ref).batches(0, 1, None))
    plain, _, _ = DPOTask(data, ref_logps=ref).loss(model, batch)
    mixed, metrics, _ = DPOTask(data, ref_logps=ref, rpo_alpha=0.5).loss(model, batch)
    nll = metrics["nll_chosen"]
    assert nll > 0 and mixed.item() == pytest.approx(plain.item() + 0.5 * nll, rel=1e-5)


def test_seq_len_defaults_to_the_model_context_and_longer_is_refused(tmp_path: Path, init_dir: Path, capsys) -> None:
    from matelike.cli import main

    data = _write_jsonl(tmp_path / "p.jsonl", [STRING_PAIR, MESSAGE_PAIR] * 2)
    from matelike.model.io import load_model

    context = load_model(init_dir)[0].config.max_seq_len
    code = main(["dpo", *_run_args(init_dir, data, tmp_path / "long", "--max-steps", "1", "--seq-len",
                                   str(context + 1))])
    assert code == 2 and f"--seq-len {context + 1} exceeds the context" in capsys.readouterr().err
    assert not (tmp_path / "long" / "model.safetensors").exists()
    assert main(["dpo", *_run_args(init_dir, data, tmp_path / "ok", "--max-steps", "1")]) == 0


def test_packed_pairs_train_as_raw_and_resume_exactly(tmp_path: Path, init_dir: Path, tokenizer_dir: Path,
                                                       capsys) -> None:
    from matelike.cli import main
    from matelike.data.packed import pack_chat

    data = _write_jsonl(tmp_path / "p.jsonl", [STRING_PAIR, MESSAGE_PAIR, dict(STRING_PAIR, chosen="好评")] * 2)
    packed = tmp_path / "p.bin"
    pack_chat(tokenizer_dir, [data], packed, "dpo", seq_len=64, progress=False)
    raw, whole, split = tmp_path / "raw", tmp_path / "whole", tmp_path / "split"
    assert main(["dpo", *_run_args(init_dir, data, raw, "--max-steps", "4", "--seq-len", "64")]) == 0
    assert main(["dpo", *_run_args(init_dir, packed, whole, "--max-steps", "4", "--seq-len", "64")]) == 0
    assert [m["loss"] for m in _metrics(raw)] == [m["loss"] for m in _metrics(whole)]
    assert main(["dpo", *_run_args(init_dir, packed, split, "--max-steps", "2", "--seq-len", "64")]) == 0
    assert main(["dpo", *_run_args(init_dir, packed, split, "--max-steps", "4", "--seq-len", "64", "--resume")]) == 0
    assert [m["loss"] for m in _metrics(split)] == [m["loss"] for m in _metrics(whole)]
    capsys.readouterr()
    assert main(["dpo", *_run_args(init_dir, packed, tmp_path / "short", "--seq-len", "32")]) == 2
    assert "packed for --seq-len 64, more than this run's 32" in capsys.readouterr().err
