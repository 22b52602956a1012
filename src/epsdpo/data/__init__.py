"""Preference data: loading, format detection, validation, exact tokenization, truncation and batching.

The trainer calls :func:`load_preference_dataset` (pairs + :class:`DataReport`) and batches the pairs with
:class:`PreferenceCollator`; ``docs/data.md`` describes the formats, the rules and the batch layout.
"""

from epsdpo.data.collate import PreferenceCollator, SharedPrefixBatch, batch_indices, shift_for_logps
from epsdpo.data.config import DataConfig
from epsdpo.data.errors import DataError
from epsdpo.data.pipeline import load_eval_dataset, load_preference_dataset
from epsdpo.data.report import DataReport
from epsdpo.data.tokenize import TokenizedPair, Truncation, mark_boundary, truncate_pair

__all__ = [
    "DataConfig",
    "DataError",
    "DataReport",
    "PreferenceCollator",
    "SharedPrefixBatch",
    "TokenizedPair",
    "Truncation",
    "batch_indices",
    "load_eval_dataset",
    "load_preference_dataset",
    "mark_boundary",
    "shift_for_logps",
    "truncate_pair",
]
