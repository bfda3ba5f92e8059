"""`matelike bench generate`: our decode/prefill speed against transformers' generate on the same directory.

The bench builds a randomly initialised model of the preset, saves it as a model directory in a
temporary folder, loads it back with both our loader and `AutoModelForCausalLM`, and times greedy
generation of random prompts (no stop tokens, so every run produces exactly the requested length).
Decode speed = new tokens / (time for prompt + N tokens - time for prompt + 1 token), so prefill is
excluded. `matmul_floor_tok_s_b1` is the batch-1 speed of the weight matrix products alone (torch's eager
kernels), the ceiling for an implementation of the model in that dtype that calls them
(`matmul_in_step_tok_s_b1`: the same products as timed inside our eager decode step, where they run slower
when the back-to-back loop found the weights in cache; a compiled step with frozen, pre-packed weights calls
other kernels and can pass it); `ratio.matmul_floor_b1` is that ceiling over transformers' decode speed.
`ours_int8` is our generate with `--quantize int8`, with the int8 kernel's own two ceilings. It also
reports the peak resident memory of loading the `0.2b` preset in fp16 and bf16, each measured in a fresh
subprocess. With llama-cpp-python installed, the `llama_cpp` column times llama.cpp at batch 1 on the same
directory exported to GGUF (`--llama-cpp` outtypes), with the same method and thread count; the directory then
carries a tokenizer trained in seconds, since a GGUF file holds the vocabulary. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from matelike.device import DTYPES, torch_dtype, training_dtype
from matelike.sampling import GREEDY

if TYPE_CHECKING:
    from matelike.cli import CommandTable


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _speeds(run: Callable[[int, int], Any], batch_sizes: list[int], prompt_len: int, new: int, repeats: int) -> dict:
    """run(batch, n_new) generates n_new tokens for `batch` prompts; returns tok/s figures.

    Decode time is the median over repeats of the paired difference (prompt + new+1 tokens) - (prompt + 1
    token), timed back to back; a run too short for the machine's noise (a difference of at most zero) is
    reported as None rather than as an absurd speed that would pass into a ratio unnoticed.
    """
    out: dict[str, float | None] = {}
    for b in batch_sizes:  # warm-up (allocator, thread pool, lazy imports, a compiled graph per batch size)
        run(b, 2)
    for b in batch_sizes:
        prefills, decodes = [], []
        for _ in range(repeats):
            t_prefill = _best_time(lambda: run(b, 1), 1)
            t_total = _best_time(lambda: run(b, new + 1), 1)
            prefills.append(t_prefill)
            decodes.append(t_total - t_prefill)
        decode = statistics.median(decodes)
        out[f"decode_tok_s_b{b}"] = round(b * new / decode, 1) if decode > 0 else None
        out[f"prefill_tok_s_b{b}"] = round(b * prompt_len / min(prefills), 1)
    return out


def matmul_floor_tok_s(model: Any, repeats: int = 50) -> float:
    """Decode tokens/s at batch 1 if a step did nothing but multiply one token by every weight matrix once.

    No implementation of the same model in the same dtype with torch's matrix kernels decodes faster than
    this on this machine: it bounds what any ratio against another implementation can be.
    """
    import torch
    import torch.nn.functional as F

    from matelike.model.quantize import Int8Linear

    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats]
    # An int8 model's products: the kernel its decode step calls, on bf16 rows.
    int8 = [(m.weight, m.scale) for m in model.modules() if isinstance(m, Int8Linear)]
    xs8 = [torch.randn(1, w.shape[1], dtype=torch.bfloat16) for w, _ in int8]

    def step() -> None:
        for x, w in zip(xs, mats):
            F.linear(x, w)
        for x, (w, s) in zip(xs8, int8):
            torch.ops.aten._weight_int8pack_mm(x, w, s)

    with torch.inference_mode():
        for _ in range(5):
            step()
        t = _best_time(lambda: [step() for _ in range(10)], repeats // 10 or 1) / 10
    return round(1.0 / t, 1)


def matmul_in_step_tok_s(model: Any, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s at batch 1 if a step took only the time its weight products take inside our real
    decode step (greedy `generate`, eager), timed around every nn.Linear call of one new token.

    The same products as `matmul_floor_tok_s`, but interleaved with the step's other work: on CPUs whose last
    level cache holds the whole model, back-to-back products find the weights hot and run faster than they do
    in the step, so this is the ceiling an implementation that keeps the step's layout can reach.
    """
    import torch

    from matelike.model.generation import generate
    from matelike.model.quantize import Int8Linear

    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    state = {"t0": 0.0, "total": 0.0, "calls": 0}

    def before(_module: Any, args: tuple) -> None:
        state["t0"] = time.perf_counter()

    def after(_module: Any, args: tuple, _out: Any) -> None:
        if args[0].shape[-2] == 1:  # a decode step's token, not a prefill chunk
            state["total"] += time.perf_counter() - state["t0"]
            state["calls"] += 1

    handles = [h for m in linears for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        generate(model, [prompt], max_new_tokens=new_tokens, sampling=GREEDY)  # warm-up
        state.update(total=0.0, calls=0)
        generate(model, [prompt], max_new_tokens=new_tokens, sampling=GREEDY)
    finally:
        for h in handles:
            h.remove()
    steps = state["calls"] / len(linears)
    return round(steps / state["total"], 1) if state["total"] > 0 else 0.0


def _proc_status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (Linux).

    VmHWM (peak resident set) belongs to the process image, so unlike getrusage's ru_maxrss it does not
    inherit the parent's peak across fork + exec.
    """
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_load_memory(model_dir: str, dtype_name: str) -> dict[str, float]:
    """Run in a fresh process: peak resident-set growth (MB) while loading, then after a short generation."""
    import torch

    from matelike.model.generation import generate
    from matelike.model.io import load_model

    base, base_anon = _proc_status_kb("VmRSS"), _proc_status_kb("RssAnon")  # imports done
    model, _ = load_model(model_dir, dtype=getattr(torch, dtype_name))
    loaded, loaded_anon = _proc_status_kb("VmHWM"), _proc_status_kb("RssAnon")
    generate(model, [[1, 2, 3, 4]], max_new_tokens=8, sampling=GREEDY)
    gen = _proc_status_kb("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "weights_mb": round(weights / 1e6, 1),
        # Growth of the peak resident set; it includes pages of torch's shared libraries run for the first time.
        "peak_load_mb": round((loaded - base) * 1024 / 1e6, 1),
        # Growth of anonymous memory (the process's own allocations: weights and anything else loading kept).
        "load_anon_mb": round((loaded_anon - base_anon) * 1024 / 1e6, 1),
        "peak_generate_mb": round((gen - base) * 1024 / 1e6, 1),
    }


def _memory(preset: str, tmp: Path) -> dict[str, Any]:
    import torch

    from matelike.model.io import save_model
    from matelike.model.transformer import Transformer, get_preset

    # Built straight in fp16: no 0.8 GB fp32 copy of the 0.2b model.
    model = Transformer(get_preset(preset), device="meta", dtype=torch.float16).to_empty(device="cpu")
    model.init_weights()
    n_params = model.num_params()
    save_model(model, None, tmp / preset)
    del model
    out: dict[str, Any] = {"preset": preset, "params": n_params}
    for dtype in ("float16", "bfloat16"):
        code = (
            "import json; from matelike.bench.generate import peak_load_memory; "
            f"print(json.dumps(peak_load_memory({str(tmp / preset)!r}, {dtype!r})))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[dtype] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


LLAMA_CPP_MISSING = ("llama-cpp-python is not installed, so no llama.cpp column (bash .ci/llama-cpp.sh builds it once; "
                     "--llama-cpp '' skips it)")


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _llama_cpp_speeds(llama_cpp: Any, tmp: Path, outtypes: list[str], prompt: list[int],
                      args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 prefill and greedy decode of the same directory exported to GGUF in each outtype, timed by the same
    `_speeds` as ours, in llama.cpp through llama-cpp-python with as many threads as torch uses."""
    import numpy as np
    import torch

    from matelike.export.gguf import ExportError, export_gguf

    out: dict[str, Any] = {}
    for outtype in outtypes:
        t0 = time.perf_counter()
        try:
            exported = export_gguf(tmp / "model", tmp / f"model-{outtype}.gguf", outtype)
        except ExportError as e:  # a layout llama.cpp lacks (say, a shared expert): the reason, not a figure
            return {"skipped": str(e)}
        export_s = time.perf_counter() - t0
        llm = llama_cpp.Llama(model_path=str(exported.path), n_ctx=len(prompt) + args.new_tokens + 8,
                              n_batch=max(len(prompt), 8), n_threads=torch.get_num_threads(), logits_all=False,
                              verbose=False)
        n_vocab = llm.n_vocab()

        def next_token() -> int:
            # The last position's logits straight from the context (llama-cpp-python keeps none without
            # logits_all): greedy, as ours.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            return int(logits.argmax())

        def run_llama(b: int, n: int) -> list[int]:
            llm.reset()
            llm.eval(prompt)
            tokens = [next_token()]
            while len(tokens) < n:
                llm.eval(tokens[-1:])
                tokens.append(next_token())
            return tokens

        out[outtype] = {**_speeds(run_llama, [1], len(prompt), args.new_tokens, args.repeats),
                        "file_mb": round(exported.n_bytes / 1e6, 1), "export_s": round(export_s, 2)}
        llm.close()
    return out


def _ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """ours / theirs for every speed both have (a None speed has no ratio)."""
    return {k: round(ours[k] / theirs[k], 2) for k in ours if ours[k] and theirs.get(k)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from matelike.model.generation import generate
    from matelike.model.io import load_model, save_model
    from matelike.model.transformer import Transformer, get_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dtype_name = training_dtype(args.dtype, torch.device("cpu"))
    result: dict[str, Any] = {
        "bench": "generate",
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "compile": args.compile,
    }
    with tempfile.TemporaryDirectory(prefix="matelike-bench-") as tmp_name:
        tmp = Path(tmp_name)
        dtype = torch_dtype(dtype_name)
        outtypes = [t for t in args.llama_cpp.split(",") if t]
        from matelike.export.gguf import OUTTYPES

        unknown = [t for t in outtypes if t not in OUTTYPES]
        if unknown:
            raise ValueError(f"--llama-cpp {','.join(unknown)}: choose outtypes from {', '.join(OUTTYPES)}")
        llama_cpp = _import_llama_cpp() if outtypes else None
        tokenizer = None
        if llama_cpp is not None:  # a GGUF file carries the vocabulary: train a stand-in (seconds)
            from matelike.bench.serve import train_bench_tokenizer

            tokenizer = train_bench_tokenizer(tmp, get_preset(args.preset).vocab_size)
        save_model(Transformer(get_preset(args.preset)).to(dtype), tokenizer, tmp / "model")
        ours, _ = load_model(tmp / "model")
        vocab = ours.config.vocab_size
        prompts = torch.randint(0, vocab, (max(batch_sizes), args.prompt_len), generator=torch.Generator().manual_seed(1))

        def run_ours(b: int, n: int) -> Any:
            return generate(ours, prompts[:b].tolist(), max_new_tokens=n, sampling=GREEDY, compile=args.compile)

        result["ours"] = _speeds(run_ours, batch_sizes, args.prompt_len, args.new_tokens, args.repeats)
        if not ours.config.is_moe:
            result["matmul_floor_tok_s_b1"] = matmul_floor_tok_s(ours)
            result["matmul_in_step_tok_s_b1"] = matmul_in_step_tok_s(ours, prompts[0].tolist(), args.new_tokens)
        if args.int8:
            int8, _ = load_model(tmp / "model", quantize="int8")

            def run_int8(b: int, n: int) -> Any:
                return generate(int8, prompts[:b].tolist(), max_new_tokens=n, sampling=GREEDY, compile=args.compile)

            result["ours_int8"] = _speeds(run_int8, batch_sizes, args.prompt_len, args.new_tokens, args.repeats)
            if not int8.config.is_moe:
                result["ours_int8"]["matmul_floor_tok_s_b1"] = matmul_floor_tok_s(int8)
                result["ours_int8"]["matmul_in_step_tok_s_b1"] = matmul_in_step_tok_s(
                    int8, prompts[0].tolist(), args.new_tokens)
            del int8
        if not args.skip_transformers:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            hf = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=dtype).eval()

            def run_hf(b: int, n: int) -> Any:
                ids = prompts[:b]
                with torch.inference_mode():
                    return hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=n,
                        do_sample=False,
                        pad_token_id=0,
                    )

            result["transformers"] = _speeds(run_hf, batch_sizes, args.prompt_len, args.new_tokens, args.repeats)
            result["ratio"] = _ratios(result["ours"], result["transformers"])
            if "ours_int8" in result:
                result["ratio_int8"] = _ratios(result["ours_int8"], result["transformers"])
            # The highest decode ratio any implementation could print.
            if "matmul_floor_tok_s_b1" in result and result["transformers"].get("decode_tok_s_b1"):
                result["ratio"]["matmul_floor_b1"] = round(
                    result["matmul_floor_tok_s_b1"] / result["transformers"]["decode_tok_s_b1"], 2)
        if outtypes and llama_cpp is None:
            result["llama_cpp"] = {"skipped": LLAMA_CPP_MISSING}
            print(f"matelike bench generate: {LLAMA_CPP_MISSING}", file=sys.stderr)
        elif outtypes:
            result["llama_cpp"] = _llama_cpp_speeds(llama_cpp, tmp, outtypes, prompts[0].tolist(), args)
            # ours (and ours in int8, the counterpart of q8_0) over llama.cpp's batch-1 decode, per outtype.
            result["ratio_vs_llama_cpp"] = {
                f"{prefix}decode_tok_s_b1_{t}": round(mine["decode_tok_s_b1"] / r["decode_tok_s_b1"], 2)
                for prefix, mine in (("", result["ours"]), ("int8_", result.get("ours_int8", {})))
                for t, r in result["llama_cpp"].items() if isinstance(r, dict) and r.get("decode_tok_s_b1")
                and mine.get("decode_tok_s_b1")
            }
        if args.memory_preset:
            result["memory"] = _memory(args.memory_preset, tmp)
    return result


def _cmd(args: argparse.Namespace) -> int:
    try:
        result = run_bench(args)
    except ValueError as e:
        print(f"matelike bench generate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


def add_cli(table: CommandTable) -> None:
    p = table.group_command(
        "bench", "generate", "decode/prefill tokens/s, ours vs transformers, and 0.2b load memory (one JSON line)", _cmd
    )
    p.add_argument("--preset", default="26m", help="model preset to time (default 26m)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="decode tokens timed per run")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="best of N runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype of the saved directory, used by both sides (auto as matelike.device picks "
                        "it for the CPU)")
    p.add_argument("--memory-preset", default="0.2b", help="preset whose fp16/bf16 load memory is measured ('' = skip)")
    p.add_argument("--skip-transformers", action="store_true", help="time only our generate")
    p.add_argument("--compile", action="store_true",
                   help="our decode steps through torch.compile (the warm-up run pays the compilation)")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip the `ours_int8` column: our generate with --quantize int8 (weight-only int8)")
    p.add_argument("--llama-cpp", default="f32,f16,q8_0", metavar="OUTTYPES",
                   help="also time llama.cpp (llama-cpp-python) at batch 1 on the directory exported to GGUF in "
                        "these comma-separated outtypes (default f32,f16,q8_0; '' skips it)")
