"""`matelike data check`: one PATH:LINE line per bad record, totals, exit codes 0/1/2, input untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from matelike.cli import main

BAD_JSONL = (
    b'\xef\xbb\xbf{"text": "first"}\r\n'   # 1 BOM + CRLF: good
    b'{"text": "tru\r\n'                   # 2 invalid JSON (truncated)
    b'[1]\n'                               # 3 not an object
    b'{"txt": "x"}\n'                      # 4 missing field
    b'{"text": 7}\n'                       # 5 wrong type
    b'{"text": "   "}\n'                   # 6 empty text
    b'{"text": "\xe4\xbd"}\n'              # 7 invalid UTF-8 (cut multibyte char)
    b'{"text": "first"}\n'                 # 8 duplicate of 1
    b'{"text": "last"}'                    # 9 good, no final newline
)


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main(["data", "check", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_all_bad_cases_named_by_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(BAD_JSONL)
    rc, out, _ = _run([str(p), "--json"], capsys)
    assert rc == 1
    lines = out.splitlines()
    for n, reason in [(2, "invalid JSON"), (3, "not an object"), (4, "missing field"), (5, "wrong type"),
                      (6, "empty text"), (7, "invalid UTF-8")]:
        assert any(line.startswith(f"{p}:{n}: {reason}") for line in lines), (n, reason)
    summary = json.loads(lines[-1])
    total = summary["total"]
    assert (total["records"], total["good"], total["bad"], total["duplicates"]) == (9, 3, 6, 1)
    assert total["chars"] == len("first") * 2 + len("last")
    assert total["bad_by_reason"] == {k: 1 for k in ("invalid JSON", "not an object", "missing field",
                                                     "wrong type", "empty text", "invalid UTF-8")}
    assert p.read_bytes() == BAD_JSONL  # never modified


def test_good_file_exit_0_and_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "你好"}\n{"text": "世界"}\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    rc, out, _ = _run([str(good), str(empty)], capsys)
    assert rc == 0
    assert "2 records, 2 good, 0 bad, 4 characters" in out
    assert "empty file" in out


def test_unreadable_file_exit_2_others_still_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n', encoding="utf-8")
    rc, out, err = _run([str(tmp_path / "missing.jsonl"), str(good)], capsys)
    assert rc == 2
    assert "missing.jsonl: no such file" in err and "1 good" in out


def test_at_most_20_shown_per_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "many.jsonl"
    p.write_bytes(b"{bad\n" * 30 + b'{"text": "ok"}\n')
    rc, out, _ = _run([str(p)], capsys)
    assert rc == 1
    assert sum(1 for line in out.splitlines() if re.match(rf"{re.escape(str(p))}:\d+: invalid JSON", line)) == 20
    assert "30 bad" in out and "1 good" in out


def test_sft_and_dpo_formats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps(o, ensure_ascii=False) for o in [
        {"prompt": "你好", "response": "你好！"},
        {"instruction": "翻译", "input": "cat", "output": "猫"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]) + "\n", encoding="utf-8")
    rc, out, _ = _run([str(sft), "--format", "sft"], capsys)
    assert rc == 1 and f"{sft}:3: empty text" in out and "3 good, 1 bad" in out
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n',
                   encoding="utf-8")
    rc, out, _ = _run([str(dpo)], capsys)  # auto-detects dpo from the first record
    assert rc == 1 and f"{dpo}:2: missing field: 'rejected'" in out and "format dpo" in out


def test_parquet_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["好", None, "", "ok"]}), pq_path)
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"prompt,response\r\nq,a\r\nq2,\r\nq3,\xff\r\n")
    rc, out, _ = _run([str(pq_path), str(csv_path)], capsys)
    assert rc == 1
    assert f"{pq_path}:2: missing field: 'text'" in out and f"{pq_path}:3: empty text" in out
    assert f"{csv_path}:3: empty text: field 'response'" in out
    assert f"{csv_path}:4: invalid UTF-8" in out
    assert "4 records, 2 good, 2 bad" in out and "3 records, 1 good, 2 bad" in out


def test_custom_field_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.jsonl").write_text('{"content": "x"}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("line one\nline two\n", encoding="utf-8")
    rc, out, _ = _run([str(tmp_path), "--field", "content"], capsys)
    # The txt file gives {"text": ...} records, which lack the custom field.
    assert rc == 1 and f"{tmp_path / 'b.txt'}:1: missing field: 'content'" in out
    rc, out, _ = _run([str(tmp_path / "a.jsonl"), "--field", "content"], capsys)
    assert rc == 0


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    # Bad flags and missing arguments give a usage message and exit 2 (argparse's convention).
    for argv in (["data", "check", "--format", "nope", "x.jsonl"], ["data", "check"], ["data", "nope"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "usage:" in capsys.readouterr().err


# Lines that once ended `data check` in a traceback (an integer too long for int()) or passed it as clean
# (a lone surrogate, written with ensure_ascii's escapes), then stopped `data pack`.
BIG_INT_LINE = b'{"text": "ok", "n": ' + b"1" * 5000 + b"}\n"
SURROGATE_LINE = json.dumps({"text": "\ud800x"}).encode() + b"\n"


def test_big_integer_and_lone_surrogate_are_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n' + BIG_INT_LINE + SURROGATE_LINE + b'{"text": "b"}\n')
    rc, out, _ = _run([str(p)], capsys)
    assert rc == 1
    assert f"{p}:2: invalid JSON: integer too long" in out
    assert f"{p}:3: invalid Unicode: lone surrogate U+D800 in field 'text'" in out
    assert "4 records, 2 good, 2 bad" in out


def test_max_record_bytes_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "short"}\n{"text": "' + b"x" * 100 + b'"}\n')
    assert _run([str(p)], capsys)[0] == 0
    rc, out, _ = _run([str(p), "--max-record-bytes", "50"], capsys)
    assert rc == 1 and f"{p}:2: record too large: 112 bytes, more than the limit of 50" in out
    assert _run([str(p), "--max-record-bytes", "0"], capsys)[0] == 2
