"""Weight-only int8 (`--quantize int8`): the rounding bound, both matrix paths, batch invariance, what stays."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from matelike.cli import main
from matelike.model.generation import generate, stream_generate
from matelike.model.io import load_model
from matelike.model.quantize import KERNEL_MAX_ROWS, Int8Linear, apply_quantize, quantize_int8
from matelike.model.transformer import ModelConfig, Transformer
from matelike.sampling import GREEDY


def make(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                init_std=0.2)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


def test_each_weight_is_within_half_a_step_of_its_row_scale() -> None:
    torch.manual_seed(1)
    w = torch.randn(4000, 24) * torch.logspace(-3, 1, 4000)[:, None]  # rows of very different sizes
    w[7] = 0.0  # an all-zero row must not divide by zero
    q = Int8Linear(w)
    assert q.weight.dtype == torch.int8 and q.scale.dtype == torch.bfloat16 and q.weight.abs().max() <= 127
    error = (q.dequantized(torch.float32) - w).abs()
    step = q.scale.float()[:, None]
    assert torch.all(error <= step / 2 * (1 + 1e-6)), (error / step).max()
    assert torch.all(q.dequantized(torch.float32)[7] == 0)
    # The largest weight of each row lands on (about) +-127 steps: the row's range is used.
    assert (q.weight.abs().amax(1)[w.abs().amax(1) > 0] >= 126).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_dequantized_paths_compute_the_same_product(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    w = torch.randn(64, 32)
    q = Int8Linear(w)
    x = torch.randn(3, 1, 32, dtype=dtype)  # a decode step of 3 rows: the int8 kernel
    want = F.linear(x.float(), q.dequantized(torch.float32))
    got = q(x)
    assert got.dtype == dtype and got.shape == (3, 1, 64)
    assert torch.allclose(got.float(), want, rtol=0.02, atol=0.02 * want.abs().max().item())
    long = torch.randn(1, KERNEL_MAX_ROWS + 1, 32, dtype=dtype)  # a long prefill chunk: dequantized weight
    want = F.linear(long.float(), q.dequantized(torch.float32))
    assert torch.allclose(q(long).float(), want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_quantize_replaces_linear_layers_but_keeps_embedding_router_and_tied_weights() -> None:
    model = make(n_experts=4, shared_expert=True)
    embed_before = model.embed.weight.detach().clone()
    quantize_int8(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["lm_head"] == "Int8Linear" and kinds["layers.0.attn.wqkv"] == "Int8Linear"
    assert kinds["layers.0.mlp.shared.w_down"] == "Int8Linear"
    assert kinds["layers.0.mlp.router"] == "Linear" and kinds["layers.0.mlp.shared_gate"] == "Linear"
    assert torch.equal(model.embed.weight, embed_before) and model.embed.weight.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.int8 for m in model.modules())
    assert not model.training
    with pytest.raises(ValueError, match="--quantize 'int4'"):
        apply_quantize(make(), "int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_logits_stay_close_to_the_model_they_come_from(dtype: torch.dtype) -> None:
    model = make().to(dtype)
    quantized = quantize_int8(copy.deepcopy(model))
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        want, got = model(x).logits.float(), quantized(x).logits.float()
    assert got.dtype == torch.float32 or dtype == torch.bfloat16
    assert (got - want).norm() / want.norm() < 0.03


def test_a_quantized_greedy_answer_is_the_same_alone_and_batched() -> None:
    # The int8 kernel computes each row on its own, and the path depends on the call's own shape only.
    model = quantize_int8(make())
    prompts = [[5, 17, 33, 2, 8, 61, 40, 12, 9, 3, 70], [8, 9], [79, 32, 38, 46], [1], [44, 45, 46, 47, 48]]
    alone = [generate(model, [p], max_new_tokens=9, sampling=GREEDY)[0] for p in prompts]
    for max_batch in (2, len(prompts)):
        assert generate(model, prompts, max_new_tokens=9, sampling=GREEDY, max_batch=max_batch) == alone


def test_generate_command_answers_with_the_quantized_model(make_chat_model, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = make_chat_model()
    model, tokenizer = load_model(model_dir, dtype="auto", quantize="int8")  # as the command loads it
    assert isinstance(model.lm_head, Int8Linear)
    ids = tokenizer.encode_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)[0]
    want = "".join(stream_generate(model, tokenizer, ids, max_new_tokens=6, sampling=GREEDY))
    args = ["generate", "--model", str(model_dir), "--prompt", "你好", "--chat", "--max-new-tokens", "6",
            "--top-k", "1"]
    assert main(args + ["--quantize", "int8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--quantize", "int4"])
    assert exit_.value.code == 2 and "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
