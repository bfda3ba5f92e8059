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


def config_from_hf(cfg: dict[str, Any], path: Path) -> ModelConfig:
    """Our ModelConfig from a config.json dict (ours or one transformers wrote); refuses what we cannot run."""
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "mixtral", "qwen2_moe"):
        raise ModelDirError(f"{path}: model_type {model_type!r} is not supported (llama, mixtral, qwen2_moe)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelDirError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported (silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or (model_type == "qwen2_moe" and cfg.get("qkv_bias", True)):
        raise ModelDirError(f"{path}: biases in attention or MLP are not supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelDirError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 1e6 if model_type == "mixtral" else 10000.0))
    dim = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    common: dict[str, Any] = dict(
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") if cfg.get("head_dim") not in (None, dim // n_heads) else None,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=cfg.get("initializer_range", 0.02),
    )
    if model_type == "llama":
        return ModelConfig(hidden_dim=cfg["intermediate_size"], **common)
    if model_type == "mixtral":
        return ModelConfig(
            hidden_dim=cfg["intermediate_size"],
            n_experts=cfg["num_local_experts"],
            n_experts_per_tok=cfg["num_experts_per_tok"],
            aux_loss_coef=cfg.get("router_aux_loss_coef", 0.01),
            **common,
        )
    if not cfg.get("norm_topk_prob", False):
        raise ModelDirError(f"{path}: qwen2_moe with norm_topk_prob false is not supported (we renormalise top-k)")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise ModelDirError(f"{path}: qwen2_moe with dense layers (mlp_only_layers/decoder_sparse_step) unsupported")
    hidden = cfg.get("intermediate_size", cfg["moe_intermediate_size"])
    expert = cfg["moe_intermediate_size"]
    shared = cfg["shared_expert_intermediate_size"]
    return ModelConfig(  # sizes equal to their defaults stay None so a round trip gives an equal config
        hidden_dim=hidden,
        moe_hidden_dim=None if expert == hidden else expert,
        n_experts=cfg["num_experts"],
        n_experts_per_tok=cfg["num_experts_per_tok"],
        shared_expert=True,
        shared_hidden_dim=None if shared == expert else shared,
        aux_loss_coef=cfg.get("router_aux_loss_coef", 0.01),
        **common,
    )


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


def save_model(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write `model` (and `tokenizer`, when given) as a Hugging Face model directory; returns the directory.

    Other files already in out_dir (checkpoints, metrics) are left alone.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = model.embed.weight.dtype
    tensors = {k: v.cpu() for k, v in to_hf_state_dict(model).items()}
    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    (out / INDEX_NAME).unlink(missing_ok=True)  # a stale shard index would shadow the new single file
    cfg = hf_config(model.config, dtype, tokenizer)
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


@dataclass
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if (path / INDEX_NAME).is_file():
        try:
            index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
            return [path / f for f in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelDirError(f"{path / INDEX_NAME}: not a safetensors index ({e})") from e
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: pickle weights are refused; convert them to safetensors)" if pickles else ""
    raise ModelDirError(f"{path}: no {WEIGHTS_NAME}{hint}")


def _read_header(file: Path) -> dict[str, _Entry]:
    """The tensor table of a safetensors file (8-byte little-endian header size, JSON header, raw data)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ModelDirError(f"{file}: not a safetensors file (truncated header)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelDirError(f"{file}: cannot read ({e})") from e
    except ValueError as e:
        raise ModelDirError(f"{file}: not a safetensors file ({e})") from e
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            start, end = (8 + n + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelDirError(f"{file}: tensor {name}: unsupported or invalid entry {info!r}") from e
        if end > size or end - start != math.prod(shape) * dtype.itemsize:
            raise ModelDirError(f"{file}: tensor {name}: data outside the file (truncated?)")
        entries[name] = _Entry(file, dtype, shape, start, end)
    return entries


def _fill(dest: torch.Tensor, entry: _Entry, name: str) -> None:
    """Read one tensor's bytes straight into `dest` (a contiguous view of a parameter), converting dtype if needed."""
    if tuple(dest.shape) != entry.shape:
        raise ModelDirError(f"{entry.file}: tensor {name} has shape {list(entry.shape)}, expected {list(dest.shape)}")
    target = dest if entry.dtype == dest.dtype else torch.empty(entry.shape, dtype=entry.dtype)
    buf = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(buf) != entry.end - entry.start:
            raise ModelDirError(f"{entry.file}: tensor {name}: file ends early")
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


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Read a model directory written by save_model or by transformers (Llama, Mixtral, Qwen2-MoE).

    device: a torch device or a `--device` name (auto, cpu, cuda...). dtype: a torch dtype, a `--dtype` name
    (auto|fp32|bf16|fp16, resolved by matelike.device.weights_dtype), or None to keep the stored dtype. The tokenizer is None when the directory has no tokenizer.json.
    The model is returned in eval mode. Tensor bytes are read straight into the preallocated parameters
    (no memory map, no intermediate copies), so peak memory is about the size of the weights.
    """
    path = Path(model_dir)
    if isinstance(device, str):
        device = resolve_device(device)
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelDirError(f"{cfg_path}: not found (is {path} a model directory?)") from e
    except ValueError as e:
        raise ModelDirError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelDirError(f"{cfg_path}: expected a JSON object")
    try:
        config = config_from_hf(raw, cfg_path)
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"{cfg_path}: missing or invalid field {e}") from e
    entries: dict[str, _Entry] = {}
    for file in _weight_files(path):
        entries.update(_read_header(file))
    embed = entries.get("model.embed_tokens.weight")
    if embed is None:
        raise ModelDirError(f"{path}: missing tensor model.embed_tokens.weight")
    # Built on the meta device in the final dtype, then allocated once without initialising (every parameter is
    # overwritten below).
    if isinstance(dtype, str):
        dtype = weights_dtype(dtype, device)
    model = _materialize(Transformer(config, device="meta", dtype=dtype or embed.dtype))
    model.tie_weights()
    views = hf_views(model)
    with torch.no_grad():
        for name, dest in views.items():
            if name not in entries:
                raise ModelDirError(f"{path}: missing tensor {name}")
            _fill(dest, entries.pop(name), name)
    if config.tie_embeddings:
        entries.pop("lm_head.weight", None)  # some writers store the tied matrix twice
    unexpected = [k for k in entries if not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ModelDirError(f"{path}: unexpected tensors {unexpected[:5]}")
    model.reset_rope()
    model = model.to(device).eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from matelike.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path)
    return model, tokenizer
