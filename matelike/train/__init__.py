"""The one training engine shared by pretraining, SFT and DPO (protocol in matelike.train.engine)."""

from __future__ import annotations

from typing import Any

from matelike.train.config import TrainConfig, add_engine_args

__all__ = ["TrainConfig", "add_engine_args", "Trainer", "Task", "FitResult", "TrainingDiverged", "seed_everything"]

_ENGINE_NAMES = {"Trainer", "Task", "FitResult", "TrainingDiverged", "seed_everything"}


def __getattr__(name: str) -> Any:
    # The engine imports torch; loading it lazily keeps `matelike --help` and the data commands fast,
    # since every stage registers its flags (from matelike.train.config) when the CLI starts.
    if name in _ENGINE_NAMES:
        from matelike.train import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'matelike.train' has no attribute {name!r}")
