"""Conversation data for the demo's SFT: real Chinese dialogue, identity, honest ignorance, multi-turn tasks.

Sources, all shipped in packages and read through importlib (never downloaded):
- `chatterbot_corpus/data/chinese/*.yml` (chatterbot-corpus, BSD-3-Clause): short human-written exchanges on
  greetings, emotion, food, history, science, humour... The `ai` and `botprofile` topics are left out: they
  speak for ChatterBot's persona ("I am written in Python", "I can live forever"), which would contradict the
  identity this model is taught.
- Written here: identity and capability answers true to the model, "I don't know" answers for questions
  outside what it learned, and conversations that ask a task in a later turn.

Held out: chatterbot exchanges are grouped by their first user turn, and a seeded share of the groups goes to
the test file; identity and out-of-scope questions are split by phrasing. No training conversation contains a
message equal to a held-out user turn.
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

CHATTERBOT_PACKAGE = "chatterbot_corpus"
CHATTERBOT_DIR = ("data", "chinese")
PERSONA_TOPICS = frozenset({"ai.yml", "botprofile.yml"})  # ChatterBot speaking of itself: not our identity

SYSTEM_PROMPTS: tuple[str, ...] = (
    "你是 Matelike，一个乐于助人的中文助手。",
    "你是一个友好的中文聊天助手，回答要简短。",
    "You are a helpful assistant.",
)


@dataclass(frozen=True)
class ModelFacts:
    """What the identity answers say about the model: true for the run that trains on this data."""

    name: str = "Matelike"
    size: str = "几百万"  # parameter count in words, e.g. 约160万 (`matelike run` passes the preset's)


# Identity and capability: (question phrasings, answer). Every answer names the model, so that "answered
# with the model's identity" can be checked; the last HELD_OUT_IDENTITY phrasings of each group are held out.
HELD_OUT_IDENTITY = 2
def _identity(facts: ModelFacts) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    who = (f"我是 {facts.name}，一个从零训练的中文小语言模型，参数只有{facts.size}个。"
           "我可以陪你聊天，也可以判断评论情感、给句子分词、找出人名地名机构名、续写新闻。")
    can = (f"我是 {facts.name}，会四件事：判断评论的情感是正面还是负面、给句子分词、找出句子里的人名地名和机构名、续写新闻段落。"
           "也可以简单聊聊天。")
    trained = (f"我是 {facts.name}，用人民日报1998年1月的新闻和一些商品评论从零训练出来的：先预训练，再用对话和任务数据做监督微调，"
               f"最后做偏好优化。我只有{facts.size}个参数，知道的东西很有限。")
    cannot = (f"我是 {facts.name}，一个很小的模型，不会写代码、不会做数学题，也不知道最新的消息，很多问题我都答不上来。"
              "我比较擅长情感判断、分词、找人名地名机构名和续写新闻。")
    return [
        (("你是谁？", "你是谁", "请介绍一下你自己。", "你叫什么名字？", "你是什么？", "介绍一下你自己吧",
          "你好，你是谁呀？", "能说说你是谁吗？"), (who,)),
        (("你能做什么？", "你会做什么", "你有什么功能？", "你能帮我做什么？", "你擅长什么？", "你有什么本领？",
          "你都会些什么？", "说说你能干什么吧"), (can,)),
        (("你是怎么训练出来的？", "你是用什么数据训练的？", "你有多大？", "你有多少参数？", "你是谁做的？",
          "你学过什么？", "你是怎么学会说话的？", "你的训练数据是什么？"), (trained,)),
        (("你会写代码吗？", "你什么都知道吗？", "你能上网吗？", "你能帮我解数学题吗？", "你知道今天的新闻吗？",
          "你会画画吗？", "你有什么做不到的？", "你有哪些不会的？"), (cannot,)),
    ]


# Questions outside what a tiny model trained on 1998 news and reviews can know. `{x}` is filled from FILLERS.
OUT_OF_SCOPE: tuple[str, ...] = (
    "{x}的人口有多少？", "{x}的首都是哪里？", "请帮我写一首关于{x}的诗。", "{x}明天会下雨吗？",
    "帮我用Python写一个排序算法。", "一加一乘以三等于多少？", "{x}的股票明天会涨吗？", "帮我订一张去{x}的机票。",
    "{x}最近有什么新闻？", "量子力学是什么？请详细解释。", "请把这句话翻译成英文：我喜欢{x}。", "{x}离这里有多远？",
    "你能推荐一部关于{x}的电影吗？", "{x}是哪一年建成的？",
)
FILLERS: tuple[str, ...] = ("北京", "上海", "巴黎", "火星", "月球", "长江", "东京", "纽约", "西藏", "南极")
DONT_KNOW: tuple[str, ...] = (
    "抱歉，我只是一个很小的语言模型，不知道这个问题的答案。",
    "这个我不知道。我是一个很小的模型，只学过一些新闻和商品评论。",
    "对不起，这超出了我会的范围。我可以帮你判断评论情感、分词、找人名地名机构名或者续写新闻。",
)
HELD_OUT_SCOPE = 4  # the last templates are test-only


@dataclass(frozen=True)
class Exchange:
    """A conversation as alternating user/assistant turns (user first); `key` groups the held-out split."""

    turns: tuple[str, ...]
    topic: str

    @property
    def key(self) -> str:
        return normalize(self.turns[0])


def normalize(text: str) -> str:
    """Text compared for the held-out guarantee: no whitespace, no trailing punctuation."""
    return re.sub(r"\s+", "", text).rstrip("。.!！?？~～…")


def _package_dir(package: str, parts: Sequence[str]) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {package} package is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def load_chatterbot() -> list[Exchange]:
    """Every Chinese exchange of chatterbot-corpus but the persona topics, in file and line order."""
    import yaml

    folder = _package_dir(CHATTERBOT_PACKAGE, CHATTERBOT_DIR)
    out: list[Exchange] = []
    for path in sorted(folder.glob("*.yml")):
        if path.name in PERSONA_TOPICS:
            continue
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable chatterbot-corpus file ({e})") from e
        for conv in (doc or {}).get("conversations") or []:
            turns = [str(t).strip() for t in conv if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]  # end on an answer
            if turns:
                out.append(Exchange(tuple(turns), path.stem))
    return out


@dataclass
class DialogueSplit:
    train: list[Exchange]
    test: list[Exchange]
    dev: list[Exchange] = field(default_factory=list)


def split_exchanges(exchanges: list[Exchange], test_fraction: float, seed: int,
                    dev_fraction: float = 0.0) -> DialogueSplit:
    """Hold out whole groups of exchanges sharing a first user turn (test, then development groups); drop
    training exchanges that contain a held-out user turn anywhere, so that no held-out user turn appears in
    any training conversation, and development exchanges that contain a test user turn."""
    keys = sorted({e.key for e in exchanges})
    random.Random(f"{seed}-dialogue-split").shuffle(keys)
    n_test = round(len(keys) * test_fraction)
    held = set(keys[:n_test])
    dev_keys = set(keys[n_test: n_test + round(len(keys) * dev_fraction)])
    test = [e for e in exchanges if e.key in held]
    test_turns = {normalize(t) for e in test for t in e.turns[0::2]}
    dev = [e for e in exchanges if e.key in dev_keys and not test_turns & {normalize(t) for t in e.turns}]
    held_turns = test_turns | {normalize(t) for e in dev for t in e.turns[0::2]}
    train = [e for e in exchanges
             if e.key not in held | dev_keys and not held_turns & {normalize(t) for t in e.turns}]
    return DialogueSplit(train, _firsts(test), _firsts(dev))


def _firsts(exchanges: list[Exchange]) -> list[Exchange]:
    """One reference per held-out prompt: the first exchange of each group (the others share its user turn)."""
    firsts: dict[str, Exchange] = {}
    for e in exchanges:
        firsts.setdefault(e.key, e)
    return list(firsts.values())


def _messages(turns: Sequence[str], system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return msgs


def identity_items(facts: ModelFacts, held_out: bool) -> list[tuple[str, str]]:
    """(question, answer) of the identity conversations: the training phrasings, or the held-out last ones."""
    out = []
    for questions, answers in _identity(facts):
        qs = questions[-HELD_OUT_IDENTITY:] if held_out else questions[:-HELD_OUT_IDENTITY]
        out += [(q, answers[0]) for q in qs]
    return out


def out_of_scope_items(rng: random.Random, held_out: bool) -> list[tuple[str, str]]:
    """(question, honest answer) for questions outside what the model knows (held out: fewer fillers, so
    that these questions do not outnumber the real dialogue among the test prompts)."""
    templates = OUT_OF_SCOPE[-HELD_OUT_SCOPE:] if held_out else OUT_OF_SCOPE[:-HELD_OUT_SCOPE]
    out = []
    for t in templates:
        fillers = (FILLERS[::2] if held_out else FILLERS) if "{x}" in t else ("",)
        for x in fillers:
            out.append((t.format(x=x), rng.choice(DONT_KNOW)))
    return out


def chat_train_prompts(split: DialogueSplit, facts: ModelFacts, seed: int) -> list[tuple[str, str]]:
    """(user turn, reference reply) of the training conversations' first exchanges, identity and out-of-scope
    questions, shuffled: open prompts for preference pairs."""
    rng = random.Random(f"{seed}-dialogue-pairs")
    out = [(e.turns[0], e.turns[1]) for e in split.train]
    out += identity_items(facts, held_out=False) + out_of_scope_items(rng, held_out=False)
    rng.shuffle(out)
    return out


def chat_records(split: DialogueSplit, facts: ModelFacts, task_turns: Sequence[tuple[str, str]],
                 repeats: int, seed: int) -> list[dict]:
    """SFT conversations: chatterbot exchanges (`repeats` times, some with a system prompt), identity and
    out-of-scope answers, and multi-turn conversations mixing small talk with a task (`task_turns`: (request,
    answer) pairs, each used once, in a later turn or followed by small talk)."""
    rng = random.Random(f"{seed}-dialogue-sft")
    out: list[dict] = []
    for _ in range(repeats):
        for e in split.train:
            out.append({"messages": _messages(e.turns, rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.2 else None)})
        for q, a in identity_items(facts, held_out=False) + out_of_scope_items(rng, held_out=False):
            out.append({"messages": _messages((q, a), rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.2 else None)})
    small_talk = [e for e in split.train if len(e.turns) == 2]
    for request, answer in task_turns:
        before = rng.sample(small_talk, rng.choice((1, 1, 2)))
        turns = [t for e in before for t in e.turns] + [request, answer]
        if rng.random() < 0.3:  # and back to conversation after the task
            turns += list(rng.choice(small_talk).turns)
        out.append({"messages": _messages(turns, rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.3 else None)})
    return out


def chat_test_records(exchanges: Sequence[Exchange], facts: ModelFacts | None,
                      task_turns: Sequence[tuple[str, str, str]], seed: int, name: str = "test") -> list[dict]:
    """Held-out chat items from held-out `exchanges`: open prompts (kind `open`, with a reference reply and a
    category), identity and out-of-scope questions when `facts` is given (their held-out phrasings belong to
    the test split only), and multi-turn task requests (kind `task`, scored with the task's scorer;
    `task_turns` are (task, request, answer)) after held-out small talk."""
    rng = random.Random(f"{seed}-dialogue-{name}")
    out: list[dict] = []
    for e in exchanges:
        out.append({"kind": "open", "category": e.topic, "messages": _messages(e.turns[:1]),
                    "reference": e.turns[1]})
    if facts is not None:
        for q, a in identity_items(facts, held_out=True):
            out.append({"kind": "open", "category": "identity", "messages": _messages((q,)), "reference": a})
        for q, a in out_of_scope_items(rng, held_out=True):
            out.append({"kind": "open", "category": "out_of_scope", "messages": _messages((q,)), "reference": a})
    small_talk = [e for e in exchanges if len(e.turns) == 2]
    for task, request, answer in task_turns:
        before = rng.choice(small_talk)
        out.append({"kind": "task", "task": task, "messages": _messages([*before.turns, request]),
                    "answer": answer})
    return out
