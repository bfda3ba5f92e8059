"""What only a GPU can check: the same answers on CUDA as on the CPU. Skipped where no GPU is visible
(`.ci/gpu-check.sh` runs them on a lent GPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matelike.model.generation import generate
from matelike.model.transformer import Transformer, get_preset
from matelike.sampling import GREEDY
from matelike.train.losses import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  hidden_dim=128, max_seq_len=64, tie_embeddings=False, init_std=0.1)).eval()


def test_forward_and_greedy_generation_match_the_cpu() -> None:
    cpu = _model()
    gpu = _model().cuda()
    x = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).logits.cpu(), cpu(x).logits, rtol=1e-3, atol=1e-3)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert generate(gpu, prompts, max_new_tokens=12, sampling=GREEDY) == generate(cpu, prompts, max_new_tokens=12,
                                                                                   sampling=GREEDY)


def test_chunked_loss_matches_cross_entropy_on_cuda_in_bf16() -> None:
    torch.manual_seed(0)
    h = torch.randn(500, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(6400, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 6400, (500,), device="cuda")
    ours = linear_cross_entropy(h, w, t)
    ref = F.cross_entropy((h.float() @ w.t()), t)
    torch.testing.assert_close(ours.float(), ref, rtol=2e-2, atol=2e-2)
    ours.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_auto_picks_the_gpu_and_bf16() -> None:
    from matelike.device import resolve_device, training_dtype

    dev = resolve_device("auto")
    assert dev.type == "cuda"
    assert training_dtype("auto", dev) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
