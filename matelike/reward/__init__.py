"""Reward models: a Bradley-Terry scorer of answers trained from preference pairs (`matelike reward train`).

- `matelike.reward.model`: `RewardModel` (our Transformer with a scalar head on the last real token), its
  directory in transformers' `LlamaForSequenceClassification` layout (`save_reward_model`, `load_reward_model`)
  and `score(model, tokenizer, prompts, completions)` for batch scoring (PPO, reward functions).
- `matelike.reward.train`: the stage as a Task of the one training engine, and its command line.

Nothing here imports torch at import time: the command line imports this package to list its flags.
"""
