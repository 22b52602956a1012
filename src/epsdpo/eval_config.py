"""The settings of an evaluation (``epsdpo eval``, and the evaluation a training run or an iterate round makes).

They live below :mod:`epsdpo.training` because a run's config carries the settings of its own evaluation
(``eval_options``), checked when the config is loaded, before any model is loaded. The evaluation itself is
:mod:`epsdpo.stages.evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epsdpo.config import ConfigError, load_config
from epsdpo.sampling import SamplingConfig

__all__ = ["BUNDLED_TEST_PAIRS", "EvalConfig", "load_eval_config"]

#: ``eval_dataset=bundled``: the held-out pairs shipped with the package (from the test prompts)
BUNDLED_TEST_PAIRS = "data/sentiment_pairs_test.jsonl"


@dataclass
class EvalConfig(SamplingConfig):
    """Settings of ``epsdpo eval`` (section ``eval``; every key also works flat and as ``key=value``).

    The prompt and sampling keys are :class:`~epsdpo.stages.generate.SamplingConfig`'s (``prompt_split`` defaults to
    ``test`` here); the others:

    Attributes:
        run_dir: a run directory of ``epsdpo train``: its ``final/`` model is the policy (base + LoRA adapter for
            LoRA runs), its initial model the reference, its data and β the defaults below.
        model: the policy (alias, directory or Hub id) when there is no run directory; overrides the run's.
        checkpoint: evaluate the run's policy as saved at ``RUN_DIR/checkpoint-N`` (after N optimizer steps) instead
            of ``final/``; 0 is the initial model. β is the run's β after that step (``metrics.jsonl``). Points
            along one run's training trace its reward-vs-KL trajectory (``experiments/trajectory_frontier.py``).
        ref_model: the reference; default: the run's reference (its ``ref_model``, else its initial model).
        eval_dataset: held-out preference pairs for accuracy and margin (any source ``epsdpo.data`` reads, or
            ``bundled`` for the package's test pairs); default: the run's ``eval_dataset``/``eval_split``, else none.
        num_prompts: use the first this many prompts; ``None``: all of them.
        max_pairs: score at most the first this many held-out pairs for preference accuracy; ``None``: all.
        samples_per_prompt: responses sampled per prompt and model (the policy's and the reference's streams are
            independent).
        beta: β of the implicit reward in ``reward_margin``; default: the run's final β (ε-DPO) or its ``beta``.
        reference_cache: keep the reference's part of the evaluation (its samples, their rewards and log-probs,
            its log-probs of the held-out pairs), which no policy changes, under a key over everything that
            determines it (the reference's weights, dtype and device, the torch and transformers versions, the
            prompts, every sampling and scoring setting, the seed, the reward and the pairs' token ids); the next
            evaluation against the same reference with the same settings (another run of the same job, a sweep,
            ``experiments/kl_frontier.py``) reads it instead of sampling and scoring the reference again. Entries are
            written atomically; one that cannot be read back whole is computed again. false: always computed,
            nothing kept.
        reference_cache_dir: where the cache is kept; ``None``: ``$EPSDPO_CACHE_DIR/eval_reference`` (by default
            ``~/.cache/epsdpo/eval_reference``).
        name: the evaluation's name. With a run directory every evaluation is kept in ``RUN_DIR/evals/NAME/``
            (``eval.json``, ``samples.jsonl``); ``RUN_DIR/eval.json`` is a copy of the run's headline one, naming
            it, and ``RUN_DIR/plots/reward_vs_kl.png`` is drawn from it (see ``headline``). ``None``:
            ``after-training`` for the settings of the run's own evaluation (``eval_options``), else the settings
            that differ from those, e.g. ``num_prompts=64,seed=2``.
        output: write to this JSON file instead (``…_samples.jsonl`` beside it); ``RUN_DIR/eval.json`` and the plot
            are left alone. Without a run directory the default is ``eval.json``.
        overwrite: replace an earlier evaluation of the same name (or ``output``) that was made with other settings;
            without it that is refused. One with the same settings is replaced (a rerun), and said so.
        headline: whether the evaluation becomes the run's headline (``RUN_DIR/eval.json``, which the card, the
            summaries and ``RUN_DIR/plots/reward_vs_kl.png`` read). ``None``: when the run has no headline yet, or when
            it is the run's own evaluation again (name ``after-training``, or the headline's own name); an evaluation
            of a checkpoint, or one under another name (``name=quick`` on 16 prompts), is kept in ``RUN_DIR/evals/``
            and leaves the headline as it is, which is said. ``true``: always; ``false``: never.
        bf16: sample and score under bfloat16 autocast.
        forward_kl: also estimate KL(π_ref‖π) (``kl/forward``) from the reference's samples, which takes the policy's
            log-probs of all of them; false leaves it out (one of the four log-prob passes of an evaluation less).
    """

    prompt_split: str | None = "test"
    run_dir: str | None = None
    model: str | None = None
    checkpoint: int | None = None
    ref_model: str | None = None
    eval_dataset: str | None = None
    num_prompts: int | None = 64
    max_pairs: int | None = None
    samples_per_prompt: int = field(default=1, metadata={"reference_part": True})
    beta: float | None = None
    reference_cache: bool = field(default=True, metadata={"identifies": False})
    reference_cache_dir: str | None = None
    name: str | None = field(default=None, metadata={"identifies": False})
    output: str | None = field(default=None, metadata={"identifies": False})
    overwrite: bool = field(default=False, metadata={"identifies": False})
    headline: bool | None = field(default=None, metadata={"identifies": False})
    bf16: bool = field(default=False, metadata={"reference_part": True})
    forward_kl: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 or null (all prompts), got {self.num_prompts}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.checkpoint is not None and (self.checkpoint < 0 or self.run_dir is None or self.model is not None):
            raise ValueError("checkpoint=N (N >= 0) needs a run directory and no model=")


def load_eval_config(
    source: str | Path | Mapping[str, Any] | EvalConfig | None = None, overrides: Sequence[str] = ()
) -> EvalConfig:
    """An :class:`EvalConfig` from a run directory, a YAML file, a mapping or ``None``, plus ``key=value`` overrides.

    A directory holding ``config.yaml`` is read as ``run_dir=DIRECTORY``.
    """
    if isinstance(source, EvalConfig):
        if overrides:
            raise ConfigError("overrides need a YAML file or mapping, not an EvalConfig; use dataclasses.replace")
        return source
    if source is not None and not isinstance(source, Mapping) and Path(source).is_dir():
        if not (Path(source) / "config.yaml").is_file():
            raise ConfigError(
                f"{source} is a directory without config.yaml, so not a run directory of `epsdpo "
                "train`; give a run directory, an eval config YAML, or model=… ref_model=…"
            )
        source = {"run_dir": str(source)}
    return load_config(source, overrides, {"eval": EvalConfig})["eval"]
