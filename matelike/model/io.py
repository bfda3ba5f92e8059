"""Model directories in the Hugging Face layout, readable by transformers, vLLM and llama.cpp's converter.

Three architectures, chosen from the config:
- dense                          -> LlamaForCausalLM
- routed experts only            -> MixtralForCausalLM  (block_sparse_moe.experts.E.w1/w2/w3)
- routed experts + shared expert -> Qwen2MoeForCausalLM (mlp.experts.E.*, mlp.shared_expert.*,
  mlp.shared_expert_gate; qkv_bias false, norm_topk_prob true). Our shared expert is gated by
  sigmoid(shared_expert_gate(x)) exactly as in Qwen2-MoE, so this export is lossless.

Weights are read from safetensors only; a directory that has only pickle files (pytorch_model.bin) is
refused, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from matelike.device import resolve_device, weights_dtype
from matelike.model.transformer import ModelConfig, MoE, Transformer

if TYPE_CHECKING:
    from matelike.tokenizer import Tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ModelDirError(ValueError):
    """A model directory that cannot be read; the message names the file."""


def architecture(config: ModelConfig) -> str:
    if not config.is_moe:
        return "LlamaForCausalLM"
    return "Qwen2MoeForCausalLM" if config.shared_expert else "MixtralForCausalLM"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config(config: ModelConfig, dtype: torch.dtype, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The config.json dict for `config` (all fields transformers needs; both rope spellings for old readers)."""
    eos = getattr(tokenizer, "eos_id", None)
    pad = getattr(tokenizer, "pad_id", eos)
    bos = None  # our tokenizer adds no BOS (tokenizer_config says bos_token null); keep the model config in step
    out: dict[str, Any] = {
        "architectures": [architecture(config)],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": config.init_std,
        "attention_dropout": 0.0,
        # Explicit (possibly null) ids: leaving them out would make transformers assume Llama's bos=1, eos=2.
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
        "use_cache": True,
    }
    if not config.is_moe:
        out.update(model_type="llama", intermediate_size=config.hidden_dim, attention_bias=False, mlp_bias=False)
    elif not config.shared_expert:
        out.update(
            model_type="mixtral",
            intermediate_size=config.expert_hidden,
            num_local_experts=config.n_experts,
            num_experts_per_tok=config.n_experts_per_tok,
            router_aux_loss_coef=config.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    else:
        out.update(
            model_type="qwen2_moe",
            intermediate_size=config.hidden_dim,
            moe_intermediate_size=config.expert_hidden,
            shared_expert_intermediate_size=config.shared_hidden,
            num_experts=config.n_experts,
            num_experts_per_tok=config.n_experts_per_tok,
            norm_topk_prob=True,
            qkv_bias=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            sliding_window=None,
            router_aux_loss_coef=config.aux_loss_coef,
        )
    return out


_MISSING: Any = object()


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value from a file, cut short: a hostile file must not turn into a megabyte error message."""
    try:
        text = repr(value)
    except RecursionError:  # nested just under json's limit, repr's frames can still run out
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAX_SIZE = 2**31 - 1  # past this a size overflows torch's int64 shape arithmetic before any check can run


def _check_int(value: Any, key: str, path: Path, minimum: int = 1) -> int:
    """A size from the config: a JSON integer (not a bool, not 32.0, not "32") in minimum..2^31-1."""
    if type(value) is not int or not minimum <= value <= _MAX_SIZE:
        raise ModelDirError(f"{path}: {key} must be an integer in {minimum}..{_MAX_SIZE}, not {_short(value)}")
    return value


def _int(cfg: dict[str, Any], key: str, path: Path, default: Any = _MISSING) -> int:
    """Required size cfg[key], or `default` when the field is absent or null (transformers writes nulls)."""
    value = cfg.get(key)
    if value is None:
        if default is _MISSING:
            raise ModelDirError(f"{path}: missing field {key!r}")
        return default
    return _check_int(value, key, path)


def _float(value: Any, key: str, path: Path, positive: bool = False) -> float:
    """A finite non-negative (or positive) number from the config: NaN or inf would give a NaN model."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan
    except OverflowError:  # an integer too big for a float (1e400 written out)
        number = math.inf
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ModelDirError(f"{path}: {key} must be {need}, not {_short(value)}")
    return number


def config_from_hf(cfg: dict[str, Any], path: Path) -> ModelConfig:
    """Our ModelConfig from a config.json dict (ours or one transformers wrote); refuses what we cannot run.

    Every field is checked for type and range here, so whatever the file says, the result is a ModelDirError
    naming `path` or a config that can be built (whether the weights match it is load_model's business).
    """
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "mixtral", "qwen2_moe"):
        raise ModelDirError(f"{path}: model_type {_short(model_type)} is not supported (llama, mixtral, qwen2_moe)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelDirError(f"{path}: hidden_act {_short(cfg.get('hidden_act'))} is not supported (silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or (model_type == "qwen2_moe" and cfg.get("qkv_bias", True)):
        raise ModelDirError(f"{path}: biases in attention or MLP are not supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelDirError(f"{path}: rope_parameters must be an object, not {_short(rope)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelDirError(f"{path}: rope type {_short(rope_type)} is not supported")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 1e6 if model_type == "mixtral" else 10000.0))
    dim = _int(cfg, "hidden_size", path)
    n_heads = _int(cfg, "num_attention_heads", path)
    head_dim = _int(cfg, "head_dim", path, None)
    common: dict[str, Any] = dict(
        vocab_size=_int(cfg, "vocab_size", path),
        dim=dim,
        n_layers=_int(cfg, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=_int(cfg, "num_key_value_heads", path, n_heads),
        head_dim=head_dim if head_dim not in (None, dim // n_heads) else None,
        max_seq_len=_int(cfg, "max_position_embeddings", path, 2048),
        rope_theta=_float(theta, "rope_theta", path, positive=True),
        norm_eps=_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", path),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=_float(cfg.get("initializer_range", 0.02), "initializer_range", path),
    )
    aux = _float(cfg.get("router_aux_loss_coef", 0.01), "router_aux_loss_coef", path) if model_type != "llama" else 0.01
    try:  # ModelConfig refuses heads that do not divide the width, top-k outside 1..n_experts
        if model_type == "llama":
            return ModelConfig(hidden_dim=_int(cfg, "intermediate_size", path), **common)
        if model_type == "mixtral":
            return ModelConfig(
                hidden_dim=_int(cfg, "intermediate_size", path),
                n_experts=_int(cfg, "num_local_experts", path),
                n_experts_per_tok=_int(cfg, "num_experts_per_tok", path),
                aux_loss_coef=aux,
                **common,
            )
        if not cfg.get("norm_topk_prob", False):
            raise ModelDirError(f"{path}: qwen2_moe with norm_topk_prob false is not supported (we renormalise top-k)")
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ModelDirError(
                f"{path}: qwen2_moe with dense layers (mlp_only_layers/decoder_sparse_step) unsupported")
        expert = _int(cfg, "moe_intermediate_size", path)
        hidden = _int(cfg, "intermediate_size", path, expert)
        shared = _int(cfg, "shared_expert_intermediate_size", path)
        return ModelConfig(  # sizes equal to their defaults stay None so a round trip gives an equal config
            hidden_dim=hidden,
            moe_hidden_dim=None if expert == hidden else expert,
            n_experts=_int(cfg, "num_experts", path),
            n_experts_per_tok=_int(cfg, "num_experts_per_tok", path),
            shared_expert=True,
            shared_hidden_dim=None if shared == expert else shared,
            aux_loss_coef=aux,
            **common,
        )
    except ModelDirError:
        raise
    except ValueError as e:
        raise ModelDirError(f"{path}: {e}") from e


def _param_count(c: ModelConfig) -> int:
    """Parameters the config implies, counted as the files store them (a tied lm_head once): pure arithmetic,
    so a config of 10^6 layers or a 10^9 vocabulary is priced before anything is built."""
    d, hd = c.dim, c.head_size
    attn = d * hd * (2 * c.n_heads + 2 * c.n_kv_heads)  # q, k, v, o
    if c.is_moe:
        mlp = c.n_experts * (d + 3 * d * c.expert_hidden)  # router row + gate, up, down per expert
        if c.shared_expert:
            mlp += 3 * d * c.shared_hidden + d
    else:
        mlp = 3 * d * c.hidden_dim
    embeddings = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    return embeddings + c.n_layers * (attn + mlp + 2 * d) + d


def _tensor_count(c: ModelConfig) -> int:
    """Tensors the config implies, as hf_views names them."""
    mlp = 1 + 3 * c.n_experts + (4 if c.shared_expert else 0) if c.is_moe else 3
    return 1 + c.n_layers * (6 + mlp) + 1 + (0 if c.tie_embeddings else 1)


def hf_views(model: Transformer) -> dict[str, torch.Tensor]:
    """Views of our parameters under Hugging Face names (fused matrices split by rows; tied lm_head left out).

    Every view is a contiguous row block of its parameter, so loading can read file bytes straight into it.
    """
    c = model.config
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attn.wqkv.weight.split(layer.attn.split, dim=0)
        sd[p + "self_attn.q_proj.weight"] = q
        sd[p + "self_attn.k_proj.weight"] = k
        sd[p + "self_attn.v_proj.weight"] = v
        sd[p + "self_attn.o_proj.weight"] = layer.attn.wo.weight
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            gate, up = mlp.w_gate_up.weight.split(mlp.hidden, dim=0)
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
            sd[p + "mlp.down_proj.weight"] = mlp.w_down.weight
            continue
        mixtral = not c.shared_expert
        sd[p + ("block_sparse_moe.gate.weight" if mixtral else "mlp.gate.weight")] = mlp.router.weight
        for e in range(c.n_experts):
            gate, up = mlp.w_gate_up[e].split(mlp.hidden, dim=0)
            down = mlp.w_down[e]
            if mixtral:
                q_ = f"{p}block_sparse_moe.experts.{e}."
                sd[q_ + "w1.weight"], sd[q_ + "w3.weight"], sd[q_ + "w2.weight"] = gate, up, down
            else:
                q_ = f"{p}mlp.experts.{e}."
                sd[q_ + "gate_proj.weight"], sd[q_ + "up_proj.weight"], sd[q_ + "down_proj.weight"] = gate, up, down
        if mlp.shared is not None and mlp.shared_gate is not None:
            gate, up = mlp.shared.w_gate_up.weight.split(mlp.shared.hidden, dim=0)
            sd[p + "mlp.shared_expert.gate_proj.weight"] = gate
            sd[p + "mlp.shared_expert.up_proj.weight"] = up
            sd[p + "mlp.shared_expert.down_proj.weight"] = mlp.shared.w_down.weight
            sd[p + "mlp.shared_expert_gate.weight"] = mlp.shared_gate.weight
    sd["model.norm.weight"] = model.norm.weight
    if not c.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach() for k, v in sd.items()}


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names, as standalone contiguous tensors (for saving)."""
    return {k: v.contiguous() for k, v in hf_views(model).items()}


def _write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder then rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def save_model(
    model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path, *,
    extra_tensors: dict[str, torch.Tensor] | None = None, config_update: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and `tokenizer`, when given) as a Hugging Face model directory; returns the directory.

    `extra_tensors` are stored beside the model's under their own names and `config_update` is merged into
    config.json: how a head on the same backbone is saved (the reward model's `score.weight` and its
    `LlamaForSequenceClassification` architecture, matelike.reward). Other files already in out_dir
    (checkpoints, metrics) are left alone.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = model.embed.weight.dtype
    tensors = {k: v.cpu() for k, v in to_hf_state_dict(model).items()}
    for name, t in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor {name!r} would overwrite a model tensor")
        tensors[name] = t.detach().to("cpu", dtype).contiguous()
    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    (out / INDEX_NAME).unlink(missing_ok=True)  # a stale shard index would shadow the new single file
    cfg = {**hf_config(model.config, dtype, tokenizer), **(config_update or {})}
    _write_json(out / "config.json", cfg)
    eos = cfg["eos_token_id"]
    im_end = getattr(tokenizer, "im_end_id", None)
    stop = [t for t in (eos, im_end) if t is not None]
    gen: dict[str, Any] = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": stop or None,
        "pad_token_id": cfg["pad_token_id"],
    }
    _write_json(out / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# safetensors' own limit: a bigger header is damage or an attack, and reading it would take that much memory.
MAX_HEADER_BYTES = 100_000_000
# Real config.json and index files are kilobytes to a few megabytes; a bigger one is not worth parsing.
MAX_JSON_BYTES = 64 << 20


@dataclass
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _read_json(file: Path, missing: str = "not found") -> Any:
    """The parsed JSON of `file`; every way it can fail (missing, a folder, unreadable, huge, not UTF-8, not
    JSON, nested past Python's recursion limit) is a ModelDirError naming it."""
    try:
        st = file.stat()
        if not stat.S_ISREG(st.st_mode):  # a folder, or a FIFO or /dev/zero that would block or never end
            raise ModelDirError(f"{file}: not a regular file")
        if st.st_size > MAX_JSON_BYTES:
            raise ModelDirError(f"{file}: {st.st_size:,} bytes, too large for a model directory's JSON file")
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelDirError(f"{file}: {missing}") from e
    except OSError as e:
        raise ModelDirError(f"{file}: cannot read ({e.strerror or e})") from e
    except RecursionError as e:  # json's C parser recurses once per nesting level
        raise ModelDirError(f"{file}: invalid JSON (nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ModelDirError(f"{file}: invalid JSON ({e})") from e


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    index_file = path / INDEX_NAME
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirError(f"{index_file}: not a safetensors index (no weight_map object)")
        for name in weight_map.values():
            # Shards sit next to the index: a path could make us read any file on the machine.
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise ModelDirError(f"{index_file}: shard {_short(name)} is not a file name in {path}")
        return [path / f for f in sorted(set(weight_map.values()))]
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: pickle weights are refused; convert them to safetensors)" if pickles else ""
    raise ModelDirError(f"{path}: no {WEIGHTS_NAME}{hint}")


def _entry(file: Path, name: str, info: Any, base: int, size: int) -> _Entry:
    """One header row, checked: a float dtype we read, non-negative integer dims, offsets inside the file that
    span exactly the bytes the shape needs."""
    row = info if isinstance(info, dict) else {}
    dtype, shape, offsets = row.get("dtype"), row.get("shape"), row.get("data_offsets")
    # At most 8 dims (ours are 1-D and 2-D): the product of thousands of huge dims alone would take seconds.
    if not (isinstance(dtype, str) and dtype in _ST_DTYPES and isinstance(shape, list) and len(shape) <= 8
            and isinstance(offsets, list) and len(offsets) == 2
            and all(type(v) is int and v >= 0 for v in [*shape, *offsets]) and offsets[0] <= offsets[1]):
        raise ModelDirError(f"{file}: tensor {_short(name)}: unsupported or invalid entry {_short(info)}")
    entry = _Entry(file, _ST_DTYPES[dtype], tuple(shape), base + offsets[0], base + offsets[1])
    if entry.end > size:
        raise ModelDirError(f"{file}: tensor {_short(name)}: data outside the file (truncated?)")
    need, span = entry.numel * entry.dtype.itemsize, entry.end - entry.start
    if span != need:
        raise ModelDirError(f"{file}: tensor {_short(name)}: shape {_short(shape)} {dtype} needs {need:,} bytes, "
                            f"its offsets span {span:,}")
    return entry


def _read_header(file: Path) -> dict[str, _Entry]:
    """The tensor table of a safetensors file (8-byte little-endian header size, JSON header, raw data)."""
    try:
        st = file.stat()
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block; a device could be read forever
            raise ModelDirError(f"{file}: not a regular file")
        size = st.st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size >= 8 and n > MAX_HEADER_BYTES:
                raise ModelDirError(f"{file}: header of {n:,} bytes is too large (safetensors allows "
                                    f"{MAX_HEADER_BYTES:,}): not a safetensors file, or damaged")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ModelDirError(f"{file}: not a safetensors file (truncated header)")
            raw = f.read(n)
        header = json.loads(raw)
    except OSError as e:
        raise ModelDirError(f"{file}: cannot read ({e.strerror or e})") from e
    except RecursionError as e:  # json's C parser recurses once per nesting level
        raise ModelDirError(f"{file}: not a safetensors file (header nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers past Python's digit limit
        raise ModelDirError(f"{file}: not a safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ModelDirError(f"{file}: not a safetensors file (header is not a JSON object)")
    entries = {name: _entry(file, name, info, 8 + n, size) for name, info in header.items() if name != "__metadata__"}
    # Overlapping tensors would let a small file describe any number of parameters, so the byte count that the
    # config is checked against below would mean nothing; safetensors itself refuses them too.
    spans = sorted((e.start, e.end, name) for name, e in entries.items() if e.end > e.start)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ModelDirError(f"{file}: tensors {_short(a)} and {_short(b)} overlap (damaged header)")
    return entries


def _fill(dest: torch.Tensor, entry: _Entry, name: str) -> None:
    """Read one tensor's bytes straight into `dest` (a contiguous view of a parameter), converting dtype if needed."""
    if tuple(dest.shape) != entry.shape:
        raise ModelDirError(f"{entry.file}: tensor {name} has shape {list(entry.shape)}, expected {list(dest.shape)}")
    target = dest if entry.dtype == dest.dtype else torch.empty(entry.shape, dtype=entry.dtype)
    buf = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    try:
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            if f.readinto(buf) != entry.end - entry.start:
                raise ModelDirError(f"{entry.file}: tensor {name}: file ends early")
    except OSError as e:
        raise ModelDirError(f"{entry.file}: cannot read ({e.strerror or e})") from e
    if target is not dest:
        dest.copy_(target)


def _materialize(model: Transformer) -> Transformer:
    """Give every meta parameter uninitialised CPU storage (what `to_empty` does).

    `to_empty` goes through `empty_like` of a meta tensor, whose first call loads torch's Python meta kernels:
    about 32 MB of resident memory for nothing. Buffers (RoPE) are recomputed by `reset_rope`.
    """
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
    return model


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def _ignored(name: str, config: ModelConfig) -> bool:
    """Tensors some writers add that we drop: RoPE tables (recomputed) and a second copy of a tied lm_head."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")


def _first_mismatch(views: dict[str, torch.Tensor], entries: dict[str, _Entry], path: Path,
                    config: ModelConfig) -> str | None:
    """What first differs between the tensors the config implies (`views`) and the files' headers, or None."""
    for name, dest in views.items():
        entry = entries.get(name)
        if entry is None:
            return f"{path}: missing tensor {name}"
        if tuple(dest.shape) != entry.shape:
            return f"{entry.file}: tensor {name} has shape {list(entry.shape)}, expected {list(dest.shape)}"
    unexpected = [_short(k) for k in entries if k not in views and not _ignored(k, config)]
    return f"{path}: unexpected tensors {unexpected[:5]}" if unexpected else None


def _build_checked(config: ModelConfig, cfg_path: Path, weights: str, entries: dict[str, _Entry],
                   dtype: torch.dtype) -> Transformer:
    """The model on the meta device, once the files are known to hold exactly what the config describes.

    The memory the config implies (its parameter count) is compared with the parameters in the weight files
    before anything is built: a config of 10^7 wide, 10^6 layers or a 10^9 vocabulary next to a small file
    is refused here, instead of failing (or swapping) in a giant allocation. Within that bound the meta model
    names each missing or misshapen tensor, before any memory is allocated for it.
    """
    stored = {k: e for k, e in entries.items() if not _ignored(k, config)}
    want, have = _param_count(config), sum(e.numel for e in stored.values())
    have_bytes = sum(e.end - e.start for e in stored.values())
    size_error = (f"{cfg_path}: describes {want:,} parameters ({_mb(want * dtype.itemsize)} as "
                  f"{_dtype_name(dtype)}) but {weights} holds {have:,} ({_mb(have_bytes)})")
    # Building the meta model costs time per module and a real RoPE table of head_size/2: only within the bound.
    if _tensor_count(config) > 2 * len(stored) + 16 or config.head_size > max(have, 1):
        raise ModelDirError(size_error)
    try:
        model = Transformer(config, device="meta", dtype=dtype)
    except (RuntimeError, ValueError) as e:  # validated configs should not get here; still name the file
        raise ModelDirError(f"{cfg_path}: cannot build the model ({e})") from e
    model.tie_weights()
    mismatch = _first_mismatch(hf_views(model), entries, cfg_path.parent, config)
    if want != have:
        raise ModelDirError(size_error + (f"; {mismatch}" if mismatch else ""))
    if mismatch:
        raise ModelDirError(mismatch)
    return model


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
    quantize: str = "none",
) -> tuple[Transformer, Tokenizer | None]:
    """Read a model directory written by save_model or by transformers (Llama, Mixtral, Qwen2-MoE).

    See load_model_with_tensors, which this is with no extra tensors. quantize: `--quantize` (none|int8, see
    matelike.model.quantize), for inference only.
    """
    from matelike.model.quantize import apply_quantize

    model, tokenizer, _ = load_model_with_tensors(model_dir, device, dtype)
    return apply_quantize(model, quantize), tokenizer


def load_model_with_tensors(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[Transformer, Tokenizer | None, dict[str, torch.Tensor]]:
    """Read a model directory written by save_model or by transformers (Llama, Mixtral, Qwen2-MoE), and the
    tensors named in `extra` that sit beside the model's (a head such as the reward model's `score.weight`),
    in the model's dtype on its device. A missing extra tensor is a ModelDirError like a missing model tensor.

    device: a torch device or a `--device` name (auto, cpu, cuda...). dtype: a torch dtype, a `--dtype` name
    (auto|fp32|bf16|fp16, resolved by matelike.device.weights_dtype), or None to keep the stored dtype. The
    tokenizer is None when the directory has no tokenizer.json.
    The model is returned in eval mode. Tensor bytes are read straight into the preallocated parameters
    (no memory map, no intermediate copies), so peak memory is about the size of the weights.

    Whatever the directory holds, a problem with it is a ModelDirError whose message names the file: configs
    are checked field by field, headers entry by entry, and the weights against the config before allocating.
    """
    path = Path(model_dir)
    if isinstance(device, str):
        device = resolve_device(device)
    cfg_path = path / "config.json"
    raw = _read_json(cfg_path, missing=f"not found (is {path} a model directory?)")
    if not isinstance(raw, dict):
        raise ModelDirError(f"{cfg_path}: expected a JSON object")
    config = config_from_hf(raw, cfg_path)
    files = _weight_files(path)
    entries: dict[str, _Entry] = {}
    for file in files:
        header = _read_header(file)
        twice = next((k for k in header if k in entries), None)
        if twice is not None:
            raise ModelDirError(f"{file}: tensor {_short(twice)} is also in {entries[twice].file.name}")
        entries.update(header)
    heads: dict[str, _Entry] = {}
    for name in extra:
        if name not in entries:
            raise ModelDirError(f"{path}: missing tensor {name}")
        heads[name] = entries.pop(name)
    embed = entries.get("model.embed_tokens.weight")
    if embed is None:
        raise ModelDirError(f"{path}: missing tensor model.embed_tokens.weight")
    if isinstance(dtype, str):
        dtype = weights_dtype(dtype, device)
    weights = str(files[0]) if len(files) == 1 else f"{path / INDEX_NAME} ({len(files)} files)"
    # Built on the meta device in the final dtype, then allocated once without initialising (every parameter is
    # overwritten below).
    model = _materialize(_build_checked(config, cfg_path, weights, entries, dtype or embed.dtype))
    model.tie_weights()
    with torch.no_grad():
        for name, dest in hf_views(model).items():
            _fill(dest, entries[name], name)
    model.reset_rope()
    model = model.to(device).eval()
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in heads.items():
        tensors[name] = torch.empty(entry.shape, dtype=entry.dtype)
        _fill(tensors[name], entry, name)
        tensors[name] = tensors[name].to(device, model.embed.weight.dtype)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from matelike.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.load(path)
        except (OSError, ValueError) as e:  # Tokenizer.load names the file
            raise ModelDirError(str(e)) from e
        if tokenizer.vocab_size > config.vocab_size:  # its ids past the embedding would fail mid-generation
            raise ModelDirError(f"{path / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the "
                                f"vocab_size {config.vocab_size} of {cfg_path}")
    return model, tokenizer, tensors
