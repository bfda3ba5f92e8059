"""Shared fixtures: a tiny byte-level BPE tokenizer trained once per test session on built-in text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# A few sentences of Chinese and English: enough for a 512-token vocabulary with Chinese merges.
TINY_CORPUS: tuple[str, ...] = (
    "人民日报一九九八年元旦献词：迈向充满希望的新世纪。",
    "我们的祖国正在发生深刻的变化，经济建设取得了巨大的成就。",
    "这家店的服务很好，菜的味道也不错，下次还会再来。",
    "手机的质量太差了，用了三天就坏了，非常失望。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "今天天气很好，我们一起去公园散步吧。",
    "学习语言模型需要大量的文本数据和计算资源。",
    "他说：“明天的会议改到下午三点。”",
    "中国人民银行宣布下调存款利率，以促进经济增长。",
    "这本书写得很好，内容丰富，值得推荐给大家。",
    "房间很干净，但是隔音效果不好，晚上有点吵。",
    "江泽民主席在新年贺词中表示，要继续推进改革开放。",
    "The quick brown fox jumps over the lazy dog.",
    "A small language model can be trained from zero on one machine.",
    "Tokenizers split text into pieces; byte-level BPE never fails on any input.",
    "In 1998, the People's Daily published 2,345 articles in January.",
    "Hello, world! This is a test of the tokenizer with numbers 12345 and symbols #@%.",
    "def train(model, data):\n    return model.fit(data)\n",
)


def tiny_corpus_docs() -> list[str]:
    """Documents of the built-in corpus: each sentence, plus pairs so merges see varied contexts."""
    docs = list(TINY_CORPUS)
    docs += [a + b for a, b in zip(TINY_CORPUS, TINY_CORPUS[1:])]
    return docs * 3


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    """The built-in Chinese + English documents the tiny tokenizer is trained on."""
    return tiny_corpus_docs()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a 512-token byte-level BPE trained on the built-in corpus (Hugging Face files)."""
    from matelike.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in tiny_corpus_docs():
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    out = root / "tok"
    train_tokenizer([corpus], out, vocab_size=512, max_chars=10_000_000, progress=False, min_frequency=1)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """The loaded tiny tokenizer (matelike.tokenizer.Tokenizer)."""
    from matelike.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads spinning
    at barriers make them 20x slower; the setting is restored for the other test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_chat_model(tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """Factory of tiny random chat models saved with the session tokenizer: `make_chat_model(max_seq_len, name)`.

    Untied embeddings and a wide init make greedy answers depend on the prompt (a tied random model just
    repeats the last prompt token), which the serving tests need.
    """
    import torch

    from matelike.model.io import save_model
    from matelike.model.transformer import Transformer, get_preset

    def make(max_seq_len: int = 128, name: str = "tiny-test") -> Path:
        out = tmp_path_factory.mktemp("chat-model") / name  # the server names the model after its folder
        torch.manual_seed(1)
        config = get_preset("tiny", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            hidden_dim=128, max_seq_len=max_seq_len, tie_embeddings=False, init_std=0.1)
        save_model(Transformer(config), tokenizer, out)
        return out

    return make
