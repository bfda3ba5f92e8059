"""`matelike chat`: history fitting, commands and Ctrl-C, in process and through a pipe."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from matelike.chat import ChatSession, Conversation, MessageTooLong

# One OpenMP thread for tiny models (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(make_chat_model) -> Path:
    return make_chat_model(max_seq_len=128)


# --- history fitting --------------------------------------------------------------------------------------------


def test_fit_keeps_everything_when_it_fits(tokenizer) -> None:
    conv = Conversation(system="你是助手。", turns=[("你好", "你好！"), ("天气？", "很好。")])
    fitted = conv.fit(tokenizer, "谢谢", context_len=512, max_new_tokens=32)
    assert fitted.dropped_turns == 0 and fitted.max_new_tokens == 32
    assert len(conv.turns) == 2
    text = tokenizer.decode(fitted.prompt_ids)
    assert text == tokenizer.apply_chat_template(conv.messages("谢谢"), add_generation_prompt=True)


def test_fit_drops_oldest_turns_first_and_keeps_the_system_prompt(tokenizer) -> None:
    turns = [(f"问题{i}：" + "今天天气很好。" * 3, f"回答{i}：" + "我们一起去公园散步吧。" * 2) for i in range(6)]
    conv = Conversation(system="你是助手。", turns=list(turns))
    # A context that holds exactly the last two turns, the new message and the answer budget.
    last_two = Conversation(system="你是助手。", turns=turns[-2:]).messages("最后的问题")
    context_len = len(tokenizer.encode_chat(last_two, add_generation_prompt=True)[0]) + 32
    fitted = conv.fit(tokenizer, "最后的问题", context_len=context_len, max_new_tokens=32)
    assert fitted.dropped_turns == 4
    assert len(fitted.prompt_ids) + 32 == context_len
    assert conv.turns == turns[4:]  # the newest turns survive, in order
    text = tokenizer.decode(fitted.prompt_ids)
    assert text.startswith("<|im_start|>system\n你是助手。")
    assert "最后的问题" in text and "问题3：" not in text and "问题4：" in text and "问题5：" in text


def test_fit_never_cuts_the_current_message(tokenizer) -> None:
    conv = Conversation(turns=[("a", "b")])
    long_message = "北京是中华人民共和国的首都。" * 30
    with pytest.raises(MessageTooLong, match="context holds 64"):
        conv.fit(tokenizer, long_message, context_len=64, max_new_tokens=8)
    assert conv.turns == [("a", "b")]  # a refused message changes nothing


def test_fit_shrinks_the_answer_budget_when_the_message_alone_is_long(tokenizer) -> None:
    conv = Conversation()
    message = "今天天气很好。" * 5
    n = len(tokenizer.encode_chat([{"role": "user", "content": message}], add_generation_prompt=True)[0])
    fitted = conv.fit(tokenizer, message, context_len=n + 3, max_new_tokens=50)
    assert fitted.max_new_tokens == 3 and len(fitted.prompt_ids) == n


# --- the session with a scripted stream ------------------------------------------------------------------------


class Recorder:
    """A stream function that records prompts and answers `答N`, `-`, `好` (N = the turn's number)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prompts: list[str] = []
        self.closed = 0

    def __call__(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[str]:
        self.prompts.append(self.tokenizer.decode(prompt_ids))
        n = len(self.prompts)

        def gen():
            try:
                yield from [f"答{n}", "-", "好"]
            finally:
                self.closed += 1

        return gen()


class CtrlCOnSecondWrite(io.StringIO):
    """An stdout where Ctrl-C arrives (once) while the second piece of text is being written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == 2:
            raise KeyboardInterrupt
        return super().write(text)


def _run(session: ChatSession, lines: list[str]) -> int:
    feed = iter(lines)

    def read() -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return session.run(read)


def test_session_history_and_commands(tokenizer) -> None:
    rec = Recorder(tokenizer)
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(tokenizer, rec, context_len=512, max_new_tokens=16, out=out, err=err)
    code = _run(session, ["你好", "  ", "天气如何", "/system 你是天气助手。", "明天呢", "/reset", "再见", "/bogus",
                          "/exit", "never read"])
    assert code == 0
    assert out.getvalue() == "答1-好\n答2-好\n答3-好\n答4-好\n"
    assert len(rec.prompts) == 4  # blank line skipped, nothing after /exit
    assert "你好" in rec.prompts[1] and "答1-好" in rec.prompts[1]  # second turn sees the first
    # /system starts a new conversation under the new system prompt
    assert rec.prompts[2].startswith("<|im_start|>system\n你是天气助手。") and "天气如何" not in rec.prompts[2]
    # /reset forgets the turns but keeps the system prompt
    assert "明天呢" not in rec.prompts[3] and "你是天气助手。" in rec.prompts[3]
    assert "unknown command /bogus" in err.getvalue()
    assert rec.closed == 4


def test_ctrl_c_stops_the_answer_not_the_session(tokenizer) -> None:
    rec = Recorder(tokenizer)
    out, err = CtrlCOnSecondWrite(), io.StringIO()
    session = ChatSession(tokenizer, rec, context_len=512, max_new_tokens=16, out=out, err=err)
    assert _run(session, ["你好", "还在吗"]) == 0
    assert "[stopped]" in err.getvalue()
    assert out.getvalue() == "答1\n答2-好\n"
    assert len(rec.prompts) == 2 and rec.closed == 2  # the stopped generator was closed
    assert session.conv.turns[0] == ("你好", "答1")  # the partial answer, as shown, stays in the history
    assert "答1<|im_end|>" in rec.prompts[1]


def test_generation_error_is_reported_not_swallowed(tokenizer) -> None:
    def broken(prompt_ids, max_new_tokens):
        yield "半"
        raise ValueError("cache full")

    session = ChatSession(tokenizer, broken, context_len=512, max_new_tokens=16, out=io.StringIO(),
                          err=io.StringIO())
    with pytest.raises(RuntimeError, match="cache full"):
        session.answer("你好")


def test_too_long_message_is_refused_and_the_session_goes_on(tokenizer) -> None:
    rec = Recorder(tokenizer)
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(tokenizer, rec, context_len=64, max_new_tokens=8, out=out, err=err)
    assert _run(session, ["北京是中华人民共和国的首都。" * 30, "你好"]) == 0
    assert "message too long" in err.getvalue()
    assert len(rec.prompts) == 1 and "你好" in rec.prompts[0]


# --- the real command through a pipe ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # One OpenMP thread: see conftest.one_torch_thread.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _chat_cmd(model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "matelike", "chat", "--model", str(model_dir), "--temperature", "0",
            "--max-new-tokens", "12", "--threads", "1", *extra]


@pytest.mark.slow
def test_chat_command_through_a_pipe(model_dir: Path, tokenizer) -> None:
    # The longest repetition that fits the 128-token context with the 12-token answer budget on its own:
    # with the earlier turn in front it cannot fit, so that turn must be dropped.
    k = 1
    while len(tokenizer.encode_chat([{"role": "user", "content": "今天天气很好。" * (k + 1)}],
                                    add_generation_prompt=True)[0]) + 12 <= 128:
        k += 1
    lines = ["你好", "/reset", "你好", "今天天气很好。" * k, "北京是中华人民共和国的首都。" * 40, "/system 你是助手。",
             "/exit", "这一行不会被读到"]
    proc = subprocess.run(_chat_cmd(model_dir), input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "[conversation cleared]" in proc.stderr
    assert "dropped 1 oldest turn(s)" in proc.stderr  # the long message pushes the first turn out of 128 tokens
    assert "message too long" in proc.stderr  # the far too long one is refused, not cut
    assert "[system prompt set: 你是助手。]" in proc.stderr
    # Greedy: the answer to "你好" after /reset repeats the fresh first answer, so the history was cleared.
    out = proc.stdout
    assert any(out[i - 1] == "\n" and out[i : 2 * i] == out[:i] for i in range(2, len(out) // 2 + 1)), out
    assert out.count("\n") >= 3  # three answers (the refused message got none)


@pytest.mark.slow
def test_chat_command_survives_ctrl_c(model_dir: Path) -> None:
    proc = subprocess.Popen(_chat_cmd(model_dir, "--max-new-tokens", "100"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        proc.stdin.write("你好\n")
        proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), True)
        proc.stdout.read(1)  # the answer has started
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.stdin.write("还在吗\n/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out.strip()  # the second message was answered after the interrupt


def test_chat_command_reports_a_bad_model_dir_or_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from matelike.cli import main

    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path), "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_command_in_process(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    from matelike.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n/system 简短回答。\n你好\n"))
    assert main(["chat", "--model", str(model_dir), "--temperature", "0.8", "--seed", "3",
                 "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") >= 2 and "[system prompt set: 简短回答。]" in captured.err


def test_chat_command_with_quantize_and_compile(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    # Both flags reach the model: int8 layers, and decode steps through torch.compile (a recorder here, so no
    # compilation is paid), the same compiled wrapper kind for every turn.
    import torch

    from matelike.cli import main
    from matelike.model.quantize import Int8Linear

    compiled: list[Any] = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n你是谁？\n"))
    assert main(["chat", "--model", str(model_dir), "--top-k", "1", "--max-new-tokens", "4", "--quantize", "int8",
                 "--compile"]) == 0
    assert len(compiled) == 2  # one engine per turn
    assert all(isinstance(m.lm_head, Int8Linear) for m in compiled) and compiled[0] is compiled[1]
    assert capsys.readouterr().out.count("\n") >= 2
