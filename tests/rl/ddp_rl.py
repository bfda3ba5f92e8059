"""GRPO or PPO under torchrun for tests/rl/test_grpo.py and test_ppo.py: trains, then every rank saves the trained
module's weights (the policy; under PPO the policy and value model, one PolicyAndValue wrapped by the engine)
to OUT/rank-R.pt, so the test can check the ranks ended identical (their gradients were synchronised).

python -m torch.distributed.run --nproc_per_node=2 tests/rl/ddp_rl.py grpo|ppo INIT PROMPTS OUT BATCH STEPS [ROUNDS]
(ROUNDS: GRPO's dynamic sampling rounds, default 0)
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from matelike.data.records import BadRecordReport
from matelike.model.io import load_model
from matelike.rl import GRPOTask
from matelike.rl.ppo import PolicyAndValue, PPOTask, value_model_from_policy
from matelike.rl.rewards import check_task_record, task_reward
from matelike.rl.rollout import load_prompts
from matelike.train import TrainConfig, Trainer, seed_everything
from matelike.train import distributed as D


def even(prompts, completions, completion_ids, **fields):
    """A dense toy reward: the share of even token ids."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def main(algo: str, init: str, data: str, out: str, batch: str, steps: str, rounds: str = "0") -> int:
    info = D.setup("cpu")
    seed_everything(0)
    model, tok = load_model(init, dtype=torch.float32)
    prompts = load_prompts([data], tok, 96, BadRecordReport(), check_task_record)
    config = TrainConfig(out=Path(out), max_steps=int(steps), batch_size=int(batch), seq_len=128, lr=3e-3,
                         min_lr=3e-3, warmup_steps=0, weight_decay=0.0, dtype="fp32", log_every=1, save_every=1000,
                         progress=False, device="cpu")
    common = dict(decode=tok.decode, stop_ids=tok.stop_ids, pad_id=tok.pad_id, batch_size=int(batch),
                  max_new_tokens=6, seed=0)
    if algo == "ppo":
        trained = PolicyAndValue(model, value_model_from_policy(model))
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        task = PPOTask(trained, prompts, [task_reward, even], group=2, ref_model=ref, kl_coef=0.05,
                       updates_per_rollout=1, **common)
    else:
        trained = model
        task = GRPOTask(model, prompts, [task_reward, even], group=4, scale_rewards="batch", loss_type="grpo",
                        dynamic_sampling=int(rounds), **common)
    Trainer(config, trained, tok, task, export=None).fit()
    torch.save(trained.state_dict(), Path(out) / f"rank-{info.rank}.pt")
    return 0


if __name__ == "__main__":
    try:
        code = main(*sys.argv[1:8])
    finally:
        D.teardown()
    sys.exit(code)
