"""The evaluation stage (``epsdpo eval``): gold reward against KL, win rate and held-out accuracy of a policy.

- :mod:`~epsdpo.stages.evaluate.measure`: loading the models, sampling, scoring and the metrics (:func:`evaluate`);
- :mod:`~epsdpo.stages.evaluate.config`: an evaluation's settings, name, destination and overwrite rule (the
  settings' dataclass, :class:`~epsdpo.eval_config.EvalConfig`, sits below training, which carries one);
- :mod:`~epsdpo.stages.evaluate.report`: the text table and the figures a summary keeps.
"""

from epsdpo.eval_config import EvalConfig, load_eval_config
from epsdpo.stages.evaluate.measure import (
    ReferenceModel,
    ReferencePart,
    compute_reference_part,
    evaluate,
    evaluate_models,
    reference_part_for,
)
from epsdpo.stages.evaluate.report import SUMMARY_KEYS, format_table

__all__ = [
    "SUMMARY_KEYS",
    "EvalConfig",
    "ReferenceModel",
    "ReferencePart",
    "compute_reference_part",
    "evaluate",
    "evaluate_models",
    "format_table",
    "load_eval_config",
    "reference_part_for",
]
