"""records.py: streaming readers for jsonl/parquet/csv/txt and the bad-record report."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from matelike.data.records import BadRecord, BadRecordReport, DataFileError, expand_inputs, iter_records


def _read(path: Path) -> list[tuple[int, dict | BadRecord]]:
    return list(iter_records(path))


def test_jsonl_good_and_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        b'{"text": "one"}\n'
        b'{"text": "tru\n'  # truncated line
        b'[1, 2]\n'
        b'"just a string"\n'
        b'{"text": "bad \xff byte"}\n'
        b'\n'
        b'{"text": "two"}\n'
    )
    recs = _read(p)
    good = [(n, r) for n, r in recs if not isinstance(r, BadRecord)]
    bad = {n: r for n, r in recs if isinstance(r, BadRecord)}
    assert good == [(1, {"text": "one"}), (7, {"text": "two"})]
    assert str(bad[2]).startswith(f"{p}:2: invalid JSON: Unterminated string")
    assert str(bad[3]) == f"{p}:3: not an object: got a JSON array"
    assert str(bad[4]) == f"{p}:4: not an object: got a JSON string"
    assert str(bad[5]) == f"{p}:5: invalid UTF-8: byte 0xff at column 15"
    assert bad[5].kind == "invalid UTF-8" and bad[2].kind == "invalid JSON"
    assert 6 not in bad  # a blank line is not a record


def test_jsonl_bom_crlf_and_no_final_newline(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b\\r\\n"}\r\n{"text": "c"}')
    assert _read(p) == [(1, {"text": "a"}), (2, {"text": "b\r\n"}), (3, {"text": "c"})]


def test_empty_files(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.txt", "e.csv"):
        (tmp_path / name).write_bytes(b"")
        assert _read(tmp_path / name) == []
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf")
    assert _read(tmp_path / "bom.jsonl") == []


def test_txt_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.txt"
    p.write_bytes("\ufeff第一行\r\n\n \u3000\n第二行 \n\xff\n末行".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    recs = _read(p)
    assert recs[:2] == [(1, {"text": "第一行"}), (4, {"text": "第二行 "})]
    assert isinstance(recs[2][1], BadRecord) and recs[2][0] == 5
    assert recs[3] == (6, {"text": "末行"})


def test_csv(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_bytes(
        b'\xef\xbb\xbfprompt,response\r\n'
        b'"hi, there","multi\nline"\r\n'
        b'only one column\r\n'
        b'ok,\xff\r\n'
        b'last,row'
    )
    recs = _read(p)
    assert recs[0] == (2, {"prompt": "hi, there", "response": "multi\nline"})
    assert str(recs[1][1]) == f"{p}:4: wrong number of columns: 1, header has 2"
    assert str(recs[2][1]) == f"{p}:5: invalid UTF-8 in CSV row"
    assert recs[3] == (6, {"prompt": "last", "response": "row"})


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), p, row_group_size=2)
    assert _read(p) == [(1, {"text": "a", "n": 1}), (2, {"text": None, "n": 2}), (3, {"text": "c", "n": 3})]
    assert list(iter_records(p, columns=["text"]))[0] == (1, {"text": "a"})
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match="bad.parquet: cannot read parquet"):
        _read(bad)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="missing.jsonl: no such file"):
        _read(tmp_path / "missing.jsonl")
    (tmp_path / "x.docx").write_bytes(b"")
    with pytest.raises(DataFileError, match="unknown file type"):
        _read(tmp_path / "x.docx")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataFileError, match="is a directory"):
        _read(tmp_path / "dir.jsonl")


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.txt", "sub/c.parquet", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    assert expand_inputs([tmp_path]) == [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "sub/c.parquet"]
    with pytest.raises(DataFileError, match="no such file"):
        expand_inputs([tmp_path / "nope.jsonl"])


def test_report_caps_output_and_counts() -> None:
    buf = io.StringIO()
    rep = BadRecordReport(max_shown=2, stream=buf)
    for i in range(5):
        rep.add(BadRecord("f.jsonl", i + 1, "invalid JSON: x"))
    rep.add(BadRecord("g.jsonl", 1, "missing field: 'text'"))
    lines = buf.getvalue().splitlines()
    assert lines == ["f.jsonl:1: invalid JSON: x", "f.jsonl:2: invalid JSON: x",
                     "f.jsonl: more bad records not shown (first 2 listed)", "g.jsonl:1: missing field: 'text'"]
    assert rep.total == 6 and rep.by_reason == {"invalid JSON": 5, "missing field": 1}
    assert rep.summary() == "6 bad records (invalid JSON: 5, missing field: 1)"
    assert BadRecordReport().summary() == "no bad records"


def test_csv_long_field(tmp_path: Path) -> None:
    p = tmp_path / "long.csv"
    long_text = "长" * 300_000  # beyond the csv module's default 128 KiB field limit
    p.write_text(f"text\n{long_text}\n", encoding="utf-8")
    assert _read(p) == [(2, {"text": long_text})]


def test_json_array_file_gives_records_with_their_start_lines(tmp_path):
    from matelike.data.records import BadRecord, iter_records

    p = tmp_path / "alpaca.json"
    p.write_text('[\n  {"instruction": "你好", "input": "", "output": "你好！"},\n  3,\n'
                 '  {"instruction": "a",\n   "output": "b"}\n]\n', encoding="utf-8")
    got = list(iter_records(p))
    assert got[0] == (2, {"instruction": "你好", "input": "", "output": "你好！"})
    assert isinstance(got[1][1], BadRecord) and str(got[1][1]) == f"{p}:3: not an object: got a JSON number"
    assert got[2] == (4, {"instruction": "a", "output": "b"})
    assert len(got) == 3


def test_json_array_truncated_or_invalid_utf8_names_the_line(tmp_path):
    from matelike.data.records import BadRecord, iter_records

    p = tmp_path / "cut.json"
    p.write_text('[\n {"a": 1},\n {"a": 2', encoding="utf-8")
    got = list(iter_records(p))
    assert got[0] == (2, {"a": 1})
    assert isinstance(got[1][1], BadRecord) and str(got[1][1]).startswith(f"{p}:3: invalid JSON")
    q = tmp_path / "bad.json"
    q.write_bytes(b'[\n {"a": 1},\n {"a": "\xff"}\n]')
    (line, bad), = list(iter_records(q))
    assert line == 3 and isinstance(bad, BadRecord) and "invalid UTF-8" in bad.reason


def test_json_file_with_one_object_per_line_reads_as_jsonl(tmp_path):
    from matelike.data.records import iter_records

    p = tmp_path / "lines.json"
    p.write_text('{"text": "一"}\n{"text": "二"}\n', encoding="utf-8")
    assert [r for _, r in iter_records(p)] == [{"text": "一"}, {"text": "二"}]
