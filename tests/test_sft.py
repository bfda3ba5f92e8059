"""`matelike sft` on the engine: freezing, LoRA merge, bad input, outputs, and TRL on the saved directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matelike.cli import MODULES, CommandTable
from matelike.model.io import load_model, save_model
from matelike.model.transformer import Transformer, get_preset
from matelike.sft import FREEZE_MODES, add_lora, apply_freeze, merge_lora

CONV = [
    {"role": "system", "content": "你是助手"},
    {"role": "user", "content": "今天天气怎么样？"},
    {"role": "assistant", "content": "很好，我们一起去公园散步吧。"},
    {"role": "user", "content": "北京呢？"},
    {"role": "assistant", "content": "北京是中国的首都。"},
]


def _tiny(tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2, hidden_dim=128, max_seq_len=128))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("init") / "model"
    save_model(_tiny(tokenizer), tokenizer, d)
    return d


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"判断评论情感：这家店的服务很好{i}", "response": "正面"}, ensure_ascii=False) + "\n")
            f.write(json.dumps({"messages": CONV}, ensure_ascii=False) + "\n")
    return path


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _main(argv: list[str]) -> int:
    """`matelike sft ...` through the stage's own parser (other rooms' commands are not needed here)."""
    import argparse

    from matelike import sft

    parser = argparse.ArgumentParser(prog="matelike")
    sft.add_cli(CommandTable(parser))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_registered_on_the_command_line():
    assert "matelike.sft" in MODULES


def _sft(init_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return _main(["sft", "--init", str(init_dir), "--data", str(data), "--out", str(out), "--max-steps", "3",
                 "--batch-size", "2", "--seq-len", "96", "--warmup-steps", "1", "--log-every", "1",
                 "--dtype", "fp32", "--lr", "1e-3", "--min-lr", "1e-4", *extra])


def test_freeze_embeddings_bitwise_unchanged_and_outputs(init_dir, sft_file, tmp_path):
    out = tmp_path / "out"
    assert _sft(init_dir, sft_file, out) == 0
    before, after = _weights(init_dir), _weights(out)
    assert torch.equal(before["embed.weight"], after["embed.weight"])
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # tied to the embedding
    changed = [k for k in before if k.startswith("layers.") and not torch.equal(before[k], after[k])]
    assert len(changed) == len([k for k in before if k.startswith("layers.")])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(0.0 <= m["padding"] < 1.0 for m in lines)
    # Schedule: warmup 0 -> lr in 1 step, then cosine down to min-lr at the last step.
    assert lines[0]["lr"] == pytest.approx(1e-3) and lines[-1]["lr"] == pytest.approx(1e-4)
    summary = json.loads((out / "sft_data.json").read_text())
    assert summary["train"]["samples"] == 48 and summary["train"]["bad"] == 0
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_freeze_all_but_layers(init_dir, sft_file, tmp_path):
    out = tmp_path / "out"
    assert _sft(init_dir, sft_file, out, "--freeze", "all-but-layers", "--val", str(sft_file)) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["val_loss"] < 20  # held-out answer loss, logged at the end
    before, after = _weights(init_dir), _weights(out)
    for k in before:
        if k.startswith("layers."):
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k


def test_freeze_modes_set_requires_grad(tokenizer):
    model = _tiny(tokenizer)
    total = sum(p.numel() for p in model.parameters())
    counts = {m: apply_freeze(model, m) for m in FREEZE_MODES}
    assert counts["none"] == {"trainable": total, "frozen": 0}
    assert counts["embeddings"]["frozen"] == model.embed.weight.numel()
    layers = sum(p.numel() for p in model.layers.parameters())
    assert counts["all-but-layers"]["trainable"] == layers
    with pytest.raises(ValueError, match="--freeze"):
        apply_freeze(model, "head")


def test_lora_merge_equals_adapter_output(tokenizer):
    model = add_lora(_tiny(tokenizer), rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("wqkv" in n for n in trainable) and any("w_down" in n for n in trainable)
    with torch.no_grad():  # LoRA's B starts at zero; give the adapters a real effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randint(0, tokenizer.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        merged_model = merge_lora(model)
        merged = merged_model(x).logits
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    assert type(merged_model.layers[0].attn.wqkv) is torch.nn.Linear
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    # The merge changed the weights (the adapters were not a no-op).
    plain = _tiny(tokenizer).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x).logits, merged, atol=1e-3)


def test_lora_sft_saves_plain_merged_model(init_dir, sft_file, tmp_path):
    out = tmp_path / "out"
    assert _sft(init_dir, sft_file, out, "--lora-rank", "4") == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())
    before, after = _weights(init_dir), _weights(out)
    assert torch.equal(before["embed.weight"], after["embed.weight"])
    assert not torch.equal(before["layers.0.attn.wqkv.weight"], after["layers.0.attn.wqkv.weight"])
    # Norms have no adapters: bitwise the same.
    assert torch.equal(before["layers.0.attn_norm.weight"], after["layers.0.attn_norm.weight"])


def test_bad_input_reported_and_good_records_kept(init_dir, tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"instruction": "说你好", "output": "你好"}, ensure_ascii=False).encode()
    path.write_bytes(b"\n".join([good, b'{"instruction": "x", "output"', b"\xff\xfe", good,
                                 json.dumps({"instruction": "x"}).encode(), good]))
    out = tmp_path / "out"
    assert _sft(init_dir, path, out) == 0
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err and f"{path}:3: invalid UTF-8" in err
    assert f"{path}:5: missing field" in err
    assert "3 bad records" in err
    summary = json.loads((out / "sft_data.json").read_text())
    assert summary["train"]["samples"] == 3 and summary["train"]["bad"] == 3

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_bytes(b"[1]\n")
    assert _sft(init_dir, only_bad, tmp_path / "o2") == 1
    assert "no usable SFT samples" in capsys.readouterr().err
    assert _sft(init_dir, tmp_path / "missing.jsonl", tmp_path / "o3") == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_trl_sft_trainer_runs_a_step_on_the_saved_directory(init_dir, tokenizer, tmp_path, monkeypatch):
    """The saved directory is a plain HF model: TRL's SFTTrainer trains on it (offline), with the same
    assistant-only loss as ours."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(init_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(init_dir)
    ds = datasets.Dataset.from_list([{"messages": CONV}] * 2)
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2,
                        report_to=[], use_cpu=True, max_length=256, save_strategy="no", logging_steps=1,
                        assistant_only_loss=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=hf_model, args=cfg, train_dataset=ds, processing_class=hf_tok)
    result = trainer.train()
    assert result.global_step == 1

    # Our masked loss on the same conversation, from the same directory.
    from matelike.data.sft import PackedSFTData, SFTSamples, fit_messages
    from matelike.sft import SFTTask

    model, tok = load_model(init_dir)
    fit = fit_messages(tok, CONV, 256)
    assert fit.turns_dropped == 0
    samples = SFTSamples.from_lists([fit.ids], [fit.mask])
    task = SFTTask(PackedSFTData(samples, 256, 1, tok.pad_id))
    batch, _ = next(task.batches(0, 1, None))
    with torch.no_grad():
        ours, _, n = task.loss(model, batch)
    assert n == sum(fit.mask[1:])
    assert result.training_loss == pytest.approx(float(ours), abs=1e-3)


def test_sample_weights_by_hand() -> None:
    from matelike.sft import sample_weights

    # Row 0: sample 1 answers 2 tokens, sample 2 one, then padding; row 1: samples of 1 and 3 answer tokens.
    targets = torch.tensor([[-100, 5, 6, -100, 7, -100], [3, -100, -100, 4, 4, 4]])
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
    weights, n = sample_weights(targets, segments)
    third = 1 / 3
    torch.testing.assert_close(weights, torch.tensor([[0, 0.5, 0.5, 0, 1, 0], [1, 0, 0, third, third, third]]))
    assert n == 4


def test_sequence_mean_weighs_each_packed_sample_the_same(init_dir) -> None:
    """--loss-mean sequence on one packed row of a one-word answer and a longer one: the loss is the mean of the
    two samples' own token means (the token mean leans to the longer answer's)."""
    from matelike.data.sft import PackedSFTData, SFTSamples, fit_messages
    from matelike.sft import SFTTask

    model, tok = load_model(init_dir)
    short = fit_messages(tok, [{"role": "user", "content": "判断评论情感：很好"},
                               {"role": "assistant", "content": "正面"}], 128)
    long = fit_messages(tok, CONV[1:3], 128)
    assert len(short.ids) + len(long.ids) <= 128 and 3 * sum(short.mask) < sum(long.mask)

    def loss(fits: list, mean: str) -> tuple:
        samples = SFTSamples.from_lists([f.ids for f in fits], [f.mask for f in fits])
        task = SFTTask(PackedSFTData(samples, 128, 1, tok.pad_id), loss_mean=mean)
        batch, _ = next(task.batches(0, 1, None))
        with torch.no_grad():
            return task.loss(model, batch)

    # A model that has learnt the short answer: the two samples' losses then differ (a random model's are equal).
    samples = SFTSamples.from_lists([short.ids], [short.mask])
    batch, _ = next(SFTTask(PackedSFTData(samples, 128, 1, tok.pad_id)).batches(0, 1, None))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        model(batch["input_ids"], batch["targets"], segment_ids=batch["segment_ids"]).loss.backward()
        opt.step()
    own = [float(loss([f], "token")[0]) for f in (short, long)]
    assert own[0] < own[1] - 1
    both, _, n_tokens, n_samples = loss([short, long], "sequence")
    assert n_samples == 2 and n_tokens == sum(short.mask[1:]) + sum(long.mask[1:])
    assert float(both) == pytest.approx(sum(own) / 2, rel=1e-4)
    token_mean, _, _ = loss([short, long], "token")
    assert float(token_mean) > sum(own) / 2 + 0.1  # the token mean leans to the longer answer's loss
    with pytest.raises(ValueError, match="loss_mean must be one of"):
        SFTTask(PackedSFTData(SFTSamples.from_lists([short.ids], [short.mask]), 128, 1, tok.pad_id), loss_mean="x")


def test_loss_mean_sequence_from_the_command_line(init_dir, sft_file, tmp_path):
    # Batches mix one-word answers and a long conversation: the first step's loss (before any update) is
    # another mean of the same per-token losses, and the runs part from there.
    for mean in ("token", "sequence"):
        assert _sft(init_dir, sft_file, tmp_path / mean, "--loss-mean", mean, "--max-steps", "2") == 0
    token, sequence = ([json.loads(x)["loss"] for x in (tmp_path / m / "metrics.jsonl").read_text().splitlines()]
                       for m in ("token", "sequence"))
    assert abs(token[0] - sequence[0]) > 1e-3
    with pytest.raises(SystemExit):
        _sft(init_dir, sft_file, tmp_path / "bad", "--loss-mean", "sample")


def test_resume_continues_exactly_with_lora(init_dir, sft_file, tmp_path, capsys):
    """A run resumed from its step-2 checkpoint ends with the same weights as one never stopped: the data
    cursor and the LoRA adapters are part of the engine's checkpoint."""
    import shutil

    common = ("--lora-rank", "4", "--max-steps", "4", "--save-every", "2")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _sft(init_dir, sft_file, a, *common) == 0
    assert _sft(init_dir, sft_file, b, *common) == 0
    shutil.rmtree(b / "checkpoints" / "step-4")
    (b / "model.safetensors").unlink()
    capsys.readouterr()
    assert _sft(init_dir, sft_file, b, *common, "--resume") == 0
    assert "(step 2)" in capsys.readouterr().err  # it did resume: a fresh run would also match
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4


def test_seq_len_longer_than_the_model_context_is_refused(init_dir, sft_file, tmp_path, capsys):
    # the same policy as dpo: the model's context by default, never silently more
    assert _sft(init_dir, sft_file, tmp_path / "out", "--seq-len", "129") == 2
    assert "--seq-len 129 exceeds the context" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]


def test_packed_data_trains_as_raw_resumes_exactly_and_is_refused_when_cut_longer(
        init_dir, sft_file, tokenizer_dir, tmp_path, capsys):
    from matelike.data.packed import pack_chat

    packed = tmp_path / "sft.bin"
    pack_chat(tokenizer_dir, [sft_file], packed, "sft", seq_len=96, progress=False)
    raw_out, packed_out = tmp_path / "raw", tmp_path / "packed"
    assert _sft(init_dir, sft_file, raw_out, "--max-steps", "4") == 0
    assert _sft(init_dir, packed, packed_out, "--max-steps", "4", "--save-every", "2") == 0
    assert _losses(packed_out) == _losses(raw_out)  # the same batches, so the same losses
    assert json.loads((packed_out / "sft_data.json").read_text())["train"]["samples"] == 48
    # Interrupted after 2 steps and resumed: the same losses as the run never interrupted.
    part = tmp_path / "part"
    assert _sft(init_dir, packed, part, "--max-steps", "4", "--save-every", "2") == 0
    import shutil

    shutil.rmtree(part / "checkpoints" / "step-4")
    (part / "metrics.jsonl").write_text("".join(x + "\n" for x in (part / "metrics.jsonl").read_text().splitlines()
                                                if json.loads(x).get("step", 0) <= 2))
    assert _sft(init_dir, packed, part, "--max-steps", "4", "--save-every", "2", "--resume") == 0
    assert _losses(part)[-2:] == _losses(packed_out)[-2:]
    capsys.readouterr()
    assert _sft(init_dir, packed, tmp_path / "short", "--seq-len", "64") == 2
    assert "packed for --seq-len 96, more than this run's 64" in capsys.readouterr().err
    assert _main(["sft", "--init", str(init_dir), "--data", str(packed), str(sft_file), "--out",
                  str(tmp_path / "two"), "--seq-len", "96"]) == 2
    assert "a packed file must be the only file of --data" in capsys.readouterr().err
