"""Checkpoints that survive being killed at any moment.

Layout: OUT/checkpoints/step-N/ holding `state.pt` (model, optimizer, scheduler, scaler, step, data cursor;
written by rank 0), `rng-rank{R}.pt` (each rank's RNG states) and `manifest.json` (size and sha256 of every
file). A checkpoint is written into `step-N.tmp/`, hashed, and only then renamed to `step-N/`, so a directory
named step-N without a valid manifest can only come from disk corruption or tampering; either way it is
skipped with a message and the previous checkpoint is used.

The manifest sits beside the files it hashes, so it proves they were not damaged by accident, never that
they are trustworthy: every file is loaded with `torch.load(weights_only=True)`, which builds tensors and
plain values (dicts, lists, tuples, str, numbers, None) and refuses anything that would run code. The
training state therefore holds only such values (numpy's RNG state is stored as a list), and a checkpoint
holding anything else is skipped like a damaged one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matelike.hashing import sha256_file
from matelike.train.distributed import DistInfo, barrier, broadcast_object

MANIFEST = "manifest.json"
STATE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, malformed, or holding more than tensors and plain values."""


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in values `torch.load(weights_only=True)` accepts."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    # numpy's key is an ndarray, which the safe loader refuses: store it as a list of ints (exact for uint32).
    numpy_state = [str(name), key.tolist(), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (after a round trip through a checkpoint file)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_steps(root: Path) -> list[int]:
    """Steps of the directories named step-N (complete or not), ascending."""
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            steps.append(int(p.name[5:]))
    return sorted(steps)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(path: Path) -> dict[str, tuple[int, str]]:
    """The files the manifest of checkpoint `path` lists, as {name: (size, sha256)}.

    Raises CheckpointError naming the problem when manifest.json is missing, is not JSON, or is JSON of
    another shape (a hand-edited or damaged file must never end in a TypeError deep inside resume).
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"no {MANIFEST} (write never finished)")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise CheckpointError(f"unreadable {MANIFEST} ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"malformed {MANIFEST}: expected an object with a \"files\" object")
    files: dict[str, tuple[int, str]] = {}
    for name, meta in data["files"].items():
        # A listed name is joined to the checkpoint directory: only plain file names, never a path elsewhere.
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise CheckpointError(f"malformed {MANIFEST}: {name!r} is not a file name")
        if not isinstance(meta, dict):
            raise CheckpointError(f"malformed {MANIFEST}: the entry of {name} is not an object")
        size, digest = meta.get("size"), meta.get("sha256")
        if not _is_int(size) or size < 0:
            raise CheckpointError(f"malformed {MANIFEST}: the size of {name} is not a byte count")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(f"malformed {MANIFEST}: the sha256 of {name} is not a hex digest")
        files[name] = (size, digest)
    return files


def _safe_load(file: Path, *, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`, every failure a CheckpointError naming the file.

    mmap=True maps the tensors instead of reading them: the whole pickle is still checked, cheaply.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice on how to load the file anyway; keep only what it refused.
        found = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\.?$)", str(exc), re.MULTILINE)
        what = found.group(1) if found else str(exc).splitlines()[0]
        raise CheckpointError(f"{file.name} holds something other than tensors and plain values, so it is not "
                              f"loaded (tampered with, or written by an older matelike): {what}") from None
    except Exception as exc:  # noqa: BLE001 - any byte string can reach the reader; each failure is reported
        raise CheckpointError(f"{file.name} cannot be loaded: {type(exc).__name__}: {exc}") from None


def verify(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete, intact and safe to load, else the reason it is not."""
    try:
        files = read_manifest(path)
    except CheckpointError as exc:
        return str(exc)
    for name, (size, digest) in files.items():
        f = path / name
        try:
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, manifest says {size}"
            if sha256_file(f) != digest:
                return f"{name} does not match its sha256"
        except OSError as exc:  # unreadable, or a name the filesystem refuses (too long, say)
            return f"{name} cannot be read ({exc.strerror or exc})"
    if STATE not in files:
        return f"manifest lists no {STATE}"
    # The hashes only prove the files are as written; whoever could write them could also write the manifest.
    # Unpickle each one safely now (tensors mapped, not read), so a bad file is skipped, not hit mid-resume.
    for name in files:
        if name.endswith(".pt"):
            try:
                obj = _safe_load(path / name, mmap=True)
            except CheckpointError as exc:
                return str(exc)
            if not isinstance(obj, dict):
                return f"{name} holds a {type(obj).__name__}, not a dict of states"
            del obj
    return None


def find_latest(root: Path, info: DistInfo) -> Path | None:
    """Newest intact checkpoint under `root` (rank 0 checks, every rank gets its answer); reports bad ones."""
    chosen: str | None = None
    if info.is_main:
        for step in reversed(list_steps(root)):
            path = step_dir(root, step)
            reason = verify(path)
            if reason is None:
                chosen = str(path)
                break
            print(f"matelike: checkpoint {path} is corrupted or incomplete: {reason}; "
                  f"skipping it in favour of an older one", file=sys.stderr, flush=True)
    chosen = broadcast_object(chosen, info)
    return Path(chosen) if chosen else None


def save(root: Path, step: int, state: dict[str, Any] | None, info: DistInfo, keep: int) -> Path:
    """Write checkpoint `step` atomically. `state` is rank 0's full training state (None on other ranks)."""
    final = step_dir(root, step)
    tmp = root / f"step-{step}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    tmp.mkdir(parents=True, exist_ok=True)  # a no-op on the shared filesystem that resume needs anyway
    _save_file(rng_state(), tmp / rng_file(info.rank))
    if info.is_main:
        assert state is not None
        _save_file(state, tmp / STATE)
        # Resume loads with weights_only=True: fail now, loudly, on a value it would refuse (a Task's cursor
        # holding a numpy integer, say) rather than at resume time, when the run is already lost.
        try:
            _safe_load(tmp / STATE, mmap=True)
        except CheckpointError as exc:
            raise CheckpointError(f"cannot write a resumable checkpoint: {exc}; a Task's cursor must be built "
                                  "from ints, floats, str, bool, None, tuples, lists and dicts") from None
    barrier(info)
    if info.is_main:
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        manifest = {"step": step, "world_size": info.world_size, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        with open(tmp / MANIFEST, "rb+") as f:
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. the final save right after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep)
    barrier(info)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete leftover temporary dirs and all but the newest `keep` checkpoints (0 keeps all)."""
    for p in root.glob("step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep <= 0:
        return
    for step in list_steps(root)[:-keep]:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)


def load(path: Path, info: DistInfo) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(training state, this rank's RNG state or None when the checkpoint came from fewer ranks).

    Loads with weights_only=True only (see the module docstring); raises CheckpointError naming the file.
    """
    state = _safe_load(path / STATE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE} holds a {type(state).__name__}, not a training state")
    rf = path / rng_file(info.rank)
    rng = _safe_load(rf) if rf.is_file() else None
    if rng is not None and not isinstance(rng, dict):
        raise CheckpointError(f"{rf} holds a {type(rng).__name__}, not RNG states")
    return state, rng
