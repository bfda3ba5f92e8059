"""`matelike data pack` and TokenFile: token counts reconcile, determinism across workers, bad records, windows."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from matelike.cli import main
from matelike.data.pack import TokenFile, TokenWindows, pack, token_dtype
from matelike.data.records import BadRecordReport
from matelike.tokenizer import Tokenizer

DOCS = [f"第{i}篇：今天天气很好，我们去公园散步。Doc {i} has 🤖 emoji." * (1 + i % 3) for i in range(60)]


def _jsonl(path: Path, docs: list[str], extra: bytes = b"") -> Path:
    with open(path, "wb") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False).encode("utf-8") + b"\n")
        f.write(extra)
    return path


def test_token_counts_reconcile_with_one_by_one(tokenizer: Tokenizer, tokenizer_dir: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", DOCS[:40])
    txt = tmp_path / "b.txt"
    txt.write_text("\n".join(DOCS[40:]) + "\n", encoding="utf-8")
    meta = pack(tokenizer_dir, [src, txt], tmp_path / "out.bin", progress=False)
    expected = []
    for d in DOCS:
        expected += tokenizer.encode(d) + [tokenizer.eos_id]
    tf = TokenFile(tmp_path / "out.bin")
    assert tf.tokens.dtype == np.uint16 and tf.meta["dtype"] == "uint16"
    assert tf.tokens.tolist() == expected
    assert len(tf) == meta["tokens"] == len(expected)
    assert tf.meta["documents"] == len(DOCS) and tf.meta["eot_id"] == tokenizer.eos_id
    assert tf.meta["text_bytes"] == sum(len(d.encode("utf-8")) for d in DOCS)
    assert tf.bytes_per_token == pytest.approx(tf.meta["text_bytes"] / len(expected))
    assert tf.tokenizer_sha256 == tokenizer.sha256
    assert [s["path"] for s in tf.meta["sources"]] == [str(src), str(txt)]
    # Decoding the file gives the documents back, separated by <|endoftext|>.
    assert tokenizer.decode(tf.tokens.tolist()) == "".join(d + "<|endoftext|>" for d in DOCS)


@pytest.mark.slow
def test_byte_identical_across_worker_counts(tokenizer_dir: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", DOCS * 3)
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}.bin"
        pack(tokenizer_dir, [src], out, workers=workers, chunk_chars=500, progress=False,
             val_out=tmp_path / f"w{workers}.val.bin", val_fraction=0.1)
        outs.append((out.read_bytes(), (tmp_path / f"w{workers}.val.bin").read_bytes()))
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0][1]) > 0


def test_val_split_is_disjoint_and_complete(tokenizer: Tokenizer, tokenizer_dir: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", DOCS)
    meta = pack(tokenizer_dir, [src], tmp_path / "t.bin", val_out=tmp_path / "v.bin", val_fraction=0.2,
                chunk_chars=300, progress=False)
    train, val = TokenFile(tmp_path / "t.bin"), TokenFile(tmp_path / "v.bin")
    assert meta["documents"] + meta["val"]["documents"] == len(DOCS)
    assert 0 < val.meta["documents"] < len(DOCS) // 2
    docs = lambda tf: tokenizer.decode(tf.tokens.tolist()).split("<|endoftext|>")[:-1]  # noqa: E731
    assert sorted(docs(train) + docs(val)) == sorted(DOCS)
    assert val.meta["split"] == "val" and train.meta["split"] == "train"


def test_val_input_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", DOCS[:50])
    held = _jsonl(tmp_path / "held.jsonl", DOCS[50:])
    meta = pack(tokenizer_dir, [src], tmp_path / "t.bin", val_out=tmp_path / "v.bin", val_inputs=[held],
                progress=False)
    assert (meta["documents"], meta["val"]["documents"]) == (50, 10)
    assert TokenFile(tmp_path / "v.bin").meta["sources"][0]["path"] == str(held)


def test_bad_records_skipped_and_reported(tokenizer_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    src = _jsonl(tmp_path / "a.jsonl", DOCS[:5], extra=b'{"text": 1}\n{"text": "\xff"}\n{"tex\n' + b'{"text": "end"}')
    rc = main(["data", "pack", "--tokenizer", str(tokenizer_dir), "--input", str(src), "--out",
               str(tmp_path / "o.bin"), "--workers", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert f"{src}:6: wrong type" in err and f"{src}:7: invalid UTF-8" in err and f"{src}:8: invalid JSON" in err
    assert "3 bad records" in out
    tf = TokenFile(tmp_path / "o.bin")
    assert tf.meta["documents"] == 6 and tf.meta["bad_records"] == 3
    assert tf.meta["sources"][0] == {"path": str(src), "bytes": src.stat().st_size, "records": 9, "documents": 6,
                                     "bad": 3}


def test_parquet_input_and_custom_field(tokenizer: Tokenizer, tokenizer_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCS[:3], "other": [1, 2, 3]}), p)
    pack(tokenizer_dir, [p], tmp_path / "o.bin", text_field="content", progress=False)
    assert TokenFile(tmp_path / "o.bin").tokens.tolist() == \
        [t for d in DOCS[:3] for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def test_cli_errors(tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["data", "pack", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o.bin"), "--quiet"]
    assert main(args + ["--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert main(args + ["--input", str(empty)]) == 1
    assert "no documents" in capsys.readouterr().err
    assert main(["data", "pack", "--tokenizer", str(tmp_path), "--input", str(empty), "--out",
                 str(tmp_path / "x.bin")]) == 2
    assert main(args + ["--input", str(empty), "--val-fraction", "1.5"]) == 2
    assert main(args + ["--input", str(empty), "--workers", "0"]) == 2
    assert main(args + ["--input", str(empty), "--out", str(empty)]) == 2  # would overwrite its input
    assert "also an input" in capsys.readouterr().err and empty.read_bytes() == b""


def test_token_file_windows_and_pickle(tokenizer_dir: Path, tmp_path: Path) -> None:
    pack(tokenizer_dir, [_jsonl(tmp_path / "a.jsonl", DOCS)], tmp_path / "o.bin", progress=False)
    tf = TokenFile(tmp_path / "o.bin")
    ds = TokenWindows(tf, seq_len=16)
    assert len(ds) == (len(tf) - 1) // 16
    w = ds[1]
    assert w.dtype == np.int64 and w.shape == (17,)
    assert w.tolist() == tf.tokens[16:33].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 2000  # the memmap is reopened, not copied
    assert clone[1].tolist() == w.tolist()


def test_token_file_checks_size(tokenizer_dir: Path, tmp_path: Path) -> None:
    pack(tokenizer_dir, [_jsonl(tmp_path / "a.jsonl", DOCS[:3])], tmp_path / "o.bin", progress=False)
    with open(tmp_path / "o.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="meta says"):
        TokenFile(tmp_path / "o.bin")
    with pytest.raises(FileNotFoundError, match="meta"):
        TokenFile(tmp_path / "a.jsonl")


def test_dtype_choice() -> None:
    assert token_dtype(6400) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_report_object_collects(tokenizer_dir: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", DOCS[:2], extra=b'{"text": ""}\n')
    rep = BadRecordReport(max_shown=0)
    pack(tokenizer_dir, [src], tmp_path / "o.bin", progress=False, report=rep)
    assert rep.by_reason == {"empty text": 1}


def test_synthetic_bench_corpus_is_deterministic(tmp_path: Path) -> None:
    from matelike.bench.corpus import write_corpus

    n = write_corpus(tmp_path / "a.jsonl", 50_000, seed=1)
    write_corpus(tmp_path / "b.jsonl", 50_000, seed=1)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == n and (tmp_path / "a.jsonl").stat().st_size >= 50_000
    assert all(json.loads(line)["text"] for line in lines)


@pytest.mark.slow
def test_bench_pack_prints_one_json_line(tokenizer_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    rc = main(["bench", "pack", "--mb", "0.2", "--workers", "1", "--tokenizer", str(tokenizer_dir),
               "--tmp-dir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "pack" and result["mb_per_s"] > 0 and result["tokens"] > 0
    assert result["peak_rss_mb"] > 0
    assert result["encode_only_mb_per_s"] > 0 and result["encode_only_mb_per_cpu_s"] > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_reading_runs_at_most_two_chunks_per_worker_ahead(tokenizer: Tokenizer, tokenizer_dir: Path,
                                                          workers: int) -> None:
    from matelike.data.pack import _ordered_map

    consumed = []

    def chunks():
        for i in range(20):
            consumed.append(i)
            yield 0, [f"文档{i}"], 0

    it = _ordered_map(tokenizer_dir, tokenizer, chunks(), np.dtype(np.uint16), workers)
    first_chunk, arr = next(it)
    assert first_chunk[1] == ["文档0"] and arr.tolist() == tokenizer.encode("文档0") + [tokenizer.eos_id]
    assert len(consumed) <= 2 * workers  # memory is bounded by the chunks in flight, not the input size
    assert len(list(it)) == 19


def test_big_integer_surrogate_and_oversized_records_skipped(tokenizer: Tokenizer, tokenizer_dir: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each used to stop the whole run (a traceback-free ValueError, `surrogates not allowed`) writing nothing."""
    extra = (b'{"text": "ok", "n": ' + b"1" * 5000 + b"}\n" + json.dumps({"text": "\ud800x"}).encode() + b"\n"
             + b'{"text": "' + b"y" * 6001 + b'"}\n' + b'{"text": "end"}\n')
    src = _jsonl(tmp_path / "a.jsonl", DOCS[:3], extra=extra)
    rc = main(["data", "pack", "--tokenizer", str(tokenizer_dir), "--input", str(src), "--out",
               str(tmp_path / "o.bin"), "--quiet", "--max-record-bytes", "6000"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert f"{src}:4: invalid JSON: integer too long" in err
    assert f"{src}:5: invalid Unicode: lone surrogate" in err
    assert f"{src}:6: record too large" in err
    tf = TokenFile(tmp_path / "o.bin")
    assert tf.meta["documents"] == 4 and tf.meta["bad_records"] == 3
    assert tf.tokens.tolist() == [t for d in DOCS[:3] + ["end"] for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def test_no_usable_record_exits_1_and_writes_nothing(tokenizer_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(json.dumps({"text": "\ud800"}).encode() + b'\n{"text": 3}\n')
    rc = main(["data", "pack", "--tokenizer", str(tokenizer_dir), "--input", str(src), "--out",
               str(tmp_path / "o.bin"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"no documents packed: no usable record in {src} (2 records read, 2 bad records" in err
    assert not list(tmp_path.glob("o.bin*"))
    with pytest.raises(ValueError, match="no usable record"):
        pack(tokenizer_dir, [src], tmp_path / "o.bin", progress=False, report=BadRecordReport(max_shown=0))
