"""Hostile or damaged model directories: every one is a ModelDirError naming the file, never another exception,
and never a giant allocation first."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matelike.model import io as model_io
from matelike.model.io import MAX_HEADER_BYTES, ModelDirError, hf_views, load_model, save_model
from matelike.model.transformer import ModelConfig, Transformer

VOCAB = 101
SMALL = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)


def _make(**kw: Any) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL, **kw})).eval()


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid small dense model directory, never modified: tests copy it."""
    return save_model(_make(), None, tmp_path_factory.mktemp("good") / "m")


@pytest.fixture
def model_dir(good_dir: Path, tmp_path: Path) -> Path:
    """A private copy of good_dir to damage."""
    return Path(shutil.copytree(good_dir, tmp_path / "m"))


@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if load_model gets as far as allocating parameters: refusals must come before that."""
    def refuse(model: Transformer) -> Transformer:
        raise AssertionError("parameters were allocated for a directory that should have been refused")

    monkeypatch.setattr(model_io, "_materialize", refuse)


def _edit_config(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _split(file: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header dict and its data bytes."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(file: Path, header: bytes, data: bytes, n: int | None = None) -> None:
    file.write_bytes((len(header) if n is None else n).to_bytes(8, "little") + header + data)


def _edit_header(file: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, data = _split(file)
    edit(header)
    _write(file, json.dumps(header).encode(), data)


def _refused(d: Path, file: str, match: str | None = None) -> str:
    """Load d expecting a ModelDirError that names d/file (and matches `match`); returns the message."""
    with pytest.raises(ModelDirError, match=match) as info:
        load_model(d)
    message = str(info.value)
    assert str(d / file) in message and "\n" not in message, message
    return message


DEEP = "[" * 100_000 + "]" * 100_000  # nested past Python's recursion limit: json raises RecursionError


# ---- config.json ---------------------------------------------------------------------------------------------
def test_deeply_nested_config_json(model_dir: Path) -> None:
    (model_dir / "config.json").write_text(DEEP)
    _refused(model_dir, "config.json", "nested")


def test_config_json_that_is_a_folder(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").mkdir()
    _refused(model_dir, "config.json", "not a regular file")


def test_a_shard_that_is_a_fifo_does_not_block(model_dir: Path) -> None:
    """Opening a FIFO waits for a writer forever: it is refused from its stat."""
    import os

    (model_dir / "model.safetensors").unlink()
    os.mkfifo(model_dir / "shard.safetensors")
    _shard(model_dir, {"model.embed_tokens.weight": "shard.safetensors"})
    _refused(model_dir, "shard.safetensors", "not a regular file")


@pytest.mark.parametrize("key, value", [
    ("hidden_size", 10**7),
    ("num_hidden_layers", 10**6),
    ("vocab_size", 10**9),
    ("intermediate_size", 10**8),
    ("head_dim", 10**9),
])
def test_absurd_sizes_are_refused_before_allocating(model_dir: Path, no_allocation: None, key: str,
                                                    value: int) -> None:
    _edit_config(model_dir, **{key: value})
    message = _refused(model_dir, "config.json", "parameters")
    assert str(model_dir / "model.safetensors") in message  # and says what the weights hold


def test_absurd_expert_count_is_refused_before_allocating(tmp_path: Path, no_allocation: None) -> None:
    d = save_model(_make(n_experts=4, n_experts_per_tok=2), None, tmp_path / "moe")
    _edit_config(d, num_local_experts=10**6)
    _refused(d, "config.json", "parameters")


@pytest.mark.parametrize("key, value", [
    ("hidden_size", 0), ("hidden_size", -32), ("num_attention_heads", 0), ("num_key_value_heads", -1),
    ("vocab_size", 0), ("num_hidden_layers", 0), ("intermediate_size", -48), ("max_position_embeddings", 0),
    ("hidden_size", "32"), ("hidden_size", 32.0), ("hidden_size", 32.5), ("hidden_size", True),
    ("hidden_size", [32]), ("num_attention_heads", {"n": 4}), ("head_dim", -8),
    pytest.param("hidden_size", 2**63, id="hidden_size-2^63"), ("vocab_size", 2**31), ("num_hidden_layers", 2**70),
    pytest.param("rope_theta", 10**400, id="rope_theta-1e400"), ("rope_theta", "fast"), ("rope_theta", 0),
    ("rope_theta", math.nan),
    ("rms_norm_eps", "x"), ("rms_norm_eps", math.inf), ("initializer_range", [0.1]),
])
def test_invalid_config_values_name_the_field(model_dir: Path, no_allocation: None, key: str, value: Any) -> None:
    changes = {key: value}
    if key == "rope_theta":  # our config also says it in rope_parameters, which wins
        changes["rope_parameters"] = None
    _edit_config(model_dir, **changes)
    _refused(model_dir, "config.json", key)


@pytest.mark.parametrize("changes, match", [
    ({"num_attention_heads": 5, "head_dim": None}, "divisible"),  # 32 wide is not 5 heads (head_dim unsaid)
    ({"num_key_value_heads": 3}, "multiple"),  # 4 query heads are not a multiple of 3 kv heads
    ({"rope_parameters": [1, 2]}, "rope_parameters"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_inconsistent_config_is_refused(model_dir: Path, no_allocation: None, changes: dict, match: str) -> None:
    _edit_config(model_dir, **changes)
    _refused(model_dir, "config.json", match)


def test_param_and_tensor_counts_match_the_built_model() -> None:
    """The arithmetic that prices a config before building it agrees with the model hf_views describes."""
    for kw in ({}, {"tie_embeddings": False}, {"head_dim": 16}, {"n_experts": 4, "n_experts_per_tok": 2},
               {"n_experts": 3, "n_experts_per_tok": 1, "shared_expert": True, "moe_hidden_dim": 24,
                "shared_hidden_dim": 40}):
        config = ModelConfig(**{**SMALL, **kw})
        views = hf_views(Transformer(config, device="meta"))
        assert model_io._param_count(config) == sum(v.numel() for v in views.values()), kw
        assert model_io._tensor_count(config) == len(views), kw


# ---- model.safetensors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [DEEP.encode(), b"\xff\xfe not json", b"[1, 2]", b'{"x": 5}',
                                    b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}'])
def test_bad_safetensors_headers(model_dir: Path, header: bytes) -> None:
    _, data = _split(model_dir / "model.safetensors")
    _write(model_dir / "model.safetensors", header, data)
    _refused(model_dir, "model.safetensors")


def test_absurd_header_size_is_refused_without_reading_it(model_dir: Path) -> None:
    file = model_dir / "model.safetensors"
    n = MAX_HEADER_BYTES + 1
    with open(file, "wb") as f:  # a sparse file big enough to hold the header it claims: no disk, no time
        f.write(n.to_bytes(8, "little"))
        f.truncate(8 + n + 64)
    _refused(model_dir, "model.safetensors", "too large")


def test_tensor_shapes_that_disagree_with_the_config(model_dir: Path, no_allocation: None) -> None:
    def transpose(h: dict[str, Any]) -> None:  # same bytes, wrong layout: only the shape check sees it
        h["model.layers.0.mlp.gate_proj.weight"]["shape"].reverse()

    _edit_header(model_dir / "model.safetensors", transpose)
    _refused(model_dir, "model.safetensors", "gate_proj.*shape")


@pytest.mark.parametrize("dtype, match", [("I32", "invalid entry"), ("F16", "bytes")])
def test_tensor_dtypes_we_cannot_read_or_that_do_not_fit_the_bytes(model_dir: Path, dtype: str, match: str) -> None:
    def retype(h: dict[str, Any]) -> None:
        h["model.norm.weight"]["dtype"] = dtype

    _edit_header(model_dir / "model.safetensors", retype)
    _refused(model_dir, "model.safetensors", match)


def test_offsets_past_the_end_of_the_file(model_dir: Path) -> None:
    size = (model_dir / "model.safetensors").stat().st_size

    def push(h: dict[str, Any]) -> None:
        info = h["model.norm.weight"]
        length = info["data_offsets"][1] - info["data_offsets"][0]
        info["data_offsets"] = [size, size + length]

    _edit_header(model_dir / "model.safetensors", push)
    _refused(model_dir, "model.safetensors", "outside the file")


def test_overlapping_tensors_are_refused(model_dir: Path) -> None:
    """Two tensors on the same bytes: a small file could otherwise describe any number of parameters."""
    def alias(h: dict[str, Any]) -> None:
        h["model.layers.1.input_layernorm.weight"]["data_offsets"] = h["model.norm.weight"]["data_offsets"]

    _edit_header(model_dir / "model.safetensors", alias)
    _refused(model_dir, "model.safetensors", "overlap")


def _shard(d: Path, weight_map: Any) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_shard_index_cannot_point_outside_the_directory(model_dir: Path, good_dir: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "shard.safetensors")
    outside = "../" * len(model_dir.parts) + str(good_dir / "model.safetensors").lstrip("/")
    _shard(model_dir, {"model.embed_tokens.weight": outside})
    _refused(model_dir, "model.safetensors.index.json", "not a file name")


def test_deeply_nested_shard_index(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(DEEP)
    _refused(model_dir, "model.safetensors.index.json", "nested")


def test_a_tensor_in_two_shards(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:10]}, model_dir / "a.safetensors")
    save_file({k: tensors[k] for k in names[9:]}, model_dir / "b.safetensors")  # names[9] in both
    _shard(model_dir, {k: "a.safetensors" if i < 10 else "b.safetensors" for i, k in enumerate(names)})
    _refused(model_dir, "b.safetensors", "also in a.safetensors")


# ---- tokenizer files --------------------------------------------------------------------------------------------
@pytest.fixture
def chat_dir(tmp_path: Path, tokenizer) -> Path:
    return save_model(_make(vocab_size=tokenizer.vocab_size), tokenizer, tmp_path / "chat")


@pytest.mark.parametrize("text", ["{not json", '{"a": 1}', DEEP])
def test_tokenizer_json_that_is_not_a_tokenizer(chat_dir: Path, text: str) -> None:
    from matelike.tokenizer import Tokenizer

    (chat_dir / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(chat_dir)
    _refused(chat_dir, "tokenizer.json")


@pytest.mark.parametrize("text", ["{not json", "[1]", DEEP])
def test_bad_tokenizer_config(chat_dir: Path, text: str) -> None:
    (chat_dir / "tokenizer_config.json").write_text(text)
    _refused(chat_dir, "tokenizer_config.json")


def test_tokenizer_without_our_special_tokens(chat_dir: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    (chat_dir / "tokenizer.json").write_text(HFTokenizer(BPE()).to_str())
    _refused(chat_dir, "tokenizer.json", "special tokens")


def test_tokenizer_larger_than_the_embedding(tmp_path: Path, tokenizer) -> None:
    """Its ids past the vocabulary would fail in the middle of generating."""
    d = save_model(_make(), tokenizer, tmp_path / "small-vocab")  # 101 rows, a 512-token tokenizer
    _refused(d, "tokenizer.json", "vocab_size")


# ---- fuzzing ------------------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
SIZES = st.integers(min_value=-2, max_value=2**70) | st.sampled_from([1, 2, 4, 8, 16, 32, 48, 64, 101, 10**9])
# Values near the valid ones reach the checks behind the first few; arbitrary JSON covers the rest.
CONFIG_VALUES = st.one_of(SIZES, st.sampled_from(["llama", "mixtral", "qwen2_moe", "silu", True, False, None, 1e-6]),
                          JSON)
CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rope_parameters",
               "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "initializer_range", "hidden_act",
               "attention_bias", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "norm_topk_prob", "qkv_bias", "router_aux_loss_coef",
               "mlp_only_layers", "decoder_sparse_step"]
HEADER_VALUES = st.one_of(st.lists(st.integers(0, 40_000), max_size=3), st.sampled_from(["F32", "F16", "BF16", "I32"]),
                          SIZES, JSON)
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _load_or_refuse(d: Path) -> None:
    """The property: a model, or a one-line ModelDirError naming something in d; nothing else."""
    try:
        model, _ = load_model(d)
    except ModelDirError as e:
        assert str(d) in str(e) and "\n" not in str(e), str(e)
    else:
        assert isinstance(model, Transformer)


@pytest.fixture(scope="module")
def fuzz_dir(good_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy rewritten by every example (hypothesis examples cannot take function-scoped fixtures)."""
    return Path(shutil.copytree(good_dir, tmp_path_factory.mktemp("fuzz") / "m"))


@FUZZ
@given(
    whole=st.sampled_from([False] * 4 + [True]),
    anything=JSON,
    model_type=st.sampled_from(["llama", "llama", "mixtral", "qwen2_moe", None, "gpt2"]),
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, max_size=4),
    dropped=st.sets(st.sampled_from(CONFIG_KEYS), max_size=2),
)
def test_fuzz_config_json(fuzz_dir: Path, good_dir: Path, whole: bool, anything: Any, model_type: str | None,
                          changes: dict[str, Any], dropped: set[str]) -> None:
    """Arbitrary JSON as config.json, or (mostly) the valid config with some fields replaced or removed."""
    shutil.copyfile(good_dir / "model.safetensors", fuzz_dir / "model.safetensors")
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg.update(changes, model_type=model_type)
    for key in dropped - set(changes):
        cfg.pop(key, None)
    (fuzz_dir / "config.json").write_text(json.dumps(anything if whole else cfg))
    _load_or_refuse(fuzz_dir)


@FUZZ
@given(
    kind=st.sampled_from(["bytes", "json", "edit", "edit", "edit"]),
    raw=st.binary(max_size=64),
    anything=JSON,
    claimed=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    edits=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["dtype", "shape", "data_offsets"]), HEADER_VALUES),
                   max_size=3),
    dropped=st.sets(st.integers(0, 30), max_size=2),
)
def test_fuzz_safetensors_header(fuzz_dir: Path, good_dir: Path, kind: str, raw: bytes, anything: Any,
                                 claimed: int | None, edits: list[tuple[int, str, Any]], dropped: set[int]) -> None:
    """Arbitrary bytes (behind a length that may lie), arbitrary JSON, or (mostly) the real header with some
    fields replaced and some tensors removed, in front of the real data."""
    shutil.copyfile(good_dir / "config.json", fuzz_dir / "config.json")
    header, data = _split(good_dir / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    for i, field, value in edits:
        header[names[i % len(names)]][field] = value
    for i in dropped:
        header.pop(names[i % len(names)], None)
    blob = {"bytes": raw, "json": json.dumps(anything).encode(), "edit": json.dumps(header).encode()}[kind]
    _write(fuzz_dir / "model.safetensors", blob, data, claimed if kind == "bytes" else None)
    _load_or_refuse(fuzz_dir)
