"""`matelike model info`, `matelike generate` and `matelike bench generate` from the command line."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from matelike.cli import main
from matelike.generate import encode_prompt
from matelike.model.generation import default_stop_ids, generate, stream_text
from matelike.model.io import save_model
from matelike.model.transformer import ModelConfig, Transformer
from matelike.sampling import GREEDY


def test_model_info_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", "--preset", "26m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == info["active_params"] == 26_878_464
    assert info["weights_mb"]["fp16"] == pytest.approx(26_878_464 * 2 / 1e6, abs=0.1)
    assert main(["model", "info", "--preset", "tiny-moe"]) == 0
    text = capsys.readouterr().out
    assert "active parameters" in text and "fp32" in text and "bf16" in text and "MFLOP" in text
    assert main(["model", "info", "--preset", "26m-moe", "--json"]) == 0
    moe = json.loads(capsys.readouterr().out)
    assert moe["active_params"] < moe["params"]


def test_model_info_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", "--preset", "7b"]) == 2
    assert "unknown preset" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=48, max_seq_len=128, init_std=0.2))
    out = tmp_path_factory.mktemp("model")
    save_model(model, tokenizer, out)
    return out


def expected_text(model_dir: Path, ids: list[int], n: int) -> str:
    from matelike.model.io import load_model

    model, tok = load_model(model_dir)
    out = generate(model, [ids], max_new_tokens=n, sampling=GREEDY, stop_ids=default_stop_ids(tok))[0]
    return "".join(stream_text(tok, iter(out)))


def test_prompt_is_encoded_exactly_as_auto_tokenizer(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(model_dir)
    for text in ["今天天气很好", "Hello, world!", "  spaced  ", "<|im_start|>user"]:
        assert encode_prompt(model_dir, text) == auto(text)["input_ids"]


def test_generate_prints_the_greedy_continuation(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The reference runs first: on a CPU with AMX the first forward of a process took other kernels than the later
    # ones, and this random model's greedy path has near-ties (a 0.005 logit margin) that such rounding flips.
    # fp32 as the reference: --dtype auto loads bf16 weights there, a different model's greedy text.
    expected = expected_text(model_dir, encode_prompt(model_dir, "今天天气"), 12)
    rc = main(["generate", "--model", str(model_dir), "--prompt", "今天天气", "--temperature", "0",
               "--max-new-tokens", "12", "--dtype", "fp32"])
    assert rc == 0
    assert capsys.readouterr().out == expected + "\n"
    # --top-k 1 is greedy too, whatever the temperature
    assert main(["generate", "--model", str(model_dir), "--prompt", "今天天气", "--top-k", "1",
                 "--temperature", "1.5", "--max-new-tokens", "12", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_compile_flag_runs_the_decode_steps_through_torch_compile(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wiring, without paying a compilation: torch.compile is replaced by a recorder that returns the model.
    args = ["generate", "--model", str(model_dir), "--prompt", "今天天气", "--top-k", "1", "--max-new-tokens", "6",
            "--dtype", "fp32"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    compiled: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(kw) or m)
    assert main(args + ["--compile"]) == 0
    assert compiled == [{"dynamic": True}] and capsys.readouterr().out == eager


def test_generate_reads_the_prompt_from_stdin(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("北京是\n".encode("utf-8"))))
    assert main(["generate", "--model", str(model_dir), "--prompt", "-", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected_text(model_dir, encode_prompt(model_dir, "北京是"), 6) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad")))
    assert main(["generate", "--model", str(model_dir), "--prompt", "-"]) == 2
    assert "<stdin>" in capsys.readouterr().err


def test_generate_chat_with_system_turn(model_dir: Path, capsys: pytest.CaptureFixture[str], tokenizer) -> None:
    rc = main(["generate", "--model", str(model_dir), "--prompt", "你好", "--chat", "--system", "你是助手",
               "--temperature", "0", "--max-new-tokens", "8"])
    assert rc == 0
    ids = tokenizer.encode_chat(
        [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}], add_generation_prompt=True
    )[0]
    assert capsys.readouterr().out == expected_text(model_dir, ids, 8) + "\n"


def test_generate_usage_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--system", "x"]) == 2
    assert "--chat" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", ""]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 1
    assert "config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "天" * 400]) == 2
    assert "context" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_generate_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "generate", "--preset", "tiny", "--prompt-len", "8", "--new-tokens", "16", "--repeats", "3",
               "--batch-sizes", "1,2", "--memory-preset", "tiny", "--llama-cpp", "f32,q8_0"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    for side in ("ours", "transformers"):
        assert res[side]["decode_tok_s_b1"] > 0 and res[side]["prefill_tok_s_b2"] > 0
    assert res["ratio"]["decode_tok_s_b1"] > 0
    # The matrix products alone are part of every decode step, so they bound its speed from above (timed
    # separately on a shared machine: a margin for noise, still far below a bound measured on the wrong thing).
    assert res["matmul_floor_tok_s_b1"] > 0.8 * res["ours"]["decode_tok_s_b1"]
    assert res["matmul_in_step_tok_s_b1"] > 0.8 * res["ours"]["decode_tok_s_b1"]
    assert res["ratio"]["matmul_floor_b1"] == pytest.approx(
        res["matmul_floor_tok_s_b1"] / res["transformers"]["decode_tok_s_b1"], abs=0.01)
    # --quantize int8 (on by default here): its own speeds, its own product ceiling, its own ratios.
    int8 = res["ours_int8"]
    assert int8["decode_tok_s_b1"] > 0 and int8["prefill_tok_s_b2"] > 0
    assert int8["matmul_floor_tok_s_b1"] > 0.8 * int8["decode_tok_s_b1"]
    assert int8["matmul_in_step_tok_s_b1"] > 0.8 * int8["decode_tok_s_b1"]
    assert res["ratio_int8"]["decode_tok_s_b1"] == pytest.approx(
        int8["decode_tok_s_b1"] / res["transformers"]["decode_tok_s_b1"], abs=0.01)
    if "skipped" in res["llama_cpp"]:
        assert "llama-cpp-python is not installed" in res["llama_cpp"]["skipped"]
    else:  # the same directory in llama.cpp, exported to GGUF: q8_0 is about a quarter of f32
        assert set(res["llama_cpp"]) == {"f32", "q8_0"}
        assert 0.2 < res["llama_cpp"]["q8_0"]["file_mb"] / res["llama_cpp"]["f32"]["file_mb"] < 0.5
        for outtype, figures in res["llama_cpp"].items():
            assert figures["decode_tok_s_b1"] > 0 and figures["prefill_tok_s_b1"] > 0
            assert res["ratio_vs_llama_cpp"][f"decode_tok_s_b1_{outtype}"] == pytest.approx(
                res["ours"]["decode_tok_s_b1"] / figures["decode_tok_s_b1"], abs=0.01)
            assert res["ratio_vs_llama_cpp"][f"int8_decode_tok_s_b1_{outtype}"] == pytest.approx(
                int8["decode_tok_s_b1"] / figures["decode_tok_s_b1"], abs=0.01)
    for dtype in ("float16", "bfloat16"):
        assert res["memory"][dtype]["weights_mb"] == pytest.approx(res["memory"]["params"] * 2 / 1e6, abs=0.1)
        assert res["memory"][dtype]["peak_generate_mb"] >= res["memory"][dtype]["peak_load_mb"] >= 0
        assert res["memory"][dtype]["load_anon_mb"] >= 0


def test_matmul_in_step_times_only_decode_products_and_removes_its_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    import matelike.bench.generate as bench
    from matelike.model.transformer import Transformer, get_preset

    model = Transformer(get_preset("tiny", vocab_size=64)).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ticks = iter(range(10**6))
    # Every perf_counter call advances a millisecond: each timed Linear call then lasts exactly 1 ms, so the
    # figure is (decode steps) / (decode Linear calls x 1 ms) = 1000 / number of Linear modules, whatever the
    # machine.
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks) / 1000)
    assert bench.matmul_in_step_tok_s(model, [1, 2, 3, 4], new_tokens=6) == round(1000 / len(linears), 1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in linears)


def test_bench_generate_without_llama_cpp_says_why(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import matelike.bench.generate as bench

    monkeypatch.setattr(bench, "_import_llama_cpp", lambda: None)
    assert main(["bench", "generate", "--preset", "tiny", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1",
                 "--batch-sizes", "1", "--memory-preset", "", "--skip-transformers", "--no-int8"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["llama_cpp"] == {"skipped": bench.LLAMA_CPP_MISSING}
    assert "ours_int8" not in json.loads(captured.out)
    assert "llama-cpp-python is not installed" in captured.err
    assert main(["bench", "generate", "--preset", "tiny", "--llama-cpp", "f32,q4"]) == 2
    assert "--llama-cpp q4: choose outtypes from" in capsys.readouterr().err


def test_bench_decode_speed_too_short_to_time_is_none_not_absurd(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from matelike.bench import generate

    # A clock that moves only when a run says so: the figures follow from the durations alone, not from how
    # busy the machine is.
    now = [0.0]
    monkeypatch.setattr(generate, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def advance(seconds: float) -> None:
        now[0] += seconds

    # A decode that "takes" less than its prefill (timing noise) must not become a speed of 1e10 tokens/s.
    res = generate._speeds(lambda b, n: advance(0.01 if n == 1 else 0.0), [1], prompt_len=8, new=4, repeats=3)
    assert res["decode_tok_s_b1"] is None and res["prefill_tok_s_b1"] == 800.0
    # Prefill 2 ms, each further token 2 ms: 4 new tokens in 8 ms are 500 tokens/s, batch 2 twice that.
    res = generate._speeds(lambda b, n: advance(0.002 * n), [1, 2], prompt_len=8, new=4, repeats=3)
    assert res["decode_tok_s_b1"] == pytest.approx(500.0) and res["decode_tok_s_b2"] == pytest.approx(1000.0)
    assert res["prefill_tok_s_b1"] == pytest.approx(4000.0)
