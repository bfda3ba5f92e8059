"""Model directories: round trip, transformers reads ours with the same logits and greedy tokens, we read theirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matelike.model.generation import generate
from matelike.model.io import ModelDirError, load_model, save_model
from matelike.model.transformer import ModelConfig, Transformer
from matelike.sampling import GREEDY

VOCAB = 101

KINDS = {
    "dense": ({}, "LlamaForCausalLM"),
    "untied": ({"tie_embeddings": False}, "LlamaForCausalLM"),
    "moe": ({"n_experts": 4, "n_experts_per_tok": 2}, "MixtralForCausalLM"),
    "moe-shared": ({"n_experts": 4, "n_experts_per_tok": 2, "shared_expert": True}, "Qwen2MoeForCausalLM"),
}


def make(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                rope_theta=5000.0, init_std=0.1)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_transformers_logits_match(kind: str, tmp_path: Path) -> None:
    kw, arch = KINDS[kind]
    model = make(**kw)
    save_model(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").is_file()
    loaded, tok = load_model(tmp_path)
    assert tok is None and loaded.config == model.config
    x = torch.randint(0, VOCAB, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0
    hf = hf_model(tmp_path)
    assert type(hf).__name__ == arch
    with torch.no_grad():
        ours = model(x).logits
        assert torch.equal(loaded(x).logits, ours)
        assert (hf(x).logits - ours).abs().max().item() <= 1e-4
        ours_m = model(x, attention_mask=mask).logits
        theirs_m = hf(x, attention_mask=mask).logits
    real = mask.bool()
    assert (ours_m[real] - theirs_m[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_transformers_greedy_generate_equals_ours(kind: str, tmp_path: Path) -> None:
    model = make(**KINDS[kind][0])
    save_model(model, None, tmp_path)
    hf = hf_model(tmp_path)
    prompts = [[5, 9, 2, 44, 17, 3], [60, 61, 62]]
    ours = generate(model, prompts, max_new_tokens=12, sampling=GREEDY)
    for p, o in zip(prompts, ours):
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out[0, len(p) :].tolist() == o
    # and a left-padded batch through transformers gives the same tokens as our batch
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out[:, 6:].tolist() == ours


def test_reads_a_llama_directory_written_by_transformers(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, rope_theta=500.0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.n_kv_heads == 1 and model.config.rope_theta == 500.0
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_load_casts_dtype_and_save_keeps_it(tmp_path: Path) -> None:
    model = make()
    save_model(model, None, tmp_path / "a")
    half, _ = load_model(tmp_path / "a", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.lm_head.weight is half.embed.weight
    save_model(half, None, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again, _ = load_model(tmp_path / "b")
    assert again.embed.weight.dtype == torch.bfloat16


def test_saves_tokenizer_and_generation_config(tmp_path: Path, tokenizer) -> None:
    model = make(vocab_size=tokenizer.vocab_size)
    save_model(model, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == tokenizer.eos_id
    assert set(gen["eos_token_id"]) == {tokenizer.eos_id, tokenizer.im_end_id}
    _, tok = load_model(tmp_path)
    assert tok is not None and tok.encode("你好") == tokenizer.encode("你好")


def test_refuses_pickle_and_names_the_problem(tmp_path: Path) -> None:
    model = make()
    save_model(model, None, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match="pickle"):
        load_model(tmp_path)


def test_missing_tensor_truncated_file_and_bad_config_are_clear_errors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_model(make(), None, tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(ModelDirError, match="k_proj"):
        load_model(tmp_path)
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(ModelDirError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelDirError, match="config.json.*gpt2"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelDirError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_save_leaves_other_files_alone_and_overwrites_itself(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    save_model(make(seed=1), None, tmp_path)
    save_model(make(seed=2), None, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.embed.weight, make(seed=2).embed.weight)


def test_truncated_data_and_wrong_shapes_are_clear_errors(tmp_path: Path) -> None:
    save_model(make(), None, tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # header intact, the last tensor cut short
    with pytest.raises(ModelDirError, match="truncated"):
        load_model(tmp_path / "a")
    save_model(make(hidden_dim=40), None, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["intermediate_size"] = 48  # config disagrees with the stored tensors
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="gate_proj.*shape"):
        load_model(tmp_path / "b")


def test_fp16_file_loads_into_fp32(tmp_path: Path) -> None:
    model = make().to(torch.float16)
    save_model(model, None, tmp_path)
    loaded, _ = load_model(tmp_path, dtype=torch.float32)
    assert loaded.embed.weight.dtype == torch.float32
    assert torch.equal(loaded.embed.weight, model.embed.weight.float())


@pytest.mark.parametrize("kind", ["dense", "moe-shared"])
def test_loading_allocates_only_the_weights(kind: str, tmp_path: Path) -> None:
    """Loading builds on the meta device without running torch's Python meta kernels (their first use imports
    some 800 modules, sympy among them: about 66 MB resident), and gives CPU parameters with the tie intact."""
    import subprocess
    import sys

    save_model(make(**KINDS[kind][0]), None, tmp_path / "m")
    code = (
        "import sys, torch; from matelike.model.io import load_model; "
        f"m, _ = load_model({str(tmp_path / 'm')!r}, dtype=torch.float16); "
        "print(sorted({p.device.type for p in m.parameters()} | {b.device.type for b in m.buffers()}), "
        "sorted({str(p.dtype) for p in m.parameters()}), m.lm_head.weight is m.embed.weight, "
        "'sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["['cpu']", "['torch.float16']", "True", "False"]
