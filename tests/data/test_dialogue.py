"""The demo's conversation data: packaged dialogue, identity, honest ignorance, held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matelike.data.demo import DemoConfig, build_demo
from matelike.data.dialogue import (
    PERSONA_TOPICS,
    Exchange,
    ModelFacts,
    identity_items,
    load_chatterbot,
    normalize,
    split_exchanges,
)

SMALL = DemoConfig(test_per_task=20, sft_per_task=40, train_per_task=10, model_size="约160万")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, SMALL)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _texts(record: dict) -> list[str]:
    if "messages" in record or "conversations" in record:
        return [m["content"] for m in record.get("messages") or record["conversations"]]
    return [str(v) for v in record.values() if isinstance(v, str)]


def test_chatterbot_is_read_from_the_package_without_the_persona_topics() -> None:
    exchanges = load_chatterbot()
    assert len(exchanges) > 350
    assert {e.topic for e in exchanges} >= {"greetings", "emotion", "food", "history", "science"}
    assert not {f"{e.topic}.yml" for e in exchanges} & PERSONA_TOPICS
    assert all(len(e.turns) % 2 == 0 for e in exchanges)


def test_split_keeps_every_held_out_user_turn_out_of_training() -> None:
    ex = [Exchange(("你好", "嗨"), "g"), Exchange(("嗨", "你好"), "g"), Exchange(("再见", "拜拜"), "g"),
          Exchange(("吃了吗", "吃了"), "f"), Exchange(("吃了吗？", "还没"), "f")]
    for seed in range(20):
        split = split_exchanges(ex, 0.4, seed)
        held = {normalize(t) for e in split.test for t in e.turns[0::2]}
        assert held and all(not held & {normalize(t) for t in e.turns} for e in split.train)
        assert len({e.key for e in split.test}) == len(split.test)  # one reference per held-out prompt


def test_dev_groups_are_apart_from_test_and_training() -> None:
    ex = [Exchange((f"问{i}", f"答{i}"), "t") for i in range(20)] + [Exchange(("问0", "又答"), "t")]
    split = split_exchanges(ex, 0.2, 3, dev_fraction=0.25)
    turns = [{normalize(t) for e in part for t in e.turns[0::2]} for part in (split.train, split.dev, split.test)]
    assert len(split.dev) == 5 and len(split.test) == 4  # one reference per group, "问0" is one group
    assert not turns[0] & turns[1] and not turns[0] & turns[2] and not turns[1] & turns[2]
    assert len(split.train) == 21 - 5 - 4 - ("问0" in turns[1] | turns[2])
    # the test split is the one a split without development groups gives
    assert split.test == split_exchanges(ex, 0.2, 3).test


@pytest.mark.parametrize("held_file", ["chat_test.jsonl", "chat_dev.jsonl"])
def test_no_held_out_user_turn_in_any_training_file(demo_dir: Path, held_file: str) -> None:
    held = {normalize(r["messages"][-1]["content"]) for r in _jsonl(demo_dir / held_file)
            if r["kind"] == "open"}
    assert len(held) > 40
    for name in ("sft.jsonl", "tasks_train.jsonl"):
        for rec in _jsonl(demo_dir / name):
            assert not held & {normalize(t) for t in _texts(rec)}, (name, rec)
    docs = {normalize(r["text"]) for r in _jsonl(demo_dir / "pretrain.jsonl")}
    assert not held & docs


def test_identity_answers_are_true_to_the_model(demo_dir: Path) -> None:
    facts = ModelFacts(size="约160万")
    train, test = identity_items(facts, held_out=False), identity_items(facts, held_out=True)
    assert not {q for q, _ in train} & {q for q, _ in test}
    sft_text = (demo_dir / "sft.jsonl").read_text(encoding="utf-8")
    assert "约160万" in sft_text and "Matelike" in sft_text
    assert "不知道" in sft_text  # honest answers to out-of-scope questions


def test_chat_test_items_have_the_documented_layout(demo_dir: Path) -> None:
    rows = _jsonl(demo_dir / "chat_test.jsonl")
    kinds = {r["kind"] for r in rows}
    assert kinds == {"open", "task"}
    for r in rows:
        assert r["messages"][-1]["role"] == "user"
        if r["kind"] == "open":
            assert r["reference"] and r["category"]
        else:
            assert r["task"] in ("sentiment", "segmentation", "entities", "continuation") and len(r["messages"]) >= 3
    assert {r["category"] for r in rows if r["kind"] == "open"} >= {"identity", "out_of_scope"}
    dev = _jsonl(demo_dir / "chat_dev.jsonl")
    assert {r["kind"] for r in dev} == {"open", "task"}
    # identity and out-of-scope phrasings are held out for the test file only
    assert not {r["category"] for r in dev if r["kind"] == "open"} & {"identity", "out_of_scope"}
    assert not {normalize(r["messages"][-1]["content"]) for r in dev} & {
        normalize(r["messages"][-1]["content"]) for r in rows}
