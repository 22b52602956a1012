"""Training: configuration, the explicit loop, checkpoints and metrics. Start with :func:`train`."""

from epsdpo.training.config import LossConfig, ModelConfig, RunConfig, TrainConfig, load_run_config
from epsdpo.training.loop import Trainer, TrainingError, TrainResult, train

__all__ = [
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "load_run_config",
    "train",
]
