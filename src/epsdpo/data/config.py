"""``DataConfig``: where the preference data comes from and how it is tokenized (section ``data``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TruncationMode = Literal["keep_end", "keep_start"]
OnInvalid = Literal["error", "skip"]
#: how ``epsdpo select`` and ``data.selection`` rank pairs (SPEC §3); ``data.selection`` also takes "none"
SelectionMethod = Literal["alignment_potential", "explicit", "implicit", "random"]

#: the tokenizer used when neither ``tokenizer`` nor a model is configured
DEFAULT_TOKENIZER = "smollm2-135m-instruct"


@dataclass
class DataConfig:
    """Preference data settings; names follow TRL's ``DPOConfig`` where TRL has the same option.

    Attributes:
        dataset: a local file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``), a directory written by
            ``datasets.Dataset.save_to_disk``, a directory of data files, or a Hugging Face Hub dataset id.
        dataset_config: the Hub dataset's configuration name (``load_dataset(dataset, dataset_config)``).
        split: the split to train on (ignored for single local files, which hold one split).
        eval_split: a split of ``dataset`` held out for evaluation.
        eval_dataset: a separate evaluation dataset (same kinds of source as ``dataset``); overrides ``eval_split``.
        prompt_column: column holding the prompt (a string or a list of messages); absent → implicit prompt.
        chosen_column: column holding the preferred response (a string or a list of messages).
        rejected_column: column holding the dispreferred response.
        score_chosen_column: numeric score of the chosen response; ``None`` uses ``score_chosen`` when present.
        score_rejected_column: numeric score of the rejected response; ``None`` uses ``score_rejected`` when present.
        scores_column: one column holding both scores, as ``[chosen, rejected]`` or ``{chosen: x, rejected: y}``, or
            the scores of all k ≥ 3 responses sampled for the prompt: the explicit margin is then their max − min
            (``epsdpo generate``'s rows need none of this: their ``score_chosen``/``score_rejected`` are the best and
            the worst of the k scores, so chosen − rejected already is max − min).
        max_length: longest prompt + completion in tokens; completions are cut from their end to fit.
        max_prompt_length: longest prompt in tokens, cut according to ``truncation_mode``; ``None``: no limit.
            Keep it below ``max_length``: a pair whose prompt leaves no room for a completion is dropped (counted).
        max_completion_length: longest completion in tokens (cut from its end); ``None``: only ``max_length``.
        truncation_mode: which end of an over-long prompt to keep (``keep_end``, TRL's default, keeps the text
            nearest the response; a leading BOS is kept either way).
        on_invalid: ``error`` stops at the first invalid row; ``skip`` drops it and counts it by reason.
        duplicates: what to do with a row that reads as the same pair as an earlier one (equal prompt, chosen,
            rejected, scores and finish flags): ``keep`` it (the default; counted in the report, with a warning,
            since it weighs twice in training) or ``drop`` it (counted as dropped, reason ``duplicate``).
        pad_to_multiple_of: pad each batch's length up to a multiple of this (e.g. 8 for tensor cores).
        group_by_length: batch pairs of similar length together (less padding; order stays random across groups).
        selection: train on a selected subset (SPEC §3): ``alignment_potential`` (z(m_ex) − w·z(m_im)), the
            single-term baselines ``explicit`` and ``implicit``, ``random``, or ``none`` (all pairs). Implicit
            margins come from the initial policy π₀ (the model training starts from, not a separate
            ``ref_model``); see :mod:`epsdpo.stages.select` and docs/methods/alignment-potential.md.
        select_ratio: the fraction of pairs kept by ``selection`` (0.4 in Huang et al. 2025).
        select_implicit_weight: w, the weight of the implicit-margin term.
        select_reward: compute explicit margins with this reward (``sentiment``, a reward model, ``module:fn``)
            instead of the data's score columns.
        select_cache_dir: where implicit margins are cached (keyed by model and data); default
            ``$EPSDPO_CACHE_DIR/margins``.
        tokenizer: tokenizer name or path (a built-in alias such as ``smollm2-135m-instruct``, a directory, a Hub id).
            ``None``: the model's own tokenizer (the run config's ``model``), or ``DEFAULT_TOKENIZER`` where no
            model is configured (``epsdpo check-data`` on a bare data file). Never a different model's tokenizer
            by accident.
    """

    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_dataset: str | None = None
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    score_chosen_column: str | None = None
    score_rejected_column: str | None = None
    scores_column: str | None = None
    max_length: int = 1024
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None
    truncation_mode: TruncationMode = "keep_end"
    on_invalid: OnInvalid = "error"
    duplicates: Literal["keep", "drop"] = "keep"
    pad_to_multiple_of: int | None = None
    group_by_length: bool = False
    selection: Literal["none", SelectionMethod] = "none"
    select_ratio: float = 0.4
    select_implicit_weight: float = 1.0
    select_reward: str | None = None
    select_cache_dir: str | None = field(default=None, metadata={"resume": False})  # a cache: free on resume
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.select_ratio <= 1.0:
            raise ValueError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        for name in ("max_length", "max_prompt_length", "max_completion_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {value}")
        if (self.score_chosen_column is None) != (self.score_rejected_column is None):
            raise ValueError("set both score_chosen_column and score_rejected_column, or neither")
        if self.scores_column is not None and self.score_chosen_column is not None:
            raise ValueError("set either scores_column or score_chosen_column/score_rejected_column, not both")
        columns = [self.prompt_column, self.chosen_column, self.rejected_column]
        if len(set(columns)) != 3:
            raise ValueError(f"prompt_column, chosen_column and rejected_column must differ, got {columns}")
