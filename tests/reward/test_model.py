"""The reward model: rewards read at the last real token, the transformers export, loading back, batch scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matelike.model.io import ModelDirError, load_model, save_model
from matelike.model.transformer import ModelConfig, Transformer
from matelike.reward.model import (
    HEAD,
    RewardModel,
    chat_tail,
    load_reward_model,
    pad_rows,
    render_rows,
    reward_function,
    save_reward_model,
    score,
)

PROMPTS = ["判断评论情感：质量很好，物流也快。", "你好", [{"role": "system", "content": "你是助手。"},
                                              {"role": "user", "content": "北京是哪里？"}]]
COMPLETIONS = ["正面", "你好！我们一起去公园散步吧。", [{"role": "assistant", "content": "北京是中国的首都。"}]]


def tiny_reward_model(tokenizer, seed: int = 0, **kw) -> RewardModel:
    torch.manual_seed(seed)
    base = dict(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                max_seq_len=128, init_std=0.1)
    base.update(kw)
    model = RewardModel(ModelConfig(**base))
    torch.nn.init.normal_(model.score.weight, 0.0, 0.5)  # rewards far enough apart to compare
    return model.eval()


def test_untied_backbone_is_retied_and_its_lm_head_dropped(tokenizer) -> None:
    torch.manual_seed(0)
    backbone = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                       hidden_dim=48, tie_embeddings=False))
    model = RewardModel(backbone.config, backbone=backbone)
    assert model.model is backbone and model.config.tie_embeddings
    assert backbone.lm_head.weight is backbone.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "model.lm_head.weight" not in names and names[-1] == "score.weight"
    assert model.score.weight.shape == (1, 32) and model.score.bias is None


def test_reward_is_read_at_the_last_real_token(tokenizer) -> None:
    model = tiny_reward_model(tokenizer)
    rows = render_rows(tokenizer, PROMPTS, COMPLETIONS)
    assert all(r[-len(chat_tail(tokenizer)) - 1] == tokenizer.im_end_id for r in rows)
    ids, last = pad_rows(rows, tokenizer.pad_id)
    with torch.no_grad():
        batched = model(ids, last).rewards
        alone = [model(*pad_rows([r], tokenizer.pad_id)).rewards.item() for r in rows]
        # what follows the last real token (padding, or anything else) never changes the reward
        junk = ids.clone()
        for i, n in enumerate(last.tolist()):
            junk[i, n + 1:] = 7
        assert torch.equal(model(junk, last).rewards, batched)
        # and the reward is the head on the final-norm state there
        hidden = model.model(ids, hidden_only=True).hidden
        by_hand = hidden[torch.arange(len(rows)), last] @ model.score.weight[0]
    assert batched.tolist() == pytest.approx(alone, abs=1e-5)
    torch.testing.assert_close(batched, by_hand)
    assert len(set(round(x, 4) for x in alone)) == len(rows)  # distinct texts, distinct rewards


def test_score_keeps_order_whatever_the_batch_size(tokenizer) -> None:
    model = tiny_reward_model(tokenizer).train()
    one = score(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=1)
    many = score(model, tokenizer, PROMPTS * 2, COMPLETIONS * 2, batch_size=4)
    assert model.training  # scoring leaves the caller's mode alone
    assert many == pytest.approx(one * 2, abs=1e-5)
    rows = render_rows(tokenizer, PROMPTS, COMPLETIONS)
    # a string is one user (prompt) or assistant (completion) turn of the chat template
    assert rows[0] == tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]},
                                             {"role": "assistant", "content": COMPLETIONS[0]}])[0]
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        score(model, tokenizer, PROMPTS, COMPLETIONS[:2])


MOE = {"n_experts": 4, "n_experts_per_tok": 2}
ARCHS = {
    "dense": ({}, "LlamaForSequenceClassification"),
    "untied": ({"tie_embeddings": False}, "LlamaForSequenceClassification"),
    "moe": (MOE, "MixtralForSequenceClassification"),
    "moe-shared": ({**MOE, "shared_expert": True}, "Qwen2MoeForSequenceClassification"),
}


@pytest.mark.parametrize("kind", ARCHS)
def test_transformers_sequence_classification_gives_our_scores(tmp_path: Path, tokenizer, kind: str) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kw, arch = ARCHS[kind]
    model = tiny_reward_model(tokenizer, **kw)
    save_reward_model(model, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [arch] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == tokenizer.pad_id

    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch and hf.config.num_labels == 1
    chats = [([{"role": "user", "content": p}] if isinstance(p, str) else p)
             + ([{"role": "assistant", "content": c}] if isinstance(c, str) else c)
             for p, c in zip(PROMPTS, COMPLETIONS)]
    # the rows we score are what the saved tokenizer's chat template gives transformers
    hf_rows = [hf_tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] for chat in chats]
    assert hf_rows == render_rows(tokenizer, PROMPTS, COMPLETIONS)

    ours = score(model, tokenizer, PROMPTS, COMPLETIONS)
    batch = hf_tok.pad({"input_ids": hf_rows}, return_tensors="pt")  # right padding with pad_token_id
    with torch.no_grad():
        theirs = hf(**batch).logits
    assert theirs.shape == (3, 1)
    assert theirs[:, 0].tolist() == pytest.approx(ours, abs=1e-4)


def test_load_reward_model_round_trip_and_errors(tmp_path: Path, tokenizer) -> None:
    model = tiny_reward_model(tokenizer)
    save_reward_model(model, tokenizer, tmp_path / "rm")
    loaded, tok = load_reward_model(tmp_path / "rm")
    assert tok is not None and tok.sha256 == tokenizer.sha256
    assert torch.equal(loaded.score.weight, model.score.weight)
    assert score(loaded, tok, PROMPTS, COMPLETIONS) == score(model, tokenizer, PROMPTS, COMPLETIONS)
    fn = reward_function(tmp_path / "rm", device="cpu")  # TRL's reward_funcs signature
    assert fn(PROMPTS, COMPLETIONS, task=["x"] * 3) == pytest.approx(score(model, tokenizer, PROMPTS, COMPLETIONS))

    # a causal LM directory is not a reward model, and a reward model is not a causal LM
    save_model(model.model, tokenizer, tmp_path / "lm")
    with pytest.raises(ModelDirError, match=f"missing tensor {HEAD}"):
        load_reward_model(tmp_path / "lm")
    with pytest.raises(ModelDirError, match="unexpected tensors.*score.weight"):
        load_model(tmp_path / "rm")
    # a head with two labels is refused by name
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "rm" / "model.safetensors")
    tensors[HEAD] = torch.zeros(2, 32)
    save_file(tensors, tmp_path / "rm" / "model.safetensors")
    with pytest.raises(ModelDirError, match=r"score.weight has shape \[2, 32\]"):
        load_reward_model(tmp_path / "rm")
