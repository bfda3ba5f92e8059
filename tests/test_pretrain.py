"""`matelike pretrain`: the window sampler, and end-to-end runs of the tiny preset on a packed tiny corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from matelike.cli import CommandTable
from matelike.pretrain import PretrainTask, WindowSampler

SENTENCES = [
    "人民日报一九九八年元旦献词：迈向充满希望的新世纪。",
    "这家店的服务很好，菜的味道也不错，下次还会再来。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "学习语言模型需要大量的文本数据和计算资源。",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    """(train.bin, val.bin) of a tiny corpus packed with the session's tiny tokenizer."""
    from matelike.data.pack import pack

    root = tmp_path_factory.mktemp("packed")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(60):
            text = "".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    pack(tokenizer_dir, [corpus], root / "train.bin", val_out=root / "val.bin", val_fraction=0.15, seed=1,
         progress=False)
    return root / "train.bin", root / "val.bin"


def main(argv: list[str]) -> int:
    """`matelike ARGV` with only this room's commands registered, so other modules cannot break these tests."""
    import argparse

    from matelike import pretrain
    from matelike.bench import train as bench_train

    parser = argparse.ArgumentParser(prog="matelike")
    table = CommandTable(parser)
    pretrain.add_cli(table)
    bench_train.add_cli(table)
    args = parser.parse_args(argv)
    return int(args.handler(args))


def pretrain_args(out: Path, tokenizer_dir: Path, packed: tuple[Path, Path], *extra: str) -> list[str]:
    train, val = packed
    return ["pretrain", "--preset", "tiny", "--data", str(train), "--val", str(val), "--tokenizer",
            str(tokenizer_dir), "--out", str(out), "--seq-len", "32", "--batch-size", "2", "--dtype", "fp32",
            "--log-every", "1", "--warmup-steps", "1", "--no-progress", "--eval-tokens", "256", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ sampler
def test_sampler_visits_every_window_once_per_epoch() -> None:
    s = WindowSampler(n_tokens=101, seq_len=10, seed=3)
    assert s.n_windows == 10 and s.slack == 0
    epoch0 = s.starts(np.arange(0, 10))
    epoch1 = s.starts(np.arange(10, 20))
    assert sorted(epoch0) == list(range(0, 100, 10)) and sorted(epoch1) == sorted(epoch0)
    assert list(epoch0) != list(epoch1)  # a fresh order each epoch
    assert list(WindowSampler(101, 10, seed=3).starts(np.arange(0, 10))) == list(epoch0)  # seeded
    shifted = WindowSampler(n_tokens=106, seq_len=10, seed=0)
    starts = shifted.starts(np.arange(0, 30))
    assert starts.max() + 11 <= 106 and starts.min() >= 0
    with pytest.raises(ValueError, match="too few"):
        WindowSampler(n_tokens=8, seq_len=10, seed=0)


def test_ranks_split_the_same_global_batches() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    one = PretrainTask(tokens, batch_size=4, seq_len=7, seed=0)
    two = PretrainTask(tokens, batch_size=2, seq_len=7, seed=0)
    it1 = one.batches(0, 1, None)
    r0, r1 = two.batches(0, 2, None), two.batches(1, 2, None)
    for _ in range(40):  # several epochs of 142 windows
        (b1, c1), (a, ca), (b, cb) = next(it1), next(r0), next(r1)
        assert torch.equal(b1, torch.cat([a, b])) and c1 == ca == cb
        assert torch.equal(b1[:, 1:], b1[:, :-1] + 1)  # contiguous windows of the file
    resumed = next(one.batches(0, 1, c1))[0]
    assert torch.equal(resumed, next(it1)[0])  # the cursor continues exactly


def test_epoch_size_counts_micro_batches_per_rank() -> None:
    task = PretrainTask(np.zeros(1001, dtype=np.uint16), batch_size=4, seq_len=10, seed=0)
    assert task.epoch_size(1) == 25 and task.epoch_size(2) == 12


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_pretrain_end_to_end_writes_model_checkpoints_metrics(tmp_path: Path, tokenizer_dir: Path, packed) -> None:
    from matelike.model.io import load_model

    out = tmp_path / "run"
    assert main(pretrain_args(out, tokenizer_dir, packed, "--max-steps", "4", "--save-every", "2",
                              "--eval-every", "2")) == 0
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert m["val_bpb"] == pytest.approx(m["val_loss"] / np.log(2) / json.loads(
            Path(str(packed[1]) + ".json").read_text())["bytes_per_token"], rel=1e-3)
    assert lines[0]["tokens"] == 2 * 32
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    model, tok = load_model(out)
    assert tok.vocab_size == model.config.vocab_size
    # The model directory holds the final weights (those of the step-4 checkpoint).
    state = torch.load(out / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    torch.testing.assert_close(model.embed.weight, state["model"]["embed.weight"])

    # Exact resume on the real model: drop the last checkpoint, resume, get the same losses step by step.
    shutil.rmtree(out / "checkpoints" / "step-4")
    before = [(m["step"], m["loss"], m.get("val_loss")) for m in lines]
    assert main(pretrain_args(out, tokenizer_dir, packed, "--max-steps", "4", "--save-every", "2",
                              "--eval-every", "2", "--resume")) == 0
    assert [(m["step"], m["loss"], m.get("val_loss")) for m in metrics(out)] == before


def test_pretrain_rejects_tokens_of_another_tokenizer(tmp_path: Path, tokenizer_dir: Path, packed, capsys) -> None:
    meta_path = Path(str(packed[0]) + ".json")
    bad = tmp_path / "other.bin"
    shutil.copy(packed[0], bad)
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_sha256"] = "0" * 64
    Path(str(bad) + ".json").write_text(json.dumps(meta))
    args = pretrain_args(tmp_path / "o", tokenizer_dir, (bad, packed[1]), "--max-steps", "1")
    assert main(args) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_pretrain_rejects_seq_len_longer_than_val(tmp_path: Path, tokenizer_dir: Path, packed, capsys) -> None:
    args = pretrain_args(tmp_path / "o", tokenizer_dir, packed, "--max-steps", "1")
    args[args.index("--seq-len") + 1] = "100000"
    assert main(args) == 2
    assert "--seq-len" in capsys.readouterr().err


# ------------------------------------------------------------------ bench
@pytest.mark.slow
def test_bench_train_prints_one_json_line(capsys) -> None:
    args = ["bench", "train", "--preset", "tiny", "--batch-size", "1", "--seq-len", "16", "--steps", "1",
            "--warmup", "1", "--no-compile", "--dtypes", "fp32", "--memory-preset", "", "--peak-seconds", "0.05"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert set(result["peak_tflops"]) == {"bf16", "fp32"} and result["peak_tflops"]["fp32"] > 0
    runs = result["runs"]
    assert [r["loss"] for r in runs] == ["fused", "logits"]
    for run in runs:
        assert run["dtype"] == "fp32" and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1.5
    with pytest.raises(SystemExit, match="--losses: unknown 'full'"):
        main(args + ["--losses", "fused,full"])


@pytest.mark.slow
def test_memory_probe_reports_step_peak() -> None:
    from matelike.bench.train import memory_probe

    r = memory_probe("tiny", 1, 32, "cpu")
    assert r["params"] > 0 and r["peak_bytes"] >= 0 and r["weights_grads_adam_gib"] > 0


def test_pretrain_fsdp_without_torchrun_is_a_clear_error(tmp_path: Path, tokenizer_dir: Path, packed, capsys) -> None:
    assert main(pretrain_args(tmp_path / "o", tokenizer_dir, packed, "--max-steps", "1", "--fsdp")) == 2
    assert "--fsdp needs torchrun" in capsys.readouterr().err
