"""GRPO loss pieces against hand computations: advantages, each loss type, clipping, k3 KL, sampling log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from matelike.model.generation import sample_next
from matelike.rl.losses import STD_EPS, group_advantages, grpo_loss, k3_kl, token_logps
from matelike.sampling import SamplingParams


def test_group_advantages_two_sample_group_by_hand() -> None:
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])  # two groups of two; the second has equal rewards
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    got = group_advantages(r, 2, "group")
    assert got.tolist() == pytest.approx([0.5 / (std + STD_EPS), -0.5 / (std + STD_EPS), 0.0, 0.0])
    assert group_advantages(r, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    batch_std = float(r.std())
    assert group_advantages(r, 2, "batch").tolist() == pytest.approx(
        [0.5 / (batch_std + STD_EPS), -0.5 / (batch_std + STD_EPS), 0.0, 0.0])
    assert group_advantages(r, 2, "batch", batch_std=2.0).tolist() == pytest.approx(
        [0.5 / (2 + STD_EPS), -0.5 / (2 + STD_EPS), 0.0, 0.0])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="scale-rewards"):
        group_advantages(r, 2, "max")


def test_a_greedy_baseline_replaces_the_group_mean_by_hand() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])  # two groups of two
    greedy = torch.tensor([0.0, 1.0])  # the first prompt's greedy answer earned 0, the second's 1
    assert group_advantages(r, 2, "none", baseline=greedy).tolist() == pytest.approx([1.0, 0.0, -1.0, -1.0])
    # the group scale counts the baseline as one more reward: std of (1, 0, 0) and of (0, 0, 1)
    std = float(torch.tensor([1.0, 0.0, 0.0]).std())
    assert group_advantages(r, 2, "group", baseline=greedy).tolist() == pytest.approx(
        [1 / (std + STD_EPS), 0.0, -1 / (std + STD_EPS), -1 / (std + STD_EPS)])
    # positive-only: the samples that beat greedy are reinforced, none pushed down
    assert group_advantages(r, 2, "none", baseline=greedy, positive_only=True).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert group_advantages(r, 2, "none", positive_only=True).tolist() == [0.5, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="3 baselines for 2 groups"):
        group_advantages(r, 2, baseline=torch.zeros(3))


# A two-sample group worked by hand: completion 0 (advantage +1) has two tokens with ratios 1.5 and 0.5,
# completion 1 (advantage -1) one token with ratio 1.1. ε = 0.2, ε_high = 0.28.
# token losses: -min(1.5, 1.28) = -1.28 (clipped above), -min(0.5, 0.8) = -0.5, -min(-1.1, -1.1) = 1.1
OLD = torch.zeros(2, 2)
NEW = torch.log(torch.tensor([[1.5, 0.5], [1.1, 1.0]]))
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[True, True], [True, False]])


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", ((-1.28 - 0.5) / 2 + 1.1) / 2),  # per completion, then over completions
    ("dr_grpo", (-1.28 - 0.5 + 1.1) / (2 * 4)),  # over a constant: 2 completions x max length 4
    ("dapo", (-1.28 - 0.5 + 1.1) / 3),  # over the 3 tokens
])
def test_each_loss_type_by_hand(loss_type: str, expected: float) -> None:
    out = grpo_loss(NEW, OLD, ADV, MASK, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, max_completion_len=4)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clip_fraction == pytest.approx(1 / 3) and out.clip_high == pytest.approx(1 / 3)
    assert out.clip_low == 0.0 and out.kl is None


def test_length_bias_grpo_weighs_short_answers_more_dapo_does_not() -> None:
    # Same advantage on a 1-token and a 3-token answer at ratio 1: the gradient per token.
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, 1.0])
    grads = {}
    for lt in ("grpo", "dapo", "dr_grpo"):
        logps.grad = None
        grpo_loss(logps, logps.detach(), adv, mask, loss_type=lt, max_completion_len=3).loss.backward()
        grads[lt] = logps.grad.clone()
    assert grads["grpo"][0, 0] == pytest.approx(3 * grads["grpo"][1, 0])  # 1/2 vs 1/6
    assert grads["dapo"][0, 0] == pytest.approx(grads["dapo"][1, 0]) == pytest.approx(-0.25)
    assert grads["dr_grpo"][0, 0] == pytest.approx(grads["dr_grpo"][1, 0]) == pytest.approx(-1 / 6)


def test_first_update_ratio_is_exactly_one_and_the_gradient_is_the_policy_gradient() -> None:
    logps = torch.tensor([[-1.3, -0.2], [-2.0, -0.7]], requires_grad=True)
    out = grpo_loss(logps, logps.detach(), ADV, MASK, loss_type="dapo")
    assert out.ratio_mean == 1.0 and out.clip_fraction == 0.0
    out.loss.backward()
    # d/dlogp of -A·exp(logp - old) at logp = old is -A, over 3 tokens
    assert logps.grad.flatten().tolist() == pytest.approx([-1 / 3, -1 / 3, 1 / 3, 0.0])


def test_k3_kl_by_hand_and_added_with_beta() -> None:
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-0.5]])
    assert k3_kl(logp, ref).item() == pytest.approx(math.exp(0.5) - 0.5 - 1)
    assert k3_kl(ref, ref).item() == 0.0
    mask = torch.tensor([[True]])
    out = grpo_loss(logp, logp, torch.tensor([0.0]), mask, beta=0.1, ref_logps=ref)
    assert out.loss.item() == pytest.approx(0.1 * (math.exp(0.5) - 1.5))
    assert out.kl == pytest.approx(math.exp(0.5) - 1.5)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp, torch.tensor([0.0]), mask, beta=0.1)


def _sampled(logits: torch.Tensor, sampling: SamplingParams, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_next's tokens and the probabilities it handed to torch.multinomial."""
    seen: list[torch.Tensor] = []
    real = torch.multinomial

    def spy(probs, n, generator=None):
        seen.append(probs.clone())
        return real(probs, n, generator=generator)

    monkeypatch.setattr(torch, "multinomial", spy)
    tokens = sample_next(logits, sampling=sampling, generator=torch.Generator().manual_seed(1))
    (probs,) = seen
    return tokens, probs


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9), SamplingParams(temperature=1.0),
])
def test_logps_are_those_of_the_distribution_that_sampled(sampling: SamplingParams, monkeypatch) -> None:
    """The probabilities sample_next hands to torch.multinomial are exp of the loss's log-probs."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    tokens, probs = _sampled(logits, sampling, monkeypatch)
    for tok in range(50):
        lp, _ = token_logps(logits, torch.full((3,), tok), temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p)
        inside = probs[:, tok] > 0
        assert torch.allclose(lp[inside].exp(), probs[inside, tok], atol=1e-6)
    lp, ent = token_logps(logits, tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                          top_p=sampling.top_p, with_entropy=True)
    assert torch.allclose(lp.exp(), probs.gather(-1, tokens[:, None]).squeeze(-1), atol=1e-6)
    p = probs.clamp_min(1e-30)
    assert torch.allclose(ent, -(probs * p.log()).sum(-1), atol=1e-4)
    # temperature 1 over the full vocabulary (what peers use) is another distribution
    if sampling.temperature != 1.0:
        plain = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert not torch.allclose(plain, lp, atol=1e-3)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3)])
def test_constrained_logps_are_those_of_the_masked_distribution_that_sampled(sampling: SamplingParams,
                                                                            monkeypatch) -> None:
    """The engine masks the tokens a constraint refuses before sampling (then temperature, top-k): the loss's
    log-probs with the same `allowed` mask are exactly what sample_next drew from."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    allowed = torch.rand(3, 50) < 0.2
    tokens, probs = _sampled(logits.masked_fill(~allowed, float("-inf")), sampling, monkeypatch)
    assert allowed.gather(-1, tokens[:, None]).all() and (probs[~allowed] == 0).all()
    lp, _ = token_logps(logits, tokens, temperature=sampling.temperature, top_k=sampling.top_k, allowed=allowed)
    assert torch.allclose(lp.exp(), probs.gather(-1, tokens[:, None]).squeeze(-1), atol=1e-6)
    free, _ = token_logps(logits, tokens, temperature=sampling.temperature, top_k=sampling.top_k)
    assert (free < lp - 1e-3).all()  # without the mask: another, wider distribution


def test_a_sampled_token_just_outside_top_k_keeps_a_finite_logp() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    lp, _ = token_logps(logits, torch.tensor([3]), top_k=2)
    assert math.isfinite(lp.item())
    lp_in, _ = token_logps(logits, torch.tensor([0]), top_k=2)
    assert lp_in.exp().item() == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(2)))
