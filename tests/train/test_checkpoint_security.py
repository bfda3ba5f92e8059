"""Checkpoints never run code and never crash on a malformed manifest: a bad one is skipped like a damaged one."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy import ToyConfig, ToyModel, ToyTask, export_toy

from matelike.hashing import sha256_file
from matelike.train import TrainConfig, Trainer, seed_everything
from matelike.train import checkpoint as ckpt


def fit(out: Path, task_cls: type = ToyTask, **kw: Any):
    defaults = dict(out=out, max_steps=6, batch_size=4, seq_len=8, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                    dtype="fp32", log_every=1, save_every=3, keep=0, progress=False)
    config = TrainConfig(**{**defaults, **kw})
    seed_everything(config.seed)
    task = task_cls(batch_size=config.batch_size, seq_len=config.seq_len, vocab_size=32, seed=config.seed)
    return Trainer(config, ToyModel(ToyConfig()), None, task, export=export_toy).fit()


class Payload:
    """Unpickling this creates `marker`: what a crafted state.pt would do with `torch.load(weights_only=False)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def rehash(step_dir: Path, name: str) -> None:
    """Make the manifest agree with `name` as it is now, as anyone able to write the file could."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    f = step_dir / name
    manifest["files"][name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoints step-3 and step-6, copied by each test that damages it."""
    out = tmp_path_factory.mktemp("trained")
    fit(out)
    assert ckpt.list_steps(out / "checkpoints") == [3, 6]
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ------------------------------------------------------------------ pickled payloads


@pytest.mark.parametrize("name", ["state.pt", "rng-rank0.pt"])
def test_pickled_payload_with_matching_manifest_is_refused(trained: Path, tmp_path: Path, capsys, name: str) -> None:
    out = copy_run(trained, tmp_path)
    newest = out / "checkpoints" / "step-6"
    marker = tmp_path / "pwned"
    state = torch.load(newest / name, weights_only=True)
    state["cursor" if name == "state.pt" else "python"] = Payload(marker)
    torch.save(state, newest / name)
    rehash(newest, name)

    # Neither the reader on its own nor a resume ever unpickles the payload.
    assert name in (ckpt.verify(newest) or "")
    with pytest.raises(ckpt.CheckpointError, match=name):
        ckpt.load(newest, ckpt.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    capsys.readouterr()
    result = fit(out, resume=True)
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"checkpoint {newest} is corrupted or incomplete: {name} holds something other than tensors" in err
    assert "io.open" in err  # says what it refused
    assert "resuming from" in err and "step-3" in err
    assert result.step == 6


def test_only_checkpoint_with_a_payload_starts_fresh(tmp_path: Path, capsys) -> None:
    fit(tmp_path, max_steps=3)
    only = tmp_path / "checkpoints" / "step-3"
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), only / "state.pt")
    rehash(only, "state.pt")
    capsys.readouterr()
    result = fit(tmp_path, max_steps=3, resume=True)
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "state.pt holds something other than tensors" in err and "starting fresh" in err
    assert result.step == 3


def test_cursor_the_safe_loader_would_refuse_fails_at_the_first_save(tmp_path: Path) -> None:
    class NumpyCursorTask(ToyTask):
        def batches(self, rank: int, world_size: int, cursor: Any) -> Iterator[tuple[Any, Any]]:
            for batch, after in super().batches(rank, world_size, cursor):
                yield batch, np.int64(after)

    with pytest.raises(ckpt.CheckpointError, match="cursor must be built from ints"):
        fit(tmp_path, task_cls=NumpyCursorTask, max_steps=3)


def test_rng_states_round_trip_through_the_safe_loader(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    ckpt._save_file(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == expected


# ------------------------------------------------------------------ malformed manifests

DIGEST = "0" * 64
MALFORMED = {
    "list": [],
    "null": None,
    "string": "files",
    "no files": {"step": 6},
    "files is a list": {"files": []},
    "files is a string": {"files": "state.pt"},
    "empty entry": {"files": {"state.pt": {}}},
    "entry is a list": {"files": {"state.pt": [1, DIGEST]}},
    "entry is null": {"files": {"state.pt": None}},
    "sha256 is a number": {"files": {"state.pt": {"size": 1, "sha256": 12345}}},
    "sha256 is not hex": {"files": {"state.pt": {"size": 1, "sha256": "not a digest"}}},
    "size is a string": {"files": {"state.pt": {"size": "1", "sha256": DIGEST}}},
    "size is a bool": {"files": {"state.pt": {"size": True, "sha256": DIGEST}}},
    "size is negative": {"files": {"state.pt": {"size": -1, "sha256": DIGEST}}},
    "size is a float": {"files": {"state.pt": {"size": 1.5, "sha256": DIGEST}}},
    "name leaves the directory": {"files": {"../step-3/state.pt": {"size": 1, "sha256": DIGEST}}},
    "absolute name": {"files": {"/etc/passwd": {"size": 1, "sha256": DIGEST}}},
}


@pytest.mark.parametrize("manifest", MALFORMED.values(), ids=MALFORMED.keys())
def test_manifest_of_the_wrong_shape_is_skipped_for_the_previous_checkpoint(
        trained: Path, tmp_path: Path, capsys, manifest: Any) -> None:
    out = copy_run(trained, tmp_path)
    newest = out / "checkpoints" / "step-6"
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_manifest(newest)
    assert "manifest.json" in (ckpt.verify(newest) or "")
    capsys.readouterr()
    result = fit(out, resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is corrupted or incomplete: malformed manifest.json" in err
    assert "resuming from" in err and "step-3" in err
    assert result.step == 6


def test_intact_manifest_reads_back(trained: Path) -> None:
    files = ckpt.read_manifest(trained / "checkpoints" / "step-6")
    assert set(files) == {"state.pt", "rng-rank0.pt"}
    assert all(isinstance(size, int) and len(digest) == 64 for size, digest in files.values())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
# Arbitrary JSON rarely has a "files" object: also build manifests of the right outline with arbitrary parts.
ENTRY = JSON | st.fixed_dictionaries({"size": JSON, "sha256": JSON}) | st.fixed_dictionaries(
    {"size": st.integers(min_value=-1, max_value=1 << 40), "sha256": st.text(alphabet="0123456789abcdef")})
NAMES = st.sampled_from(["state.pt", "rng-rank0.pt", "", ".", "..", "a/b", "x.pt"]) | st.text(max_size=300)
MANIFESTS = JSON | st.fixed_dictionaries({"files": JSON | st.dictionaries(NAMES, ENTRY, max_size=3)})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifest=MANIFESTS)
def test_any_json_manifest_gives_a_result_or_a_named_error(manifest: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "state.pt").write_bytes(b"not a checkpoint")
        (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        try:
            files = ckpt.read_manifest(path)
        except ckpt.CheckpointError as exc:
            assert "manifest.json" in str(exc)
        else:
            assert all(isinstance(n, str) and isinstance(s, int) and isinstance(d, str) for n, (s, d) in files.items())
        reason = ckpt.verify(path)
        assert reason is None or isinstance(reason, str)
        assert reason is not None  # nothing here is a valid checkpoint
