"""`matelike export gguf`: the file's layout read back with gguf's reader, and, through llama-cpp-python (the
real llama.cpp, installed by .ci/llama-cpp.sh), llama.cpp's tokenization, chat prompt, stop tokens, logits and
greedy generation against ours."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from matelike.cli import main
from matelike.export.gguf import OLLAMA_TEMPLATE, export_gguf, interleave_rope_rows
from matelike.model.generation import generate
from matelike.model.io import load_model, save_model
from matelike.model.transformer import Transformer, apply_rope, get_preset, rope_cos_sin, rope_inv_freq
from matelike.sampling import GREEDY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Chinese, English with a contraction, emoji (a ZWJ sequence too), digit runs, tabs, newlines, runs of spaces.
TEXTS = (
    "人民日报一九九八年元旦献词：迈向充满希望的新世纪。The quick brown fox, 2,345 articles in 1998! 🦙🚀😶‍🌫️ ✅",
    "I'VE been 'told he's there —   really?\n\n\t北京是首都。  12345.678  #@% def f(x):\n    return x\n",
    "  \n \n\n 3 33 333 3333 ～ нещо на Български ???!!! ......",
)
MESSAGES = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "判断评论情感：质量很好，物流也快"},
    {"role": "assistant", "content": "正面"},
    {"role": "user", "content": "Hello! 今天天气很好 🌞"},
]
SKIP_REASON = "llama-cpp-python is not installed (bash .ci/llama-cpp.sh builds it once into a wheel cache)"


def _llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp", reason=SKIP_REASON)


def _random_model(tokenizer, out: Path, seed: int = 1, **overrides: Any) -> Path:
    """A tiny random model directory (the make_chat_model shape: wide init, so greedy answers vary)."""
    torch.manual_seed(seed)
    shape: dict[str, Any] = dict(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 hidden_dim=128, max_seq_len=128, tie_embeddings=False, init_std=0.1)
    config = get_preset("tiny", **{**shape, **overrides})
    return save_model(Transformer(config), tokenizer, out)


@pytest.fixture(scope="module")
def models(make_chat_model, tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {
        "untied": make_chat_model(128, "gguf-chat"),
        # A tied vocab padded past the tokenizer (llama.cpp must reuse token_embd and see UNUSED pad tokens).
        "tied": _random_model(tokenizer, root / "tied", seed=2, tie_embeddings=True,
                              vocab_size=tokenizer.vocab_size + 64),
        "moe": _random_model(tokenizer, root / "moe", seed=3, n_experts=4, n_experts_per_tok=2, moe_hidden_dim=64),
    }


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> dict[str, Path]:
    """The chat model in every outtype (f32 through the command line), plus f32 files of the other models."""
    out = tmp_path_factory.mktemp("gguf")
    files = {f"untied-{t}": out / f"untied-{t}.gguf" for t in ("f32", "f16", "bf16", "q8_0")}
    assert main(["export", "gguf", "--model", str(models["untied"]), "--out", str(files["untied-f32"]),
                 "--outtype", "f32"]) == 0
    for t in ("f16", "bf16", "q8_0"):
        export_gguf(models["untied"], files[f"untied-{t}"], t)
    for kind in ("tied", "moe"):
        files[f"{kind}-f32"] = export_gguf(models[kind], out / f"{kind}-f32.gguf", "f32").path
    return files


def _fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ---- the file, read back with gguf ---------------------------------------------------------------------
def test_metadata_and_tensor_names(exports, models, tokenizer) -> None:
    meta, tensors = _fields(exports["untied-f32"])
    model, _ = load_model(models["untied"])
    c = model.config
    assert meta["general.architecture"] == "llama"
    expected = {"llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.vocab_size": tokenizer.vocab_size}
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == tokenizer.im_end_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[tokenizer.im_end_id] == "<|im_end|>" and types[tokenizer.im_end_id] == 3  # CONTROL
    assert all(types[i] == 3 for i in tokenizer.special_ids)
    assert tokens[300] == tokenizer.id_to_token(300) and types[300] == 1  # NORMAL, byte-level spelling
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(2):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: (in, out)


def test_tied_and_moe_layout(exports, tokenizer) -> None:
    meta, tensors = _fields(exports["tied-f32"])
    assert "output.weight" not in tensors  # llama.cpp falls back to token_embd
    n = tokenizer.vocab_size
    assert len(meta["tokenizer.ggml.tokens"]) == meta["llama.vocab_size"] == n + 64
    assert meta["tokenizer.ggml.tokens"][n] == f"[PAD{n}]" and meta["tokenizer.ggml.token_type"][n] == 5  # UNUSED
    meta, tensors = _fields(exports["moe-f32"])
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    assert meta["llama.feed_forward_length"] == 64
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 64, 4]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [64, 64, 4]
    assert list(tensors["blk.1.ffn_gate_inp.weight"].shape) == [64, 4]


def test_outtypes_store_the_weights(exports, models) -> None:
    """Each outtype's matrices dequantise back to the model's weights; norms stay f32; sizes shrink."""
    import gguf

    model, _ = load_model(models["untied"])
    ref = model.lm_head.weight.detach().numpy()
    tol = {"f32": 0.0, "f16": 1e-3, "bf16": 4e-3, "q8_0": 5e-3}
    sizes = {}
    for t, atol in tol.items():
        path = exports[f"untied-{t}"]
        sizes[t] = path.stat().st_size
        _, tensors = _fields(path)
        out = tensors["output.weight"]
        assert out.tensor_type.name == t.upper()
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        back = gguf.quants.dequantize(out.data, out.tensor_type).reshape(ref.shape)
        np.testing.assert_allclose(back, ref, atol=atol * np.abs(ref).max(), rtol=0)
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]


def test_q_k_permutation_turns_rotate_half_into_interleaved_rope() -> None:
    """Interleaved RoPE (llama.cpp's NORM: rotate rows 2j, 2j+1) on the permuted projection gives the
    permuted result of rotate-half RoPE (ours, Hugging Face's) on the original one."""
    torch.manual_seed(0)
    n_heads, head_dim, dim, T = 3, 8, 16, 5
    w = torch.randn(n_heads * head_dim, dim)
    x = torch.randn(T, dim)
    inv = rope_inv_freq(head_dim, 10000.0)
    cos, sin = rope_cos_sin(torch.arange(T)[None], inv, torch.float32)
    ours = apply_rope((x @ w.T).view(1, T, n_heads, head_dim), cos, sin)[0]  # (T, H, D)
    q = (x @ interleave_rope_rows(w, n_heads).T).view(T, n_heads, head_dim // 2, 2)
    angle = torch.arange(T)[:, None].float() * inv[None]  # (T, D/2)
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    theirs = torch.stack((q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c), dim=-1).view(T, -1)
    expected = interleave_rope_rows(ours.reshape(T, -1).T, n_heads).T
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)


# ---- refusals ------------------------------------------------------------------------------------------
def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["export", "gguf", *argv])
    return code, capsys.readouterr().err.strip()


def test_shared_expert_is_refused(tokenizer, tmp_path, capsys) -> None:
    src = _random_model(tokenizer, tmp_path / "shared", n_experts=4, n_experts_per_tok=2, shared_expert=True)
    code, err = _run(capsys, "--model", str(src), "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "shared expert" in err and "llama" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_unexportable_inputs_are_one_line_errors(models, tmp_path, capsys) -> None:
    code, err = _run(capsys, "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and len(err.splitlines()) == 1 and "config.json" in err
    # A tokenizer whose split differs from Qwen2's would tokenize differently in llama.cpp: refused.
    other = tmp_path / "other-split"
    shutil.copytree(models["untied"], other)
    tok = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|."
    (other / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    code, err = _run(capsys, "--model", str(other), "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "pre-tokenizer" in err and len(err.splitlines()) == 1
    (other / "tokenizer.json").unlink()
    code, err = _run(capsys, "--model", str(other), "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "tokenizer.json" in err
    code, err = _run(capsys, "--model", str(models["untied"]), "--out", str(tmp_path))
    assert code == 2 and "folder" in err
    assert not list(tmp_path.glob("*.gguf"))


# ---- Ollama Modelfile ----------------------------------------------------------------------------------
def test_modelfile(models, tmp_path, tokenizer) -> None:
    out = tmp_path / "ollama" / "chat.gguf"
    result = export_gguf(models["untied"], out, "q8_0", modelfile=True)
    assert result.modelfile == tmp_path / "ollama" / "Modelfile"
    text = result.modelfile.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM ./chat.gguf" and (result.modelfile.parent / lines[0][5:]).resolve() == out.resolve()
    assert f'TEMPLATE """{OLLAMA_TEMPLATE}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert "PARAMETER num_ctx 128" in lines
    # The template's literal text is ChatML, token for token what our tokenizer renders for one user turn.
    one = [{"role": "user", "content": "你好"}]
    by_hand = (OLLAMA_TEMPLATE.replace("{{- range $i, $_ := .Messages }}", "").replace("{{ .Role }}", "user")
               .replace("{{ .Content }}", "你好").replace("{{ if eq (len (slice $.Messages $i)) 1 }}", "")
               .replace("{{ end }}", ""))
    assert by_hand == tokenizer.apply_chat_template(one, add_generation_prompt=True)


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (renders Ollama's Go template)")
def test_modelfile_template_renders_our_chatml_in_go(tokenizer, tmp_path) -> None:
    """Go's text/template (what Ollama runs) renders the TEMPLATE as our apply_chat_template does."""
    (tmp_path / "main.go").write_text(
        'package main\nimport ("encoding/json"; "os"; "text/template")\n'
        "type M struct { Role string `json:\"role\"`; Content string `json:\"content\"` }\n"
        "func main() { var ms []M; b, _ := os.ReadFile(os.Args[2]); json.Unmarshal(b, &ms)\n"
        "  t, _ := os.ReadFile(os.Args[1]); tpl := template.Must(template.New(\"t\").Parse(string(t)))\n"
        "  if err := tpl.Execute(os.Stdout, map[string]any{\"Messages\": ms}); err != nil { panic(err) } }\n",
        encoding="utf-8")
    (tmp_path / "t.tmpl").write_text(OLLAMA_TEMPLATE, encoding="utf-8")
    for messages in (MESSAGES[1:2], MESSAGES):
        (tmp_path / "m.json").write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
        rendered = subprocess.run(["go", "run", "main.go", "t.tmpl", "m.json"], cwd=tmp_path, check=True,
                                  capture_output=True, text=True, timeout=300).stdout
        assert rendered == tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# ---- the real llama.cpp --------------------------------------------------------------------------------
def _load(path: Path, **kw: Any) -> Any:
    llama_cpp = _llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                           verbose=False, **kw)


def test_llama_cpp_tokenizes_like_us(exports, tokenizer) -> None:
    llm = _load(exports["untied-q8_0"], vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
        assert llm.detokenize(tokenizer.encode(text)).decode() == text
    chat = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(chat)


def test_llama_cpp_stops_at_im_end(exports, tokenizer) -> None:
    llama_cpp = _llama_cpp()
    llm = _load(exports["untied-q8_0"], vocab_only=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llm.token_eos() == llama_cpp.llama_vocab_eot(vocab) == tokenizer.im_end_id
    assert llama_cpp.llama_vocab_is_eog(vocab, tokenizer.im_end_id)
    assert llama_cpp.llama_vocab_is_eog(vocab, tokenizer.eos_id)
    assert not llama_cpp.llama_vocab_is_eog(vocab, tokenizer.im_start_id)


def test_llama_cpp_chat_template_gives_our_prompt_ids(exports, tokenizer) -> None:
    """Both ways llama.cpp renders a chat: its built-in template matched from the file's (llama-cli,
    llama-server without --jinja), and the file's Jinja template (llama-cpp-python, llama-server --jinja)."""
    import ctypes

    llama_cpp = _llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = _load(exports["untied-q8_0"], vocab_only=True)
    ours, _ = tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
    tmpl = llama_cpp.llama_model_chat_template(llm.model, None)
    assert tmpl.decode() == tokenizer.chat_template
    chat = (llama_cpp.llama_chat_message * len(MESSAGES))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in MESSAGES])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(MESSAGES), True, buf, len(buf))
    assert 0 < n < len(buf)
    assert llm.tokenize(buf.raw[:n], add_bos=False, special=True) == ours
    jinja = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                bos_token="<|endoftext|>")(messages=MESSAGES)
    assert llm.tokenize(jinja.prompt.encode(), add_bos=False, special=True) == ours


def _llama_greedy(llm: Any, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits at every prompt position, and n greedy tokens (no stop)."""
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)])
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out


@pytest.mark.parametrize("kind", ["untied", "tied", "moe"])
def test_llama_cpp_f32_generates_like_us(kind, models, exports, tokenizer) -> None:
    model, _ = load_model(models[kind])
    llm = _load(exports[f"{kind}-f32"])
    prompts = [tokenizer.encode_chat(MESSAGES[1:2], add_generation_prompt=True)[0], tokenizer.encode(TEXTS[0])[:40]]
    answers = set()
    for prompt in prompts:
        theirs_logits, theirs = _llama_greedy(llm, prompt, 16)
        with torch.no_grad():
            ours_logits = model(torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(theirs_logits, ours_logits, atol=2e-3 * np.abs(ours_logits).max(), rtol=0)
        ours = generate(model, [prompt], max_new_tokens=16, sampling=GREEDY)[0]
        assert theirs == ours
        answers.add(tuple(ours))
    if kind != "tied":  # a tied random model only echoes; the others' answers must depend on the prompt
        assert len(answers) == 2


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_llama_cpp_loads_and_generates_smaller_types(outtype, models, exports, tokenizer) -> None:
    model, _ = load_model(models["untied"])
    llm = _load(exports[f"untied-{outtype}"])
    prompt = tokenizer.encode_chat(MESSAGES[1:2], add_generation_prompt=True)[0]
    logits, tokens = _llama_greedy(llm, prompt, 16)
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0, -1].numpy()
    assert len(tokens) == 16 and all(0 <= t < tokenizer.vocab_size for t in tokens)
    # Rounded weights move the logits a little, not the model: the last position's logits still agree.
    assert np.corrcoef(logits[-1], ours)[0, 1] > 0.999
    assert int(np.argmax(logits[-1])) == int(np.argmax(ours))
