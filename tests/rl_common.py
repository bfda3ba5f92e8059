"""What the RL tests share (tests/rl/): the task records, the small chat model, prompts built from records,
and reading and writing the files a run uses. Importable because pytest puts tests/ on the path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from matelike.rl.rollout import Prompts

TASK_RECORDS = [
    {"prompt": "判断评论情感（正面/负面）：这家店的服务很好", "task": "sentiment", "answer": "正面"},
    {"prompt": "中文分词：今天天气很好", "task": "segmentation", "answer": "今天 天气 很 好"},
    {"prompt": "找出句子中的人名、地名、机构名：江泽民在北京", "task": "entities", "answer": "人名：江泽民；地名：北京"},
    {"prompt": "判断评论情感（正面/负面）：手机的质量太差了", "task": "sentiment", "answer": "负面"},
]


def chat_model(make_chat_model: Callable[..., Path]) -> tuple[Any, Any]:
    """The conftest's small chat model (context 128), loaded: (model, tokenizer)."""
    from matelike.model.io import load_model

    return load_model(make_chat_model(max_seq_len=128))


def task_prompts(tok: Any, records: list[dict] = TASK_RECORDS) -> Prompts:
    """Prompts of `records`, rendered with the chat template as `load_prompts` renders them."""
    p = Prompts()
    for i, r in enumerate(records):
        p.ids.append(tok.encode_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0])
        p.prompts.append(r["prompt"])
        p.fields.append({k: v for k, v in r.items() if k != "prompt"})
        p.sources.append(f"mem:{i + 1}")
    return p


def write_jsonl(path: Path, records: list) -> Path:
    """One line per record: a dict as JSON, a string as written (to plant bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
