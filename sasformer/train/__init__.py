"""Training: config, trainer loop, optimiser and schedule, checkpoints, metrics, data parallelism."""

from sasformer.train.checkpoint import latest_checkpoint, list_checkpoints, load_model
from sasformer.train.config import ModelSection, OptimSection, TrainConfig, load_config
from sasformer.train.trainer import NonFiniteLossError, Trainer, train

__all__ = [
    "ModelSection",
    "NonFiniteLossError",
    "OptimSection",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_config",
    "load_model",
    "train",
]
