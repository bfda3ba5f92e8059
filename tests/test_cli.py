"""The `matelike` command itself: a damaged model directory is one line naming the file in every command."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from matelike.cli import main


@pytest.fixture(scope="module")
def truncated_dir(make_chat_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat model directory whose model.safetensors lost its last bytes (an interrupted copy)."""
    d = Path(shutil.copytree(make_chat_model(), tmp_path_factory.mktemp("damaged") / "model"))
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid inputs for the commands' other flags, so the model directory is the only problem."""
    root = tmp_path_factory.mktemp("inputs")
    files = {
        "sft": {"prompt": "你好", "response": "你好！"},
        "pairs": {"prompt": "你好", "chosen": "你好！", "rejected": "不知道"},
        "val": {"text": "今天天气很好。"},
        "prompts": {"prompt": "你好", "answer": "你好！"},
    }
    out: dict[str, Path] = {}
    for name, record in files.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


# Exit codes: 1 from the one handler in matelike.cli.main (and generate's own); eval and chat catch the error
# themselves and say so with the usage-error code 2.
COMMANDS = {
    "sft": (1, lambda d, f, o: ["sft", "--init", d, "--data", f["sft"], "--out", o, "--max-steps", "1",
                                "--dtype", "fp32"]),
    "dpo": (1, lambda d, f, o: ["dpo", "--init", d, "--data", f["pairs"], "--out", o, "--max-steps", "1",
                                "--dtype", "fp32", "--no-progress"]),
    "dpo make-pairs": (1, lambda d, f, o: ["dpo", "make-pairs", "--model", d, "--data", f["prompts"], "--out", o]),
    "eval": (2, lambda d, f, o: ["eval", "--model", d, "--val", f["val"]]),
    "generate": (1, lambda d, f, o: ["generate", "--model", d, "--prompt", "你好"]),
    "chat": (2, lambda d, f, o: ["chat", "--model", d]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_damaged_model_dir_is_one_line_naming_the_file(command: str, truncated_dir: Path,
                                                       data_files: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # chat: a closed stdin, never reached
    code, argv = COMMANDS[command]
    args = [str(a) for a in argv(truncated_dir, data_files, tmp_path / "out")]
    assert main(args) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(truncated_dir / "model.safetensors") in lines[0] and "truncated" in lines[0]
    if code == 1:
        assert lines[0].startswith(f"matelike {command}: ")


def test_other_errors_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ModelDirError is the user's input; anything else is a bug and keeps its traceback."""
    import matelike.generate

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(matelike.generate, "_cmd_generate", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--model", "x", "--prompt", "y"])


def test_help_does_not_import_torch() -> None:
    """The handler recognises ModelDirError without importing matelike.model.io, so --help stays fast."""
    code = ("import sys\nfrom matelike.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
