"""`matelike data demo`: tagged-corpus parsing, entity extraction, held-out guarantees, determinism."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from matelike.cli import main
from matelike.data.demo import (
    DemoConfig,
    SourceCounts,
    TaggedFormatError,
    _merge_person_run,
    build_demo,
    extract_entities,
    load_documents,
    parse_tagged_line,
    split_items,
    split_sentences,
    tagged_to_text,
)
from matelike.data.formats import to_messages
from matelike.eval.scoring import TASKS, parse_entities, segmentation_spans

# Small sizes: the corpus is parsed in full either way, but sampling and writing stay quick.
SMALL = DemoConfig(test_per_task=40, dev_per_task=30, sft_per_task=60, train_per_task=20)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, SMALL)
    return out


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_tagged_line_strips_tags_and_brackets() -> None:
    line = "[中央/n  人民/n  广播/vn  电台/n]nt  记者/n  江/nr  泽民/nr  在/p  北京/ns  。/w"
    units = parse_tagged_line(line)
    assert "".join(u.text for u in units) == "中央人民广播电台记者江泽民在北京。"
    assert tagged_to_text(line) == "中央人民广播电台记者江泽民在北京。"
    sent = split_sentences(units)[0]
    assert sent.words == ["中央", "人民", "广播", "电台", "记者", "江", "泽民", "在", "北京", "。"]
    assert sent.entities == [("nt", "中央人民广播电台"), ("nr", "江泽民"), ("ns", "北京")]


def test_bracketed_place_inside_organisation_is_not_counted_twice() -> None:
    units = parse_tagged_line("[中国/ns  国际/n  广播/vn  电台/n]nt  和/c  [香港/ns  特别/a  行政区/n]ns")
    assert extract_entities(units) == [("nt", "中国国际广播电台"), ("ns", "香港特别行政区")]
    # a bracketed compound of another type (here a plain noun phrase) gives no entity
    assert extract_entities(parse_tagged_line("[大/a  公司/n]nz  的/u")) == []


def test_slash_word_and_single_space_separators() -> None:
    assert tagged_to_text("１/m  //w  ２/m 年/q") == "１/２年"
    assert [u.words[0] for u in parse_tagged_line("１/m  //w  ２/m")] == ["１", "/", "２"]


def test_malformed_tagged_lines_name_file_and_line() -> None:
    with pytest.raises(TaggedFormatError, match=r"tag\.txt:7: token '北京' is not word/tag"):
        tagged_to_text("在/p  北京  。/w", "tag.txt:7")
    with pytest.raises(TaggedFormatError, match=r"tag\.txt:8: '\[' without closing"):
        parse_tagged_line("[中央/n  人民/n", "tag.txt:8")
    with pytest.raises(TaggedFormatError, match="tag.txt:2"):
        load_documents(("tag.txt", "好/a\n坏\n"), [], {})


def test_person_name_runs() -> None:
    assert _merge_person_run(["克林顿"]) == ["克林顿"]
    assert _merge_person_run(["江", "泽民"]) == ["江泽民"]
    assert _merge_person_run(["江", "泽民", "李", "鹏"]) == ["江泽民", "李鹏"]
    assert _merge_person_run(["陈", "方", "安生"]) == ["陈方安生"]
    assert _merge_person_run(["吴", "希曾", "刘", "伯根", "岑红"]) == ["吴希曾", "刘伯根", "岑红"]
    units = parse_tagged_line("江/nr  泽民/nr  、/w  李/nr  鹏/nr  会见/v  克林顿/nr")
    assert extract_entities(units) == [("nr", "江泽民"), ("nr", "李鹏"), ("nr", "克林顿")]


def test_sentences_keep_closing_quotes() -> None:
    units = parse_tagged_line("他/r  说/v  ：/w  “/w  好/a  。/w  ”/w  我/r  走/v  了/y  ！/w  再见/v")
    assert [s.text for s in split_sentences(units)] == ["他说：“好。”", "我走了！", "再见"]


def test_empty_and_duplicate_lines_are_dropped_and_counted() -> None:
    counts: dict[str, SourceCounts] = {}
    news = ("news.txt", "好/a  。/w\n\n好/a  。/w\n坏/a\n")
    docs = load_documents(news, [("pos.txt", "很好\n很好\n\n好。\n", "正面"), ("neg.txt", "坏\n", "负面")], counts)
    assert [d.text for d in docs] == ["好。", "坏", "很好"]
    assert (counts["news.txt"].lines, counts["news.txt"].empty, counts["news.txt"].duplicate) == (4, 1, 1)
    # `好。` from the reviews duplicates a news paragraph: duplicates are found across sources
    assert (counts["pos.txt"].kept, counts["pos.txt"].empty, counts["pos.txt"].duplicate) == (1, 1, 2)
    assert counts["neg.txt"].duplicate == 1
    assert docs[2].label == "正面"


def test_a_short_pool_keeps_the_train_items_whole() -> None:
    """When a task has fewer items than its SFT share and its train share ask for, SFT gives way: preference
    pairs and RL prompts still get train_per_task items, none shared with SFT."""
    news = ("news.txt", "".join(f"第{i}次/m  会议/n  在/p  北京/ns  召开/v  了/u  。/w\n" for i in range(40)))
    reviews = [("pos.txt", "".join(f"这个东西真的很好用第{i}次\n" for i in range(30)), "正面"),
               ("neg.txt", "".join(f"这个东西真的很难用第{i}次\n" for i in range(30)), "负面")]
    docs = load_documents(news, reviews, {})
    cfg = DemoConfig(test_per_task=3, dev_per_task=3, val_fraction=0.0, sft_per_task=10, train_per_task=5)
    split = split_items(docs, cfg)
    assert cfg.sft_count("entities") == 60 and len(split.train["entities"]) == 5
    trainable = [d for i, d in enumerate(docs) if d.source == "news" and i not in split.heldout_docs]
    assert len(split.sft["entities"]) == len(trainable) - 5  # every other news document gives SFT an item
    assert not {i.source for i in split.sft["entities"]} & {i.source for i in split.train["entities"]}


# ---------------------------------------------------------------------------------------------- full build


def test_demo_files_have_the_documented_layouts(demo_dir: Path) -> None:
    for name in ("pretrain.jsonl", "pretrain_val.jsonl", "sft.jsonl", "tasks_train.jsonl", "tasks_test.jsonl",
                 "chat_test.jsonl", "README.md"):
        assert (demo_dir / name).stat().st_size > 0, name
    pre = _jsonl(demo_dir / "pretrain.jsonl")
    val = _jsonl(demo_dir / "pretrain_val.jsonl")
    assert len(pre) > 30_000 and all(set(r) == {"text"} and r["text"].strip() for r in pre)
    assert 0.005 < len(val) / (len(pre) + len(val)) < 0.02
    texts = [r["text"] for r in pre + val]
    assert len(set(texts)) == len(texts)  # no duplicates, no overlap between train and validation
    # no `word/tag  word/tag` left (one English review says "his/her head", hence two in a row)
    assert not any(re.search(r"/[A-Za-z]{1,3}\s+\S+/[A-Za-z]{1,3}(\s|$)", t) for t in texts)
    sft = _jsonl(demo_dir / "sft.jsonl")
    counts = [SMALL.sft_count(t) for t in TASKS]
    assert counts == [180, 240, 360, 60]  # sentiment, segmentation, entities, continuation: the tuned shares
    single = [r for r in sft if "conversations" in r]  # one task request, one answer
    later = sum(round(n * SMALL.multiturn_fraction) for n in counts)
    assert len(single) == sum(counts) - later
    for rec in single:
        assert [m["role"] for m in to_messages(rec)] == ["user", "assistant"]
    dialogue = [to_messages(r) for r in sft if "messages" in r]
    assert len(dialogue) > len(single) // 3  # conversation is a real share of the mix
    for msgs in dialogue:
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert sum(len(m) >= 4 for m in dialogue) >= later  # tasks asked in a later turn
    test = _jsonl(demo_dir / "tasks_test.jsonl")
    train = _jsonl(demo_dir / "tasks_train.jsonl")
    assert sum(r["task"] == "chat" for r in train) == SMALL.train_per_task  # open prompts for preference pairs
    assert train[len(TASKS)]["task"] == "chat"  # a fifth stream in the round-robin
    train = [r for r in train if r["task"] != "chat"]
    for rows, n in ((test, SMALL.test_per_task), (train, SMALL.train_per_task)):
        assert {r["task"] for r in rows} == set(TASKS)
        assert all(sum(r["task"] == t for r in rows) == n for t in TASKS)
        assert all({"task", "prompt", "answer", "input"} <= set(r) and r["input"] in r["prompt"] for r in rows)
    readme = (demo_dir / "README.md").read_text(encoding="utf-8")
    assert "199801.txt" in readme and "Licence" in readme and str(len(pre)) in readme


def test_gold_answers_are_consistent_with_inputs(demo_dir: Path) -> None:
    rows = _jsonl(demo_dir / "tasks_test.jsonl") + _jsonl(demo_dir / "tasks_train.jsonl")
    sentiment = [r for r in rows if r["task"] == "sentiment"]
    assert {r["answer"] for r in sentiment} == {"正面", "负面"}
    test_sent = [r for r in _jsonl(demo_dir / "tasks_test.jsonl") if r["task"] == "sentiment"]
    assert sum(r["answer"] == "正面" for r in test_sent) == SMALL.test_per_task // 2  # balanced
    assert [r["answer"] for r in test_sent[:4]] == ["正面", "负面", "正面", "负面"]  # every prefix too
    for r in rows:
        if r["task"] == "segmentation":
            assert "".join(r["answer"].split()) == r["input"]
            assert len(segmentation_spans(r["answer"])) >= 3
        elif r["task"] == "entities":
            names = parse_entities(r["answer"])
            assert (r["answer"] == "无") == (not names)
            assert all(name in r["input"] for _, name in names)
    assert any(r["task"] == "entities" and r["answer"] != "无" for r in rows)


def test_test_sources_never_appear_in_training_files(demo_dir: Path) -> None:
    test = _jsonl(demo_dir / "tasks_test.jsonl")
    pretrain = "\n".join(r["text"] for r in _jsonl(demo_dir / "pretrain.jsonl"))
    sft = "\n".join(m["content"] for r in _jsonl(demo_dir / "sft.jsonl") for m in r.get("conversations") or r["messages"])
    train = "\n".join(r["prompt"] + "\n" + r["answer"] for r in _jsonl(demo_dir / "tasks_train.jsonl"))
    for r in test:
        source = r["input"] + r["answer"] if r["task"] == "continuation" else r["input"]
        for name, text in (("pretrain", pretrain), ("sft", sft), ("tasks_train", train)):
            assert source not in text, f"{r['task']} test source found in {name}: {source}"
    # and the validation documents are not used for SFT items either
    val = _jsonl(demo_dir / "pretrain_val.jsonl")
    assert not any(len(v["text"]) >= 20 and v["text"] in sft for v in val)


def test_dev_items_are_held_out_like_test_items_and_apart_from_them(demo_dir: Path) -> None:
    dev = _jsonl(demo_dir / "tasks_dev.jsonl")
    test = _jsonl(demo_dir / "tasks_test.jsonl")
    assert all(sum(r["task"] == t for r in dev) == SMALL.dev_per_task for t in TASKS)
    assert {r["answer"] for r in dev if r["task"] == "sentiment"} == {"正面", "负面"}
    assert not {r["input"] for r in dev} & {r["input"] for r in test}
    pretrain = "\n".join(r["text"] for r in _jsonl(demo_dir / "pretrain.jsonl"))
    sft = "\n".join(m["content"] for r in _jsonl(demo_dir / "sft.jsonl") for m in r.get("conversations") or r["messages"])
    train = "\n".join(r["prompt"] + "\n" + r["answer"] for r in _jsonl(demo_dir / "tasks_train.jsonl"))
    for r in dev:
        source = r["input"] + r["answer"] if r["task"] == "continuation" else r["input"]
        for name, text in (("pretrain", pretrain), ("sft", sft), ("tasks_train", train)):
            assert source not in text, f"{r['task']} dev source found in {name}: {source}"


def test_test_files_do_not_depend_on_the_dev_split(demo_dir: Path, tmp_path: Path) -> None:
    """Adding or resizing the development split leaves every reported test item as it was."""
    build_demo(tmp_path, DemoConfig(test_per_task=SMALL.test_per_task, dev_per_task=0,
                                    sft_per_task=SMALL.sft_per_task, train_per_task=SMALL.train_per_task))
    assert (tmp_path / "tasks_test.jsonl").read_bytes() == (demo_dir / "tasks_test.jsonl").read_bytes()
    assert (tmp_path / "tasks_dev.jsonl").read_text(encoding="utf-8") == ""


def test_two_runs_are_byte_identical_and_cli_prints_counts(demo_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "again"
    code = main(["data", "demo", "--out", str(out), "--test-per-task", str(SMALL.test_per_task),
                 "--dev-per-task", str(SMALL.dev_per_task), "--sft-per-task", str(SMALL.sft_per_task), "--train-per-task", str(SMALL.train_per_task)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pretrain.jsonl:" in printed and "chars" in printed and "duplicate dropped" in printed
    for f in sorted(demo_dir.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_test_prompts_do_not_depend_on_the_sft_size(demo_dir: Path, tmp_path: Path) -> None:
    """Scores of runs with different --sft-per-task are read on the very same test prompts."""
    build_demo(tmp_path, DemoConfig(test_per_task=SMALL.test_per_task, dev_per_task=SMALL.dev_per_task,
                                    sft_per_task=SMALL.sft_per_task + 7, train_per_task=SMALL.train_per_task))
    assert len(_jsonl(tmp_path / "sft.jsonl")) != len(_jsonl(demo_dir / "sft.jsonl"))
    assert (tmp_path / "tasks_test.jsonl").read_bytes() == (demo_dir / "tasks_test.jsonl").read_bytes()


def test_other_seed_gives_other_split(tmp_path: Path) -> None:
    build_demo(tmp_path, DemoConfig(seed=7, test_per_task=5, sft_per_task=5, train_per_task=5, val_fraction=0.0))
    assert (tmp_path / "pretrain_val.jsonl").read_text(encoding="utf-8") == ""
    first = _jsonl(tmp_path / "tasks_test.jsonl")[0]
    assert len(_jsonl(tmp_path / "tasks_test.jsonl")) == 20
    assert first["task"] == "sentiment"


def test_cli_rejects_bad_sizes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["data", "demo", "--out", str(tmp_path), "--sft-per-task", "-3"])
    assert e.value.code == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_package_data_with_invalid_utf8_names_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matelike.data.demo import _read_resource

    pkg = tmp_path / "fake_corpus_pkg"
    (pkg / "tag").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n", encoding="utf-8")
    (pkg / "tag" / "a.txt").write_bytes("好/a\n坏/a\n".encode() + b"\xff/w\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaggedFormatError, match=r"fake_corpus_pkg/tag/a\.txt:3: invalid UTF-8 \(byte 0xff\)"):
        _read_resource(("tag", "a.txt"), package="fake_corpus_pkg")
    (pkg / "tag" / "a.txt").write_bytes("好/a\n".encode())
    assert _read_resource(("tag", "a.txt"), package="fake_corpus_pkg") == ("fake_corpus_pkg/tag/a.txt", "好/a\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg_xyz"):
        _read_resource(("a.txt",), package="no_such_pkg_xyz")


def test_rl_prompts_are_the_rl_tasks_training_items_interleaved(demo_dir: Path) -> None:
    from matelike.data.demo import RL_TASKS

    rl = _jsonl(demo_dir / "rl_train.jsonl")
    train = _jsonl(demo_dir / "tasks_train.jsonl")
    assert [r["task"] for r in rl[: 2 * len(RL_TASKS)]] == [*RL_TASKS, *RL_TASKS]
    assert sorted(map(json.dumps, rl)) == sorted(json.dumps(r) for r in train if r["task"] in RL_TASKS)


def test_tasks_train_interleaves_tasks_so_a_limit_covers_all(demo_dir: Path) -> None:
    from matelike.eval.scoring import TASKS

    train = _jsonl(demo_dir / "tasks_train.jsonl")
    assert [r["task"] for r in train[: len(TASKS) + 1]] == [*TASKS, "chat"]
    assert {r["task"] for r in train[:10]} == {*TASKS, "chat"}
