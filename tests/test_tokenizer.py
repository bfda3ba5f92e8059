"""Tokenizer: round trips, special tokens, chat template and mask against transformers, training CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matelike.cli import main
from matelike.tokenizer import ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS, Tokenizer, train_tokenizer

ROUND_TRIP = [
    "",
    "你好，世界！",
    "The quick brown fox, 1998年1月1日。",
    "emoji 🤖🎉👍🏽 and flags 🇨🇳",
    "rare CJK extension: 𠀀𪚥𫝀𬺰 and compatibility 丽",
    "mixed\twhitespace \u3000全角空格\r\n\n  trailing  ",
    "digits 0123456789 ٣ ½ and symbols ©®™ ≠ ∑",
    "\x00control\x07 chars\x1b[0m",
    "e\u0301 combining and zero\u200dwidth joiner",
]

CHATS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [
        {"role": "system", "content": "你是一个有帮助的助手。"},
        {"role": "user", "content": "1+1等于几？"},
        {"role": "assistant", "content": "等于2。"},
        {"role": "user", "content": "那2+2呢？ Explain."},
        {"role": "assistant", "content": "\n 4 🤖 "},
    ],
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_special_token_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_id == 0 == tokenizer.token_to_id(ENDOFTEXT)
    assert tokenizer.pad_id == tokenizer.eos_id
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (1, 2)
    assert tokenizer.special_ids == list(range(len(SPECIAL_TOKENS)))
    assert set(tokenizer.stop_ids) == {tokenizer.im_end_id, tokenizer.eos_id}
    assert tokenizer.vocab_size == 512


def test_special_tokens_never_from_plain_text(tokenizer: Tokenizer) -> None:
    # Pieces of special tokens and look-alikes are plain bytes, never special ids.
    text = "<| im_end |> <|im_end <|endoftext| |> <|reserved_99|> <|>"
    assert not set(tokenizer.encode(text)) & set(tokenizer.special_ids)
    for doc in ROUND_TRIP + [m["content"] for c in CHATS for m in c]:
        assert not set(tokenizer.encode(doc)) & set(tokenizer.special_ids)
    # The exact strings are single tokens, never split.
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(tok) == [i]
        assert tokenizer.encode(f"前{tok}后")[1:-1].count(i) == 1
    # No merge in the vocabulary produces a special token's text.
    model = json.loads(tokenizer.backend.to_str())["model"]
    merged = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]}
    assert model["merges"] and not merged & set(SPECIAL_TOKENS)


def test_decode_skip_special(tokenizer: Tokenizer) -> None:
    ids, _ = tokenizer.encode_chat(CHATS[0])
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert IM_START not in text and "你好！有什么可以帮你？" in text


def test_chat_template_text(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template(CHATS[1][:2], add_generation_prompt=True)
    assert text == (f"{IM_START}system\n你是一个有帮助的助手。{IM_END}\n"
                    f"{IM_START}user\n1+1等于几？{IM_END}\n{IM_START}assistant\n")


def test_encode_chat_mask(tokenizer: Tokenizer) -> None:
    msgs = CHATS[1]
    ids, mask = tokenizer.encode_chat(msgs)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(msgs))
    assert len(mask) == len(ids)
    # Masked tokens decode to exactly the assistant contents, each followed by <|im_end|>.
    trained = [i for i, m in zip(ids, mask) if m]
    expected = "".join(m["content"] + IM_END for m in msgs if m["role"] == "assistant")
    assert tokenizer.decode(trained) == expected
    assert sum(1 for i, m in zip(ids, mask) if m and i == tokenizer.im_end_id) == 2
    # Generation prompt adds untrained tokens only.
    ids2, mask2 = tokenizer.encode_chat(msgs[:2], add_generation_prompt=True)
    assert sum(mask2) == 0 and tokenizer.decode(ids2).endswith(f"{IM_START}assistant\n")


@pytest.mark.parametrize("chat", CHATS)
def test_matches_transformers(tokenizer_dir: Path, tokenizer: Tokenizer, chat: list[dict]) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert hf.eos_token_id == tokenizer.eos_id and hf.pad_token_id == tokenizer.pad_id
    for text in ROUND_TRIP + [f"a{ENDOFTEXT}b{IM_START}c"]:
        assert hf(text)["input_ids"] == tokenizer.encode(text)
        assert hf.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    for gen in (False, True):
        assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
            tokenizer.apply_chat_template(chat, add_generation_prompt=gen)
    out = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = tokenizer.encode_chat(chat)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == mask


def test_save_load_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    assert again.sha256 == tokenizer.sha256
    assert again.encode("人民日报 hello") == tokenizer.encode("人民日报 hello")
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "{% generation %}" in config["chat_template"].replace("{%- generation -%}", "{% generation %}")
    assert config["eos_token"] == ENDOFTEXT


def test_load_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return path


def test_training_is_deterministic_and_compresses(tmp_path: Path, tiny_docs: list[str]) -> None:
    corpus = _write_jsonl(tmp_path / "c.jsonl", tiny_docs)
    a = train_tokenizer([corpus], tmp_path / "a", vocab_size=400, progress=False)
    b = train_tokenizer([corpus], tmp_path / "b", vocab_size=400, progress=False)
    assert a.sha256 == b.sha256
    doc = tiny_docs[1]
    assert len(a.encode(doc)) < len(doc.encode("utf-8"))  # merges learned Chinese pieces


def test_sampling_bounds_training_chars(tmp_path: Path) -> None:
    # 400 documents of 50 chars = 20k chars; max_chars 4000 keeps about a fifth, spread over the file.
    docs = [f"第{i}篇文档。" + "数据" * 20 + f"{i:05d}" for i in range(400)]
    corpus = _write_jsonl(tmp_path / "big.jsonl", docs)
    train_tokenizer([corpus], tmp_path / "tok", vocab_size=300, max_chars=4000, progress=False)
    info = json.loads((tmp_path / "tok" / "tokenizer_train.json").read_text(encoding="utf-8"))
    assert info["docs"] == 400
    assert 2000 < info["train_chars"] < 7000
    assert info["heldout_docs"] >= 1 and info["chars_per_token"] > 0


def test_cli_train_reports_bad_records_and_compression(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       tiny_docs: list[str]) -> None:
    corpus = _write_jsonl(tmp_path / "c.jsonl", tiny_docs)
    with open(corpus, "ab") as f:
        f.write(b'{"text": 5}\n{"text": "ok \xff"}\n')
    val = _write_jsonl(tmp_path / "val.jsonl", ["北京的天气今天很好。"])
    rc = main(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300",
               "--heldout", str(val), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert f"{corpus}:{len(tiny_docs) + 1}: wrong type" in err
    assert f"{corpus}:{len(tiny_docs) + 2}: invalid UTF-8" in err
    assert "chars/token" in out and "bytes/token" in out
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 300


def test_cli_train_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tokenizer", "train", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "t")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert main(["tokenizer", "train", "--input", str(empty), "--out", str(tmp_path / "t"), "--quiet"]) == 1
    assert "no usable text" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(empty), "--out", str(tmp_path / "t"), "--vocab-size", "100"]) == 2
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet")
    assert main(["tokenizer", "train", "--input", str(corrupt), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "corrupt.parquet: cannot read parquet" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_tokenize_prints_one_json_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["bench", "tokenize", "--mb", "0.3", "--vocab-size", "300", "--tmp-dir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "tokenize" and result["input_mb"] >= 0.3
    assert result["peak_rss_mb"] > 0 and result["bytes_per_token"] > 1


def test_transformers_save_pretrained_round_trip(tokenizer_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    # A directory re-saved by transformers (e.g. after TRL training) still loads with our API, same ids.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "hf")
    again = Tokenizer.load(tmp_path / "hf")
    assert again.encode("你好 world 🤖") == tokenizer.encode("你好 world 🤖")
    assert again.encode_chat(CHATS[1]) == tokenizer.encode_chat(CHATS[1])
    assert "generation" in again.chat_template
