"""`matelike reward train`: the loss by hand, a toy preference learned, LoRA, exact resume, packed and bad data."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from matelike.data.preference import PreferenceBatches, load_preference_pairs
from matelike.reward.model import RewardModel, load_reward_model, reward_collate, score
from matelike.reward.train import RewardTask
from matelike.train.losses import bradley_terry_loss

FILLER = "今天天气我们一起去公园散步学习语言模型需要大量的文本数据和计算资源北京是中国首都经济建设取得成就"
WORD = "好"  # chosen answers contain it, rejected ones never do


def _write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Pairs whose only rule is the preference: the chosen answer has WORD somewhere, the rejected one has not
    (both drawn from the same characters, lengths alike), each under its own prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rejected = "".join(rng.choice(FILLER) for _ in range(rng.randint(3, 8)))
        base = "".join(rng.choice(FILLER) for _ in range(rng.randint(2, 7)))
        k = rng.randint(0, len(base))
        rows.append({"prompt": f"第{seed}-{i}个问题：请回答。", "chosen": base[:k] + WORD + base[k:], "rejected": rejected})
    return rows


def tiny_backbone(tokenizer, seed: int = 0):
    from matelike.model.transformer import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   hidden_dim=128, max_seq_len=128))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    from matelike.model.io import save_model

    out = tmp_path_factory.mktemp("reward_init") / "init"
    save_model(tiny_backbone(tokenizer), tokenizer, out)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _args(init_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["reward", "train", "--init", str(init_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--lr", "3e-3", "--min-lr", "3e-3", "--warmup-steps", "0", "--log-every", "1", "--dtype", "fp32",
            "--no-progress", "--save-every", "100", *extra]


def test_loss_is_bradley_terry_by_hand(tmp_path: Path, tokenizer) -> None:
    # two pairs: rewards (2, 0.5) -> -log σ(1.5); (-1, 0.5) -> -log σ(-1.5); centering adds 0.1·(sum)²
    losses = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5]), center_coef=0.1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.5)) + 0.1 * 2.5**2,
                                             math.log1p(math.exp(1.5)) + 0.1 * 0.5**2], rel=1e-6)
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([3.0])).item() == pytest.approx(math.log(2))

    # the task's loss is that formula on the model's rewards of the batch's rows, chosen rows first
    data = _write_jsonl(tmp_path / "p.jsonl", toy_pairs(3, seed=1))
    pairs, _ = load_preference_pairs([data], tokenizer, seq_len=128)
    model = RewardModel(tiny_backbone(tokenizer).config, backbone=tiny_backbone(tokenizer))
    batches = PreferenceBatches(pairs, 3, tokenizer.pad_id, collate=reward_collate(tokenizer))
    task = RewardTask(batches, center_coef=0.05)
    batch = next(task.batches(0, 1, None))[0]
    loss, metrics, n_tokens = task.loss(model, batch)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    order = batch["index"].tolist()
    chosen = score(model, tokenizer, [rows[i]["prompt"] for i in order], [rows[i]["chosen"] for i in order])
    rejected = score(model, tokenizer, [rows[i]["prompt"] for i in order], [rows[i]["rejected"] for i in order])
    by_hand = sum(math.log1p(math.exp(r - c)) + 0.05 * (c + r) ** 2 for c, r in zip(chosen, rejected)) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(sum((c > r) for c, r in zip(chosen, rejected)) / 3)
    assert n_tokens == batch["real_tokens"] == int((batch["input_ids"] != tokenizer.pad_id).sum())


@pytest.mark.slow
def test_tiny_model_learns_a_toy_preference(tmp_path: Path, init_dir: Path, capsys) -> None:
    from matelike.cli import main

    train = _write_jsonl(tmp_path / "train.jsonl", toy_pairs(64, seed=0))
    val = _write_jsonl(tmp_path / "val.jsonl", toy_pairs(40, seed=99))  # other prompts, other answers
    out = tmp_path / "rm"
    assert main(_args(init_dir, train, out, "--val", str(val), "--max-steps", "16", "--eval-every", "8",
                      "--batch-size", "8")) == 0
    lines = _metrics(out)
    evals = [m for m in lines if "val_accuracy" in m]
    assert [m["step"] for m in evals] == [8, 16]
    assert evals[-1]["val_accuracy"] >= 0.9 and evals[-1]["val_margin"] > 0 and evals[-1]["val_pairs"] == 40
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=0.3)  # a new head: near chance
    err = capsys.readouterr().err
    assert f"held-out pairwise accuracy {evals[-1]['val_accuracy']:.4f} over 40 pairs" in err
    # the saved directory is the trained reward model
    model, tok = load_reward_model(out)
    rows = [json.loads(x) for x in val.read_text().splitlines()]
    c = score(model, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    r = score(model, tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(a > b for a, b in zip(c, r)) / len(rows) == pytest.approx(evals[-1]["val_accuracy"], abs=1e-9)


def test_lora_trains_adapters_and_head_only_and_the_merged_save_scores_the_same(tmp_path: Path, tokenizer) -> None:
    from matelike.reward.train import reward_export
    from matelike.sft import add_lora
    from matelike.train import TrainConfig, Trainer

    backbone = tiny_backbone(tokenizer)
    model = RewardModel(backbone.config, backbone=backbone)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model.model, 4, 8.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n for n in trainable - {"score.weight"})
    assert any(".attn.wqkv.lora_A" in n for n in trainable) and any(".mlp.w_down.lora_B" in n for n in trainable)

    pairs, _ = load_preference_pairs([_write_jsonl(tmp_path / "p.jsonl", toy_pairs(12, seed=3))], tokenizer, 128)
    task = RewardTask(PreferenceBatches(pairs, 4, tokenizer.pad_id, collate=reward_collate(tokenizer)))
    out = tmp_path / "out"
    config = TrainConfig(out=out, max_steps=4, batch_size=4, seq_len=128, lr=3e-3, min_lr=3e-3, warmup_steps=0,
                         weight_decay=0.0, dtype="fp32", device="cpu", progress=False)
    Trainer(config, model, tokenizer, task, export=reward_export(tokenizer)).fit()
    for name, p in model.named_parameters():
        plain = name.replace(".base_layer", "")
        if name == "score.weight" or "lora_B" in name:  # peft starts B at zero: moved means trained
            assert not torch.equal(p, before.get(name, torch.zeros_like(p))), name
        elif plain in before:
            assert torch.equal(p, before[plain]), f"{name} is a base weight and must stay frozen"

    merged, tok = load_reward_model(out)  # adapters merged into plain weights, no adapter files
    assert not any("lora" in n for n, _ in merged.named_parameters()) and not list(out.glob("adapter*"))
    wqkv = "model.layers.0.attn.wqkv.weight"
    assert not torch.equal(dict(merged.named_parameters())[wqkv], before[wqkv])
    rows = toy_pairs(6, seed=4)
    prompts, answers = [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    assert score(merged, tok, prompts, answers) == pytest.approx(score(model, tokenizer, prompts, answers), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora-rank", "2"]])
def test_interrupted_run_resumes_exactly(tmp_path: Path, init_dir: Path, lora: list[str]) -> None:
    from matelike.cli import main

    data = _write_jsonl(tmp_path / "p.jsonl", toy_pairs(10, seed=5))
    val = _write_jsonl(tmp_path / "v.jsonl", toy_pairs(4, seed=6))
    whole, split = tmp_path / "whole", tmp_path / "split"
    # flat learning rate (min = peak): stopping at 3 and going on to 6 follows the schedule of 6 at once
    assert main(_args(init_dir, data, whole, "--max-steps", "6", "--val", str(val), *lora)) == 0
    assert main(_args(init_dir, data, split, "--max-steps", "3", "--val", str(val), *lora)) == 0
    assert main(_args(init_dir, data, split, "--max-steps", "6", "--val", str(val), "--resume", *lora)) == 0
    a, b = _metrics(whole), _metrics(split)
    assert [m["step"] for m in b] == list(range(1, 7))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bitwise in fp32 on CPU
    assert a[-1]["val_accuracy"] == b[-1]["val_accuracy"] and a[-1]["val_loss"] == b[-1]["val_loss"]
    (ma, ta), (mb, _) = load_reward_model(whole), load_reward_model(split)
    rows = toy_pairs(4, seed=7)
    prompts, answers = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    assert score(ma, ta, prompts, answers) == score(mb, ta, prompts, answers)


def test_bad_pair_records_are_named_with_file_and_line(tmp_path: Path, init_dir: Path, capsys) -> None:
    from matelike.cli import main

    good = json.dumps(toy_pairs(1, seed=8)[0], ensure_ascii=False)
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([good, '{"prompt": "x", "chosen": "a"}', good, '{"prompt": 1, "chosen": "a", '
                               '"rejected": "b"}', "not json", good]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(_args(init_dir, data, out, "--max-steps", "1")) == 0  # the good records are used
    err = capsys.readouterr().err
    assert f"{data}:2: missing field: 'rejected'" in err and f"{data}:4: " in err and f"{data}:5: " in err
    assert "3 pairs kept, 3 bad" in err
    assert json.loads((out / "reward_data.json").read_text())["train"]["bad"] == 3

    only_bad = _write_jsonl(tmp_path / "only_bad.jsonl", ['{"prompt": "x", "chosen": "a"}'])
    assert main(_args(init_dir, only_bad, tmp_path / "o2", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert f"{only_bad}:1: missing field: 'rejected'" in err and "no usable preference pairs" in err
    assert main(_args(init_dir, data, tmp_path / "o3", "--lora-rank", "-1")) == 2
    assert "--lora-rank must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_packed_dpo_pairs_train_as_the_raw_records(tmp_path: Path, init_dir: Path, tokenizer_dir: Path) -> None:
    from matelike.cli import main
    from matelike.data.packed import pack_chat

    data = _write_jsonl(tmp_path / "p.jsonl", toy_pairs(8, seed=9))
    packed = tmp_path / "p.bin"
    pack_chat(tokenizer_dir, [data], packed, "dpo", seq_len=64, progress=False)
    raw, whole = tmp_path / "raw", tmp_path / "packed"
    assert main(_args(init_dir, data, raw, "--max-steps", "3", "--seq-len", "64")) == 0
    assert main(_args(init_dir, packed, whole, "--max-steps", "3", "--seq-len", "64")) == 0
    assert [m["loss"] for m in _metrics(raw)] == [m["loss"] for m in _metrics(whole)]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, init_dir: Path,
                                                            sharding: list[str]) -> None:
    import os
    import subprocess
    import sys

    from matelike.cli import main

    data = _write_jsonl(tmp_path / "p.jsonl", toy_pairs(8, seed=10))
    val = _write_jsonl(tmp_path / "v.jsonl", toy_pairs(5, seed=11))  # odd: the ranks score unequal shares
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(init_dir, data, one, "--max-steps", "3", "--val", str(val))) == 0
    args = _args(init_dir, data, two, "--max-steps", "3", "--val", str(val), *sharding)
    args[args.index("--batch-size") + 1] = "2"  # 2 ranks x 2 pairs = 1 rank x 4 pairs
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "matelike",
           *args]
    proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-5)
    for key in ("val_loss", "val_accuracy", "val_margin", "val_pairs"):
        assert a[-1][key] == pytest.approx(b[-1][key], abs=1e-5)
    # rank 0 wrote the whole reward model (gathered from the shards under FSDP)
    (ma, ta), (mb, _) = load_reward_model(one), load_reward_model(two)
    rows = toy_pairs(4, seed=12)
    prompts, answers = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    assert score(mb, ta, prompts, answers) == pytest.approx(score(ma, ta, prompts, answers), abs=1e-5)
