"""`matelike export gguf`: a model directory as one GGUF file for llama.cpp (llama-cli, llama-server) and Ollama.

Why not llama.cpp's own convert_hf_to_gguf.py: it recognises a BPE tokenizer's pre-tokenizer by hashing the
ids of a probe text against a list of published models, so it refuses ours ("BPE pre-tokenizer was not
recognized"); and with the pre-type forced, `<|im_end|>` is not the end-of-generation token, so chat replies
never stop. This module writes the file with the `gguf` package (the library that converter uses) from what
the directory is known to hold:

- architecture `llama` for dense models and for routed mixtures of experts (Mixtral's layout: stacked expert
  tensors, softmax top-k routing with renormalised weights, which is our router). A shared expert is refused:
  the `llama` graph has no sigmoid-gated shared expert, and a file that dropped it would be a different model.
- tensors under llama.cpp's names (gguf.TENSOR_NAMES). q and k rows are permuted from Hugging Face's
  rotate-half layout to the interleaved pairs that GGUF `llama` rotates, exactly as the converter's
  `LlamaModel.permute` does.
- vocabulary `gpt2` (byte-level BPE) with pre-tokenizer `qwen2`, whose split regex is ours; the
  tokenizer.json is checked first, and one that splits or normalises differently is refused rather than
  exported to tokenize differently in llama.cpp.
- `<|im_end|>` as EOS and EOT, so llama.cpp ends a chat turn where we do (`<|endoftext|>` ends generation
  there too: llama.cpp marks it end-of-generation by its text), and the ChatML template from the directory.

`--outtype` f32, f16, bf16 or q8_0 (quantised in numpy by gguf.quants); norms and the MoE router stay f32,
as in the converter. `--modelfile` also writes an Ollama Modelfile beside the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import numpy as np
    import torch

    from matelike.cli import CommandTable
    from matelike.model.transformer import Transformer
    from matelike.tokenizer import Tokenizer

OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
MODELFILE_NAME = "Modelfile"

# Ollama's Go-template rendering of ChatML: exactly the text of `Tokenizer.apply_chat_template(messages,
# add_generation_prompt=True)`. The assistant prompt is added after the last message, inside the loop, so
# the template ends with `{{ end }}` and no trailing newline has to survive the Modelfile's quoting.
OLLAMA_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ if eq (len (slice $.Messages $i)) 1 }}<|im_start|>assistant\n"
    "{{ end }}{{ end }}"
)


class ExportError(ValueError):
    """What cannot be exported; the message is one line naming the file or the reason."""


@dataclass
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    outtype: str
    n_bytes: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors stored in it
    modelfile: Path | None = None
    notes: list[str] = field(default_factory=list)  # tensors stored other than asked (q8_0 -> f16 fallback)


def _qtypes() -> dict[str, Any]:
    import gguf

    t = gguf.GGMLQuantizationType
    return {"f32": t.F32, "f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0}


def _file_types() -> dict[str, Any]:
    import gguf

    f = gguf.LlamaFileType
    return {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0}


# ---- tokenizer -----------------------------------------------------------------------------------------
def _check_tokenizer(tok: dict[str, Any], source: Path) -> None:
    """Refuse a tokenizer.json that llama.cpp's `gpt2` model with the `qwen2` pre-tokenizer would not
    reproduce id for id: only the pieces this exporter writes may differ from ours."""
    from matelike.tokenizer import SPLIT_PATTERN

    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{source}: model type {model.get('type')!r}, only byte-level BPE exports to GGUF")
    for key, ok in (("dropout", None), ("continuing_subword_prefix", None), ("end_of_word_suffix", None),
                    ("byte_fallback", False), ("ignore_merges", False)):
        if model.get(key, ok) not in (ok, ""):
            raise ExportError(f"{source}: BPE option {key}={model.get(key)!r} has no GGUF equivalent")
    if tok.get("normalizer") is not None:
        raise ExportError(f"{source}: has a normalizer, which llama.cpp's qwen2 pre-tokenizer does not apply")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regex = (steps[0].get("pattern") or {}).get("Regex") if steps else None
    ok = (
        len(steps) == 2
        and steps[0].get("type") == "Split" and regex == SPLIT_PATTERN
        and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
        and not steps[1].get("use_regex")
    )
    if not ok:
        raise ExportError(f"{source}: pre-tokenizer is not the Qwen2 split + byte-level one (matelike's), "
                          "so llama.cpp would split text differently")
    post = tok.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        raise ExportError(f"{source}: post-processor {post.get('type')!r} adds tokens llama.cpp would not add")
    for added in tok.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            raise ExportError(f"{source}: added token {added.get('content')!r} strips or matches whole words, "
                              "which GGUF cannot express")


def _vocab(tokenizer: Tokenizer, n_vocab: int, source: Path) -> tuple[list[str], list[int], list[str]]:
    """Token strings, token types and merges as llama.cpp's `gpt2` vocabulary reads them.

    Tokens keep their byte-level spelling (space = "Ġ"); added tokens (ours are all special) are CONTROL,
    so they never come out of plain text and are hidden when decoding. Embedding rows past the tokenizer
    (a vocab_size padded for speed) get UNUSED `[PAD<i>]` entries, as in the converter.
    """
    import gguf

    tok = json.loads(tokenizer.backend.to_str())
    _check_tokenizer(tok, source)
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer); GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    return tokens, types, merges


# ---- tensors -------------------------------------------------------------------------------------------
def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k projection rows from rotate-half order to GGUF llama's interleaved pairs.

    Hugging Face's RoPE rotates row j of a head with row j + d/2; llama.cpp's `llama` (rope type NORM)
    rotates rows 2j and 2j+1. Per head, [x0..x_{d/2-1}, y0..y_{d/2-1}] becomes [x0, y0, x1, y1, ...]:
    convert_hf_to_gguf.py's LlamaModel.permute, with n_heads the kv head count for k.
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) in llama.cpp's order, from the model's Hugging Face views (matelike.model.io)."""
    import gguf
    import torch

    from matelike.model.io import hf_views

    T = gguf.MODEL_TENSOR
    c = model.config
    hf = hf_views(model)

    def name(kind: Any, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"

    yield name(T.TOKEN_EMBD), hf["model.embed_tokens.weight"]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        yield name(T.ATTN_NORM, i), hf[p + "input_layernorm.weight"]
        yield name(T.ATTN_Q, i), interleave_rope_rows(hf[p + "self_attn.q_proj.weight"], c.n_heads)
        yield name(T.ATTN_K, i), interleave_rope_rows(hf[p + "self_attn.k_proj.weight"], c.n_kv_heads)
        yield name(T.ATTN_V, i), hf[p + "self_attn.v_proj.weight"]
        yield name(T.ATTN_OUT, i), hf[p + "self_attn.o_proj.weight"]
        yield name(T.FFN_NORM, i), hf[p + "post_attention_layernorm.weight"]
        if c.is_moe:  # Mixtral names (a shared expert was refused before getting here)
            experts = range(c.n_experts)
            yield name(T.FFN_GATE_INP, i), hf[p + "block_sparse_moe.gate.weight"]
            for kind, w in ((T.FFN_GATE_EXP, "w1"), (T.FFN_UP_EXP, "w3"), (T.FFN_DOWN_EXP, "w2")):
                yield name(kind, i), torch.stack([hf[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] for e in experts])
        else:
            yield name(T.FFN_GATE, i), hf[p + "mlp.gate_proj.weight"]
            yield name(T.FFN_UP, i), hf[p + "mlp.up_proj.weight"]
            yield name(T.FFN_DOWN, i), hf[p + "mlp.down_proj.weight"]
    yield name(T.OUTPUT_NORM), hf["model.norm.weight"]
    if "lm_head.weight" in hf:  # tied embeddings: llama.cpp reuses token_embd when `output` is absent
        yield name(T.OUTPUT), hf["lm_head.weight"]


def _encode(name: str, t: torch.Tensor, outtype: str, notes: list[str]) -> tuple[np.ndarray, Any]:
    """The tensor's bytes in the GGML type it is stored as, and that type."""
    import gguf
    import numpy as np
    import torch

    qtypes = _qtypes()
    data = t.detach().to(torch.float32).contiguous().numpy()
    if not np.isfinite(data).all():
        raise ExportError(f"tensor {name}: the model holds NaN or infinite weights")
    # Norms (1-D) and the router stay f32 as in the converter: tiny tensors whose rounding shifts every
    # activation, or which expert a token goes to.
    keep_f32 = data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
    qtype = qtypes["f32"] if keep_f32 else qtypes[outtype]
    try:
        out = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # q8_0 blocks are 32 values along a row; the converter falls back to f16 too
        notes.append(f"{name}: rows of {data.shape[-1]} are not a multiple of 32, stored as f16")
        qtype = qtypes["f16"]
        out = gguf.quants.quantize(data, qtype)
    if out.dtype == np.float16 and not np.isfinite(out).all():
        raise ExportError(f"tensor {name}: weights beyond f16's range (65504); use --outtype bf16 or f32")
    return out, qtype


# ---- the file ------------------------------------------------------------------------------------------
def _check_exportable(model: Transformer, model_dir: Path) -> None:
    c = model.config
    if c.shared_expert:
        raise ExportError(f"{model_dir}: MoE with a shared expert (Qwen2MoeForCausalLM) cannot be exported: "
                          "llama.cpp's llama architecture has no sigmoid-gated shared expert")


def _write_metadata(writer: Any, model: Transformer, tokenizer: Tokenizer, outtype: str, name: str,
                    source: Path) -> None:
    import gguf

    c = model.config
    writer.add_name(name)
    writer.add_file_type(_file_types()[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.expert_hidden if c.is_moe else c.hidden_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    # Explicit head size: a directory transformers wrote may have head_dim != dim / n_heads.
    writer.add_key_length(c.head_size)
    writer.add_value_length(c.head_size)
    writer.add_rope_dimension_count(c.head_size)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.is_moe:
        writer.add_expert_count(c.n_experts)
        writer.add_expert_used_count(c.n_experts_per_tok)

    tokens, types, merges = _vocab(tokenizer, c.vocab_size, source / "tokenizer.json")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # No BOS is ever added (as in our tokenizer); BOS names <|endoftext|> like Qwen2's files, for tools that
    # want one. EOS and EOT are <|im_end|>: the end of a chat turn, where llama.cpp must stop.
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.im_end_id)
    writer.add_eot_token_id(tokenizer.im_end_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def modelfile_text(gguf_name: str, context: int) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` in the same folder."""
    from matelike.sampling import CHAT

    lines = [
        f"# Ollama: `ollama create NAME -f {MODELFILE_NAME}` in this folder, then `ollama run NAME`.",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|endoftext|>"',
        f"PARAMETER num_ctx {context}",
        # `matelike chat`'s defaults, so both answer alike.
        f"PARAMETER temperature {CHAT.temperature}",
        f"PARAMETER top_p {CHAT.top_p}",
    ]
    return "\n".join(lines) + "\n"


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", modelfile: bool = False) -> GGUFExport:
    """Write the model directory `model_dir` as the GGUF file `out` (and an Ollama Modelfile beside it).

    Raises ExportError for anything that cannot be exported faithfully; nothing is left at `out` then.
    """
    import gguf

    from matelike.model.io import ModelDirError, load_model

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    src, out = Path(model_dir), Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; --out names the .gguf file to write")
    if modelfile and any(ch.isspace() or ch == '"' for ch in out.name):
        raise ExportError(f"{out.name}: a Modelfile's FROM cannot name a file with spaces or quotes")
    try:
        model, tokenizer = load_model(src, device="cpu")
    except ModelDirError as e:
        raise ExportError(str(e)) from e
    if tokenizer is None:
        raise ExportError(f"{src / 'tokenizer.json'}: not found; a GGUF file carries the vocabulary")
    _check_exportable(model, src)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    notes: list[str] = []
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _write_metadata(writer, model, tokenizer, outtype, src.resolve().name, src)
        for name, tensor in gguf_tensors(model):
            data, qtype = _encode(name, tensor, outtype, notes)
            writer.add_tensor(name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out)  # readers never see half a file, and a failed export leaves none
    finally:
        tmp.unlink(missing_ok=True)
    result = GGUFExport(out, outtype, out.stat().st_size, counts, notes=notes)
    if modelfile:
        result.modelfile = out.parent / MODELFILE_NAME
        result.modelfile.write_text(modelfile_text(out.name, model.config.max_seq_len), encoding="utf-8")
    return result


def _cmd_gguf(args: argparse.Namespace) -> int:
    try:
        result = export_gguf(args.model, args.out, args.outtype, args.modelfile)
    except (ExportError, OSError) as e:
        print(f"matelike export gguf: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    types = ", ".join(f"{n} {k.lower()}" for k, n in sorted(result.tensor_types.items()))
    print(f"wrote {result.path} ({result.n_bytes / 1e6:.1f} MB, {result.outtype}; tensors: {types})")
    if result.modelfile:
        print(f"wrote {result.modelfile}; for Ollama: cd {result.modelfile.parent} && "
              f"ollama create {Path(args.model).resolve().name} -f {MODELFILE_NAME}")
    return 0


def add_cli(table: "CommandTable") -> None:
    p = table.group_command(
        "export", "gguf", "write a model directory as one GGUF file for llama.cpp and Ollama", _cmd_gguf,
        group_help="export a model directory to other runtimes",
    )
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="weight type of the matrices (norms and the MoE router stay f32; default f16)")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile beside the file")
