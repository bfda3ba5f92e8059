"""The reward model: our Transformer with a scalar head, stored as a transformers SequenceClassification directory.

What it scores. A row is the chat template's rendering of prompt + answer, exactly `Tokenizer.encode_chat`
of those messages (so it ends with the answer's `<|im_end|>` and the template's newline after it), and the
reward is the head applied to the final-norm hidden state of the row's last token. That is the token
transformers' `LlamaForSequenceClassification` reads (the last one that is not `pad_token_id`) when it gets
`tokenizer.apply_chat_template(messages, tokenize=True)`, and what TRL's RewardTrainer scores, so the saved
directory gives the same numbers there as here.

The directory. `model.*` tensors are the backbone under Hugging Face names (written by
matelike.model.io.save_model), `score.weight` (1, dim) the head, config.json the causal model's with
`architectures` `LlamaForSequenceClassification` (Mixtral/Qwen2-MoE likewise for MoE backbones), `num_labels`
1 and `pad_token_id` the tokenizer's pad (`<|endoftext|>`, which the template never emits inside a row).
There is no LM head: the backbone is built with tied embeddings, so its unused output projection is the
embedding itself (no memory, and no parameter outside the graph, which DDP would refuse).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from matelike.model.transformer import ModelConfig, Transformer

if TYPE_CHECKING:
    from matelike.data.preference import PreferencePairs
    from matelike.tokenizer import Tokenizer

HEAD = "score.weight"
# A prompt or completion: plain text (a user turn / an assistant turn) or chat messages, as in TRL's columns.
Turns = str | Sequence[dict[str, str]]


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # (B,) one scalar per row, in the head's dtype
    aux_loss: torch.Tensor | None = None  # MoE load balancing of the backbone; None for dense models


class RewardModel(nn.Module):
    """Backbone `model` (a Transformer) and `score`, Linear(dim, 1) without bias, named as transformers names
    LlamaForSequenceClassification.

    `backbone`: wrap an existing Transformer (its parameters, not a copy); an untied one is re-tied, which frees
    its LM head. Without it a new backbone is built from `config` (on `device`, or the meta device for loading).
    """

    def __init__(self, config: ModelConfig, device: Any = None, dtype: torch.dtype | None = None,
                 backbone: Transformer | None = None) -> None:
        super().__init__()
        if backbone is None:
            backbone = Transformer(replace(config, tie_embeddings=True), device, dtype)
        elif not backbone.config.tie_embeddings:
            backbone.config = replace(backbone.config, tie_embeddings=True)
            backbone.tie_weights()
        self.model = backbone
        self.config = backbone.config
        w = backbone.embed.weight
        self.score = nn.Linear(self.config.dim, 1, bias=False, device=w.device, dtype=w.dtype)
        if not w.is_meta:  # meta: built for loading, every weight is assigned afterwards
            nn.init.normal_(self.score.weight, 0.0, self.config.init_std)  # transformers' init for this head

    def reset_rope(self) -> None:
        """Recompute the RoPE table (the engine calls this after loading a meta-built copy)."""
        self.model.reset_rope()

    def flops_per_token(self, seq_len: int) -> float:
        """The backbone's training FLOPs without the vocabulary projection it never runs (for MFU)."""
        return self.model.flops_per_token(seq_len) - 6.0 * self.model.lm_head.weight.numel()

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> RewardOutput:
        """Rewards of the rows of `input_ids` (B, T), each read at its position `last_index` (B,).

        Rows are right-padded: under the causal mask the padding after a row's last token never changes it.
        """
        out = self.model(input_ids, hidden_only=True)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = out.hidden[rows, last_index.to(input_ids.device)]
        # sum over the single label: the same value as squeeze(-1) in a new tensor, not a view of the head's
        # output (FSDP2 warns that in-place ops on a returned view would skip its backward hook)
        return RewardOutput(self.score(last).sum(-1), out.aux_loss)


# ---- rows and batches --------------------------------------------------------------------------------------

def chat_tail(tokenizer: "Tokenizer") -> list[int]:
    """The ids the chat template puts after a turn's `<|im_end|>` (a newline), which rendered pairs stop before."""
    ids, _ = tokenizer.encode_chat([{"role": "assistant", "content": ""}])
    return ids[ids.index(tokenizer.im_end_id) + 1:]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) right-padded ids and each row's last real position (B,)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return torch.from_numpy(ids), torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)


def collate_reward_pairs(pairs: "PreferencePairs", indices: list[int], pad_id: int, tail: Sequence[int]) -> dict:
    """One batch of B pairs: 2B rows (chosen rows first), each a rendered side plus the template's `tail`."""
    tail_arr = np.asarray(tail, dtype=np.int64)
    rows = [np.concatenate([side.sample(i)[0], tail_arr]) for side in (pairs.chosen, pairs.rejected)
            for i in indices]
    input_ids, last_index = pad_rows(rows, pad_id)
    real = int(sum(len(r) for r in rows))
    return {
        "input_ids": input_ids,
        "last_index": last_index,
        "index": torch.tensor(indices, dtype=torch.long),
        "real_tokens": real,
        "padding_fraction": 1.0 - real / float(input_ids.numel()),
    }


def reward_collate(tokenizer: "Tokenizer") -> Callable[["PreferencePairs", list[int], int], dict]:
    """The collate function for PreferenceBatches that makes reward rows for this tokenizer's template."""
    return functools.partial(collate_reward_pairs, tail=tuple(chat_tail(tokenizer)))


# ---- the directory -----------------------------------------------------------------------------------------

def sequence_classification_config(config: ModelConfig) -> dict[str, Any]:
    """The config.json keys that turn a causal-LM directory into a one-label SequenceClassification one."""
    from matelike.model.io import architecture

    return {
        "architectures": [architecture(config).replace("ForCausalLM", "ForSequenceClassification")],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
    }


def save_reward_model(model: RewardModel, tokenizer: "Tokenizer", out_dir: str | Path) -> Path:
    """Write `model` as a transformers SequenceClassification directory (see the module docstring)."""
    from matelike.model.io import save_model

    if tokenizer is None:  # transformers finds the last real token through pad_token_id, which comes from it
        raise ValueError("a reward model directory needs the tokenizer (its pad id marks the padding)")
    return save_model(model.model, tokenizer, out_dir, extra_tensors={HEAD: model.score.weight},
                      config_update=sequence_classification_config(model.config))


def load_reward_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
) -> tuple[RewardModel, "Tokenizer | None"]:
    """Read a directory written by save_reward_model (or a one-label SequenceClassification directory of our
    architecture with tied embeddings), in eval mode. Problems are ModelDirErrors naming the file."""
    from matelike.model.io import ModelDirError, load_model_with_tensors

    backbone, tokenizer, tensors = load_model_with_tensors(model_dir, device, dtype, extra=(HEAD,))
    head = tensors[HEAD]
    if tuple(head.shape) != (1, backbone.config.dim):
        raise ModelDirError(f"{Path(model_dir)}: {HEAD} has shape {list(head.shape)}; a reward model has one "
                            f"label: [1, {backbone.config.dim}]")
    model = RewardModel(backbone.config, backbone=backbone)
    with torch.no_grad():
        model.score.weight.copy_(head)
    return model.eval(), tokenizer


# ---- scoring -----------------------------------------------------------------------------------------------

def _messages(turns: Turns, role: str, what: str, index: int) -> list[dict[str, str]]:
    if isinstance(turns, str):
        return [{"role": role, "content": turns}]
    if isinstance(turns, (list, tuple)):
        return list(turns)
    raise TypeError(f"{what} {index}: expected a string or a list of messages, not {type(turns).__name__}")


def render_rows(tokenizer: "Tokenizer", prompts: Sequence[Turns], completions: Sequence[Turns]) -> list[list[int]]:
    """The ids a reward model scores for each (prompt, completion): `encode_chat(prompt + completion)`.

    A string prompt is one user turn, a string completion one assistant turn; message lists are taken as they are.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids, _ = tokenizer.encode_chat(_messages(p, "user", "prompt", i) + _messages(c, "assistant", "completion", i))
        rows.append(ids)
    return rows


@torch.no_grad()
def score(model: RewardModel, tokenizer: "Tokenizer", prompts: Sequence[Turns], completions: Sequence[Turns],
          batch_size: int = 16) -> list[float]:
    """The reward of each completion for its prompt, in order.

    Rows are batched by length (little padding) and scored in eval mode; the model keeps its train/eval mode.
    The completion's text is closed by the template (`<|im_end|>`), whether or not the sampler stopped there:
    callers that must tell truncated answers apart do so before scoring.
    """
    rows = render_rows(tokenizer, prompts, completions)
    out = [0.0] * len(rows)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, last = pad_rows([rows[i] for i in idx], tokenizer.pad_id)
            rewards = model(ids.to(device), last.to(device)).rewards.float().cpu().tolist()
            for i, r in zip(idx, rewards):
                out[i] = r
    finally:
        model.train(was_training)
    return out


def reward_function(model_dir: str | Path, device: str = "auto", dtype: str | None = None,
                    batch_size: int = 16) -> Callable[..., list[float]]:
    """A reward function with TRL's `reward_funcs` signature (prompts, completions, **fields) -> floats, scoring
    with the reward model in `model_dir`."""
    model, tokenizer = load_reward_model(model_dir, device, dtype)
    if tokenizer is None:
        from matelike.model.io import ModelDirError

        raise ModelDirError(f"{Path(model_dir) / 'tokenizer.json'}: not found; a reward model needs its tokenizer")
    return scorer(model, tokenizer, batch_size)


def scorer(model: RewardModel, tokenizer: "Tokenizer", batch_size: int = 16) -> Callable[..., list[float]]:
    """A loaded reward model as a reward function with TRL's `reward_funcs` signature (named `reward_model`)."""

    def reward_model(prompts: Sequence[Turns], completions: Sequence[Turns], **fields: Any) -> list[float]:
        return score(model, tokenizer, prompts, completions, batch_size)

    return reward_model
