"""Training: configuration, the run's plan, the explicit step loop, checkpoints and metrics.

The whole run (selection, reference cache, loop, final model, evaluation, plots) is :func:`epsdpo.recipes.train.train`.
"""

from epsdpo.training.config import LossConfig, ModelConfig, RunConfig, TrainConfig, load_run_config
from epsdpo.training.loop import Trainer, TrainingError, TrainResult
from epsdpo.training.plan import RunPlan, plan_run

__all__ = [
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "RunPlan",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "load_run_config",
    "plan_run",
]
