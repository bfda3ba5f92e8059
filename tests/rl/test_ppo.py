"""PPO: GAE, the clipped value loss and the per-token rewards against hand computations, the first epoch's ratio,
learning a toy reward, the command line (errors, exact resume, the saved policy) and DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matelike.rl.losses import clipped_value_loss, gae, ppo_token_rewards
from matelike.rl.ppo import PolicyAndValue, PPOTask, value_model_from_policy

from rl_common import TASK_RECORDS, chat_model as _model, read_metrics as _metrics, task_prompts as _prompts
from rl_common import write_jsonl as _write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVEN_REWARD = """
def even(prompts, completions, completion_ids, **fields):
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
"""

X = 9.0  # a value outside the mask: must not matter


def test_gae_by_hand_with_rows_of_different_lengths() -> None:
    # row 0: completion in columns 1-3; row 1: columns 2-4 (prompts and padding around them)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    rewards = torch.tensor([[X, 1.0, 2.0, 3.0, X], [X, X, 0.0, 0.0, 1.0]])
    values = torch.tensor([[X, 0.5, 1.0, 1.5, X], [X, X, 0.2, 0.4, 0.6]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, backwards (γλ = 0.72): δ3 = 3 - 1.5 = 1.5; δ2 = 2 + 0.9·1.5 - 1 = 2.35; δ1 = 1 + 0.9·1 - 0.5 = 1.4
    a3 = 1.5
    a2 = 2.35 + 0.72 * a3  # 3.43
    a1 = 1.4 + 0.72 * a2  # 3.8696
    # row 1: δ4 = 1 - 0.6 = 0.4; δ3 = 0.9·0.6 - 0.4 = 0.14; δ2 = 0.9·0.4 - 0.2 = 0.16
    b4 = 0.4
    b3 = 0.14 + 0.72 * b4  # 0.428
    b2 = 0.16 + 0.72 * b3  # 0.46816
    expected = torch.tensor([[0, a1, a2, a3, 0], [0, 0, b2, b3, b4]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)
    assert ret[0, 1].item() == pytest.approx(3.8696 + 0.5)
    # γ = λ = 1: the advantage is the sum of the rewards to come minus the value (Monte Carlo)
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv1[0, 1:4].tolist() == pytest.approx([6 - 0.5, 5 - 1.0, 3 - 1.5])


def test_clipped_value_loss_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 0.0, X]])
    old = torch.tensor([[0.5, 2.1, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    res = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped 0, clipped to 0.7: 0.09 (the larger wins); token 1: 1.0 both (inside the clip);
    # token 2: unclipped 0, clipped to 0.3: 0.09; token 3 is masked
    assert res.loss.item() == pytest.approx(0.5 * (0.09 + 1.0 + 0.09) / 3)
    assert res.clip_fraction == pytest.approx(2 / 3)
    values.requires_grad_(True)
    clipped_value_loss(values, old, returns, mask, clip=0.2).loss.backward()
    # where the clipped loss won, the prediction gets no gradient (it is outside the trust region)
    assert values.grad[0, 0] == 0 and values.grad[0, 2] == 0 and values.grad[0, 1] != 0 and values.grad[0, 3] == 0


def test_kl_is_folded_into_the_per_token_rewards_and_the_score_sits_on_the_last_token() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[X, -1.5, -1.0, X], [X, -1.0, -1.0, -3.0], [X, X, X, X]])
    scores = torch.tensor([2.0, -1.0, 5.0])
    rewards, kl = ppo_token_rewards(scores, logps, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, -1.0], row 1 [0, 0, 2]; each row's score on its last trained token (row 0's
    # stop token at column 2, row 1's at column 3); row 2 trains nothing and gets nothing
    torch.testing.assert_close(kl, torch.tensor([[0, 0.5, -1.0, 0], [0, 0, 0, 2.0], [0, 0, 0, 0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0, -0.05, 0.1 + 2.0, 0], [0, 0, 0, -0.2 - 1.0],
                                                      [0, 0, 0, 0]]))
    no_ref, kl0 = ppo_token_rewards(scores, logps, None, mask, kl_coef=0.0)
    assert kl0.abs().sum() == 0 and no_ref[0, 2] == 2.0 and no_ref.sum() == 1.0




def _ppo_task(model, tok, reward, **kw) -> tuple[PPOTask, PolicyAndValue]:
    import copy

    pv = PolicyAndValue(model, value_model_from_policy(model))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    args = dict(decode=tok.decode, stop_ids=tok.stop_ids, pad_id=tok.pad_id, batch_size=2, group=2,
                max_new_tokens=6, seed=5, ref_model=ref, kl_coef=0.05)
    args.update(kw)
    return PPOTask(pv, _prompts(tok), [reward], **args), pv


def test_first_epoch_ratio_is_exactly_one_and_advantages_are_whitened(make_chat_model) -> None:
    model, tok = _model(make_chat_model)
    reward = lambda prompts, completions, **kw: [float(len(c) % 3) for c in completions]  # noqa: E731
    task, pv = _ppo_task(model, tok, reward, updates_per_rollout=2, temperature=0.8, top_k=50)
    it = task.batches(0, 1, None)
    first, cur1 = next(it)
    second, _ = next(it)
    assert first["first_update"] and not second["first_update"] and cur1["saved"] is not None
    mask = first["targets"] != -100
    adv = first["advantages"][mask]
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-5) and adv.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (first["advantages"][~mask] == 0).all() and (first["returns"][~mask] == 0).all()
    assert (first["values"] == 0).all()  # the value head starts at zero: a neutral baseline
    loss, metrics, n = task.loss(pv, first)
    assert metrics["ratio"] == 1.0 and metrics["clip_fraction"] == 0.0 and n == int(mask.sum())
    loss.backward()
    assert pv.value.score.weight.grad is not None and pv.value.score.weight.grad.abs().sum() > 0
    for key in ("kl", "non_score_reward", "rlhf_reward", "value_loss", "pg_loss", "value_clip_fraction"):
        assert key in metrics, key
    assert "zero_std_groups" in metrics  # group 2 here; with one completion per prompt it is left out
    # same weights on the second epoch: the stored log-probs are the loss's own, so the ratio stays ~1
    _, metrics2, _ = task.loss(pv, second)
    assert metrics2["ratio"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="--kl-coef"):
        _ppo_task(model, tok, reward, beta=0.1)
    with pytest.raises(ValueError, match="reference model"):
        _ppo_task(model, tok, reward, ref_model=None)


def test_a_toy_reward_rises_within_a_few_steps(make_chat_model, tmp_path: Path) -> None:
    """Reward: the share of completion tokens with an even id. PPO on it must raise the mean reward."""
    from matelike.train import TrainConfig, Trainer

    model, tok = _model(make_chat_model)

    def even(prompts, completions, completion_ids, **kw):
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    # one completion per prompt would do too; eight per rollout step give the sparse score more samples
    task, pv = _ppo_task(model, tok, even, stop_ids=(), batch_size=4, group=8, max_new_tokens=8, seed=1,
                         updates_per_rollout=1)
    config = TrainConfig(out=tmp_path / "toy", max_steps=16, batch_size=4, seq_len=128, lr=1e-2, min_lr=1e-2,
                         warmup_steps=0, weight_decay=0.0, dtype="fp32", log_every=1, save_every=1000,
                         progress=False, device="cpu")
    Trainer(config, pv, tok, task, export=None).fit()
    lines = [json.loads(x) for x in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in lines]
    assert len(rewards) == 16
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert lines[-1]["value_mean"] > 0.1  # the value model learnt the (positive) returns from its zero start


# ---- command line -------------------------------------------------------------------------------------------

def _reward_model_dir(init: Path, out: Path, tokenizer_from: Path | None = None) -> Path:
    """A reward model directory on the chat model's weights with a new head (what `reward train` writes)."""
    from matelike.model.io import load_model
    from matelike.reward.model import RewardModel, save_reward_model

    torch.manual_seed(0)
    backbone, tok = load_model(init)
    rm = RewardModel(backbone.config, backbone=backbone)
    torch.nn.init.normal_(rm.score.weight, 0.0, 0.5)
    return save_reward_model(rm, tok, out)



def _run_args(init: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["rl", "--init", str(init), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "6", "--lr", "1e-3", "--min-lr", "1e-3", "--log-every", "1", "--dtype", "fp32",
            "--no-progress", "--device", "cpu", *extra]


def _ppo_args(init: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return _run_args(init, data, out, "--algo", "ppo", *extra)



def test_command_line_errors_are_one_line(make_chat_model, tmp_path: Path, capsys) -> None:
    from matelike.cli import main

    init = make_chat_model(max_seq_len=128)
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS)
    rm = _reward_model_dir(init, tmp_path / "rm")
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    for f in rm.iterdir():
        (garbled / f.name).write_bytes(f.read_bytes())
    (garbled / "config.json").write_text("{not json", encoding="utf-8")
    other_tok = tmp_path / "other-tok"
    other_tok.mkdir()
    for f in rm.iterdir():
        (other_tok / f.name).write_bytes(f.read_bytes())
    spec = json.loads((other_tok / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # same vocabulary size, other tokenizer
    (other_tok / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    cases = [
        ((), "--algo ppo needs a reward: --reward-model DIR"),
        (("--reward-model", str(tmp_path / "missing")), "--reward-model: "),
        (("--reward-model", str(garbled)), "config.json"),
        (("--reward-model", str(init)), "--reward-model: "),  # a causal LM directory has no score head
        (("--reward-model", str(other_tok)), "has another tokenizer than --init"),
        (("--reward", "task", "--value-init", "reward"), "--value-init reward needs --reward-model"),
        (("--reward", "task", "--beta", "0.1"), "use --kl-coef"),
        (("--reward", "task", "--dynamic-sampling", "2"), "--dynamic-sampling is GRPO's"),
        (("--reward", "task", "--constrained"), "--constrained is GRPO's"),
    ]
    for extra, msg in cases:
        assert main(_ppo_args(init, data, tmp_path / "out", "--max-steps", "1", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (extra, err)
    assert main(_run_args(init, data, tmp_path / "out", "--max-steps", "1", "--kl-coef", "0.1")) == 2
    assert "--kl-coef only apply to --algo ppo" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_grpo_takes_the_reward_model_as_one_more_reward(make_chat_model, tmp_path: Path) -> None:
    from matelike.cli import main

    init = make_chat_model(max_seq_len=128)
    rm = _reward_model_dir(init, tmp_path / "rm")
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS)
    out = tmp_path / "out"
    assert main(_run_args(init, data, out, "--max-steps", "1", "--group", "2", "--reward-model", str(rm),
                          "--reward", "task", "--reward-weights", "0.5")) == 0
    (line,) = _metrics(out)
    assert "reward_fn_reward_model" in line and "reward_fn_task" in line and "value_loss" not in line
    # the total is the reward model's score (weight 1) plus half the task reward
    assert line["reward"] == pytest.approx(line["reward_fn_reward_model"] + 0.5 * line["reward_fn_task"], abs=1e-6)


@pytest.mark.slow
def test_resume_continues_exactly_and_saves_the_policy_alone(make_chat_model, tmp_path: Path, monkeypatch) -> None:
    """Interrupted between two PPO epochs of a rollout (the cursor holds the rollout, values and advantages) and
    resumed: the same losses, rewards and value losses as the run that was not interrupted (bitwise in fp32 on
    CPU). The reward model's score and two verifiable rewards are summed; the value model starts from the
    reward model. The model directory is the policy alone; the checkpoint holds the value model too."""
    from safetensors import safe_open

    from matelike.cli import main
    from matelike.model.io import load_model

    (tmp_path / "rl_test_rewards.py").write_text(EVEN_REWARD, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    init = make_chat_model(max_seq_len=128)
    rm = _reward_model_dir(init, tmp_path / "rm")
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS * 2)
    extra = ("--reward-model", str(rm), "--ppo-epochs", "2", "--save-every", "1", "--temperature", "0.9",
             "--top-k", "100", "--reward", "task", "rl_test_rewards:even", "--reward-weights", "1", "2",
             "--group", "2", "--kl-coef", "0.1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_ppo_args(init, data, whole, "--max-steps", "5", *extra)) == 0
    assert main(_ppo_args(init, data, split, "--max-steps", "3", *extra)) == 0
    assert main(_ppo_args(init, data, split, "--max-steps", "5", "--resume", *extra)) == 0
    a, b = _metrics(whole), _metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "reward", "kl", "value_loss", "pg_loss", "ratio", "entropy", "reward_fn_reward_model"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert a[0]["ratio"] == 1.0 and a[1]["ratio"] != 1.0
    assert "reward_fn_task" in a[0] and "reward_fn_even" in a[0] and a[0]["kl"] == 0.0  # the policy is the ref
    with safe_open(str(whole / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "score.weight" not in names and not any(n.startswith(("policy.", "value.")) for n in names)
    policy, _ = load_model(whole)
    state = torch.load(sorted((whole / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=True)
    assert {f"policy.{k}" for k in policy.state_dict()} <= set(state["model"])
    assert "value.score.weight" in state["model"]  # resume restores the value model and its optimiser state
    config = json.loads((whole / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(make_chat_model, tmp_path: Path) -> None:
    """gloo DDP, one prompt per rank against one process with both prompts: policy and value model end
    identical on both ranks (both are trained through the one wrapped module) and close to one process's."""
    import os
    import subprocess
    import sys

    init = make_chat_model(max_seq_len=128)
    data = _write_jsonl(tmp_path / "p.jsonl", TASK_RECORDS)
    script = str(Path(__file__).with_name("ddp_rl.py"))
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher_vars}, "OMP_NUM_THREADS": "1"}

    def run(nproc: int, batch: int, out: Path) -> list[dict]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, "ppo",
               str(init), str(data), str(out), str(batch), "3"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _metrics(out)

    one, two = run(1, 2, tmp_path / "one"), run(2, 1, tmp_path / "two")
    w0, w1 = torch.load(tmp_path / "two" / "rank-0.pt"), torch.load(tmp_path / "two" / "rank-1.pt")
    assert any(k.startswith("value.") for k in w0)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    single = torch.load(tmp_path / "one" / "rank-0.pt")
    assert all(torch.allclose(w0[k], single[k], atol=1e-4) for k in w0)
    for key in ("reward", "loss", "value_loss"):
        assert [m[key] for m in one] == pytest.approx([m[key] for m in two], abs=1e-5), key
