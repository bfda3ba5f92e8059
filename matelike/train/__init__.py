"""The one training engine shared by pretraining, SFT and DPO (protocol in matelike.train.engine)."""

from matelike.train.config import TrainConfig, add_engine_args
from matelike.train.engine import FitResult, Task, Trainer, TrainingDiverged, seed_everything

__all__ = ["TrainConfig", "add_engine_args", "Trainer", "Task", "FitResult", "TrainingDiverged", "seed_everything"]
