"""Checkpoints that survive being killed at any moment.

Layout: OUT/checkpoints/step-N/ holding `state.pt` (model, optimizer, scheduler, scaler, step, data cursor;
written by rank 0), `rng-rank{R}.pt` (each rank's RNG states) and `manifest.json` (size and sha256 of every
file). A checkpoint is written into `step-N.tmp/`, hashed, and only then renamed to `step-N/`, so a directory
named step-N without a valid manifest can only come from disk corruption or tampering; either way it is
skipped with a message and the previous checkpoint is used.
"""

from __future__ import annotations

import json
import os
import random
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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def verify(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete and intact, else the reason it is not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (write never finished)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{name} does not match its sha256"
    if STATE not in files:
        return f"manifest lists no {STATE}"
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
    """(training state, this rank's RNG state or None when the checkpoint came from fewer ranks)."""
    # Our own files, already verified by hash; they hold RNG tuples, so not weights_only.
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    rf = path / rng_file(info.rank)
    rng = torch.load(rf, map_location="cpu", weights_only=False) if rf.is_file() else None
    return state, rng
