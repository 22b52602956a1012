"""Evaluating an aligned model honestly (``../shared/SPEC.md`` §5): gold reward against KL, win rate, accuracy.

For held-out prompts x (the bundled test split by default) the policy π and the reference π_ref each sample
``samples_per_prompt`` responses, drawn independently: the policy's sample j of prompt x from the stream ``policy``,
the reference's from the stream ``reference`` (:func:`epsdpo.sampling.sample_seed`). The gold reward scores every
response. Then, over the n sampled responses of each model (standard errors over prompts, :mod:`epsdpo.stats`):

- ``policy/gold_reward``, ``reference/gold_reward``: mean gold reward r(x, y) of each model's samples (and ``_std``);
- ``gold_reward_gain``: the policy's mean reward minus the reference's, paired by prompt;
- ``kl`` = mean over y ~ π of log π(y|x) − log π_ref(y|x), the Monte-Carlo estimate of KL(π‖π_ref) from the
  policy's own samples (``kl/std``: the spread of the per-sample values);
- ``kl/forward`` = mean over y ~ π_ref of log π_ref(y|x) − log π(y|x), KL(π_ref‖π) from the reference's samples
  (unless ``forward_kl=false``);
- ``win_rate`` = P(r(Y) > r(Y′)) with Y ~ π and Y′ ~ π_ref drawn independently for the same prompt, ties counting ½
  (:func:`epsdpo.stats.win_rate`: every policy sample of a prompt against every reference sample of it);
- on held-out preference pairs (``eval_dataset``), with implicit reward r̂(x, y) = β (log π(y|x) − log π_ref(y|x)):
  ``reward_margin`` = mean r̂(x, y_w) − r̂(x, y_l), and ``preference_accuracy`` = the share of pairs where it is > 0.

Log-probabilities are sums over the sampled completion tokens (the end token included when it was sampled, nothing
after it) of the model's raw log-softmax, i.e. at temperature 1 without top-p. Each sequence is scored once: a model's
log-probs of its own samples are the sampler's (it had the raw logits of every drawn token) when it samples π itself
(temperature 1, top_p 1), and a separate scoring pass otherwise; every other scoring (the other model on a model's
samples, the held-out pairs) runs through training's fused head and one-pass vocabulary kernel
(:func:`epsdpo.logps.scoring.row_logps`). With the defaults ``temperature=1`` and ``top_p=1`` the
responses are samples of π itself and ``kl`` estimates the model's own KL(π‖π_ref) without bias. With other settings
the responses come from the tempered/truncated sampling policy, and ``kl`` is E_{y ~ sampler}[log π − log π_ref]: a
number to compare between runs evaluated with the same settings, not a KL of the models (the table says so).

**Computed once.** The reference's part (its samples, their rewards, its log-probs of them and of the held-out pairs,
:class:`ReferencePart`) depends on the reference, the prompts, the sampling and scoring settings, the reward and the
pairs, never on the policy: it is kept in a cache (``reference_cache``, by default in ``$EPSDPO_CACHE_DIR/
eval_reference``) under a key over all of them, and read back by the next evaluation that shares them. A run's own
evaluation after training reads the held-out pairs' log-probs from the trainer's end-of-training held-out pass
(:class:`~epsdpo.logps.scoring.PairScores`) when they are the same pairs at the same precision, instead of scoring
them again.

:func:`evaluate` writes the evaluation's own files (``eval.json`` and its samples, where ``name``/``output`` say) and
returns the result; publishing it as a run's headline evaluation (``RUN_DIR/eval.json``, the reward-vs-KL plot) is
for the caller (the ``train`` recipe, the ``eval`` verb: :func:`epsdpo.rundir.publish_evaluation`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from epsdpo.config import ConfigError, fields_where
from epsdpo.data import DataConfig, load_eval_dataset, load_preference_dataset
from epsdpo.eval_config import BUNDLED_TEST_PAIRS, EvalConfig, load_eval_config
from epsdpo.files import write_text_atomically
from epsdpo.logps.scoring import PairScores, autocast, pair_rows, pairs_key, row_logps
from epsdpo.machine import machine_label
from epsdpo.models import (
    cache_dir,
    initial_model,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    quiet_peft_wrapping,
    reference_identity,
)
from epsdpo.rewards import load_reward
from epsdpo.rundir import beta_at_step, checkpoint_policy, final_beta
from epsdpo.runlock import output_file_lock
from epsdpo.sampling import (
    Completion,
    decode_completion,
    encode_prompt,
    end_token_ids,
    load_prompts,
    sample_completions,
    sample_seed,
    samples_the_model,
    wants_chat_template,
)
from epsdpo.stages.evaluate.config import check_overwrite, destination, evaluation_settings
from epsdpo.stats import Estimate, distinct_n, estimate, grouped, one_token_repeated, paired_gain, win_rate
from epsdpo.training.config import load_run_config, tokenizer_name

__all__ = [
    "LoadedModels",
    "ReferenceModel",
    "ReferencePart",
    "compute_reference_part",
    "default_reference_cache_dir",
    "evaluate",
    "evaluate_models",
    "load_run_models",
    "reference_part_for",
]

logger = logging.getLogger(__name__)

#: the layout of a reference cache entry; a change of what it holds or how a field is computed bumps it
REFERENCE_CACHE_FORMAT = 3

#: the reference an evaluation runs: a module, or a function returning a context that yields the module to run as the
#: reference while it is open (a LoRA policy with its adapters disabled, as training runs it: no second copy held)
ReferenceModel = nn.Module | Callable[[], contextlib.AbstractContextManager[nn.Module]]


def _reference_module(reference: ReferenceModel) -> contextlib.AbstractContextManager[nn.Module]:
    """A context yielding the module to run as the reference."""
    return contextlib.nullcontext(reference) if isinstance(reference, nn.Module) else reference()


def _sample_all(
    model: nn.Module,
    tokenizer: Any,
    encoded: Sequence[list[int]],
    prompt_ids: Sequence[str],
    cfg: EvalConfig,
    end_ids: Sequence[int],
    stream: str,
) -> list[Completion]:
    """``samples_per_prompt`` completions per prompt (prompt-major); sample j of a prompt is seeded by (seed, id, j)
    in the model's own family of streams (``policy`` or ``reference``), so the two models' draws are independent."""
    k = cfg.samples_per_prompt
    out: list[Completion] = []
    batches = range(0, len(encoded), cfg.batch_size)
    for start in tqdm(batches, desc=f"eval: sample ({stream})", disable=cfg.disable_tqdm, dynamic_ncols=True):
        ids = [p for p in encoded[start : start + cfg.batch_size] for _ in range(k)]
        seeds = [
            sample_seed(cfg.seed, pid, j, stream)
            for pid in prompt_ids[start : start + cfg.batch_size]
            for j in range(k)
        ]
        with autocast(model, cfg.bf16):
            out.extend(
                sample_completions(
                    model,
                    ids,
                    seeds,
                    max_new_tokens=cfg.max_new_tokens,
                    end_ids=end_ids,
                    pad_id=tokenizer.pad_token_id,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    with_logps=samples_the_model(cfg.temperature, cfg.top_p),
                )
            )
    return out


def _own_logps(
    model: nn.Module,
    samples: Sequence[Completion],
    rows: list[tuple[list[int], list[int]]],
    cfg: EvalConfig,
    pad: int,
    desc: str,
) -> torch.Tensor:
    """A model's log-probs of its own samples: the sampler's when it sampled π itself (no second pass over the same
    sequences), a scoring pass when the draws were tempered or truncated."""
    if samples_the_model(cfg.temperature, cfg.top_p):
        return torch.tensor([c.logp for c in samples], dtype=torch.float32)
    return row_logps(model, rows, pad, **_logp_options(cfg), desc=desc)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _logp_options(cfg: EvalConfig) -> dict[str, Any]:
    """The :func:`row_logps` options every scoring pass of an evaluation uses."""
    return {"batch_size": cfg.batch_size, "bf16": cfg.bf16, "disable_tqdm": cfg.disable_tqdm}


def _with_se(metrics: dict[str, Any], key: str, est: Estimate, interval: bool = False) -> None:
    """``key`` = the mean, ``key_se`` its standard error (over prompts), ``key_ci95`` its interval if asked."""
    metrics[key], metrics[f"{key}_se"] = est.mean, est.se
    if interval:
        metrics[f"{key}_ci95"] = list(est.ci95)


@dataclass
class ReferencePart:
    """What an evaluation computes from the reference alone: the same for every policy evaluated against this
    reference with the same prompts, settings and held-out pairs (see ``reference_cache_dir``).

    Attributes:
        samples: the reference's sampled responses, prompt-major (:class:`Completion` ids and finished flags).
        rewards: their gold rewards.
        self_logps: log π_ref of each of its own samples.
        pair_logps: log π_ref of the held-out pairs' rows (chosen rows, then rejected rows), or None without pairs.
    """

    samples: list[Completion]
    rewards: list[float]
    self_logps: list[float]
    pair_logps: list[float] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": [[c.ids, c.finished] for c in self.samples],
            "rewards": self.rewards,
            "self_logps": self.self_logps,
            "pair_logps": self.pair_logps,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferencePart:
        """The part a :meth:`to_dict` mapping holds; ``ValueError`` naming what is wrong when it is not one (a
        missing field, a value of the wrong type, a non-finite number, lists of different lengths)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"not a mapping but {type(d).__name__}")
        missing = [k for k in ("samples", "rewards", "self_logps", "pair_logps") if k not in d]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        samples = d["samples"]
        if not isinstance(samples, list) or not all(_is_sample(x) for x in samples):
            raise ValueError("samples: not a list of [token ids, finished]")
        rewards, self_logps, pair_logps = d["rewards"], d["self_logps"], d["pair_logps"]
        for name, values in (("rewards", rewards), ("self_logps", self_logps)):
            if not _finite_list(values) or len(values) != len(samples):
                raise ValueError(f"{name}: not {len(samples)} finite numbers (one per sample)")
        if pair_logps is not None and (not _finite_list(pair_logps) or len(pair_logps) % 2):
            raise ValueError("pair_logps: not an even number of finite numbers (chosen rows, then rejected rows)")
        return cls(
            [Completion(list(ids), bool(done), float(lp)) for (ids, done), lp in zip(samples, self_logps, strict=True)],
            [float(x) for x in rewards],
            [float(x) for x in self_logps],
            None if pair_logps is None else [float(x) for x in pair_logps],
        )


def _is_sample(x: Any) -> bool:
    return (
        isinstance(x, list)
        and len(x) == 2
        and isinstance(x[0], list)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in x[0])
        and isinstance(x[1], bool)
    )


def _finite_list(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def _encoded_prompts(tokenizer: Any, prompts: Sequence[tuple[str, str]], cfg: EvalConfig) -> list[list[int]]:
    chat = wants_chat_template(tokenizer, cfg.use_chat_template)
    return [encode_prompt(tokenizer, text, chat) for _, text in prompts]


def _prompt_texts(prompts: Sequence[tuple[str, str]], k: int) -> list[str]:
    return [text for _, text in prompts for _ in range(k)]


def compute_reference_part(
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[tuple[str, str]],
    reward: Any,
    cfg: EvalConfig,
    pairs: Sequence[Any] | None = None,
    pair_logps: Sequence[float] | None = None,
) -> ReferencePart:
    """Sample, score and take the log-probs the evaluation needs from the reference alone.

    ``pair_logps``: the reference's log-probs of the pairs' rows when they were computed already (the trainer's
    held-out pass, :class:`PairScores`); otherwise they are scored here."""
    encoded = _encoded_prompts(tokenizer, prompts, cfg)
    samples = _sample_all(
        reference, tokenizer, encoded, [pid for pid, _ in prompts], cfg, end_token_ids(tokenizer), "reference"
    )
    k = cfg.samples_per_prompt
    texts = [decode_completion(tokenizer, c) for c in samples]
    rows = [(encoded[i // k], c.ids) for i, c in enumerate(samples)]
    pad, opts = tokenizer.pad_token_id, _logp_options(cfg)
    if pairs and pair_logps is None:
        pair_logps = row_logps(
            reference, pair_rows(pairs), pad, **opts, desc="eval: held-out pairs (reference)"
        ).tolist()
    self_logps = _own_logps(reference, samples, rows, cfg, pad, "eval: log-probs (reference)").tolist()
    return ReferencePart(
        samples, list(reward(_prompt_texts(prompts, k), texts)), self_logps, list(pair_logps) if pairs else None
    )


def evaluate_models(
    policy: nn.Module,
    reference: ReferenceModel,
    tokenizer: Any,
    prompts: Sequence[tuple[str, str]],
    reward: Any,
    cfg: EvalConfig,
    *,
    pairs: Sequence[Any] | None = None,
    beta: float = 0.1,
    reference_part: ReferencePart | None = None,
    pair_scores: PairScores | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The metrics of the module docstring for loaded models; also one record per sampled (prompt, j).

    ``reference``: a module, or a function returning a context that yields it (:data:`ReferenceModel`);
    ``prompts``: ``(prompt_id, text)``; ``reward``: a :class:`epsdpo.rewards.Reward`; ``pairs``: held-out
    :class:`TokenizedPair` s (or None); ``beta``: β of the implicit reward; ``reference_part``: the reference's part,
    computed earlier with the same settings (:func:`compute_reference_part`), or None to compute it here;
    ``pair_scores``: these pairs' log-probs under this policy (and, unless its ``reference`` is None, this
    reference), computed already (the trainer's held-out pass): the held-out figures are taken from them.
    """
    if pair_scores is not None and (not pairs or pair_scores.key != pairs_key(pairs)):
        raise ValueError("pair_scores were computed for other held-out pairs than these")
    given_ref = None if pair_scores is None else pair_scores.reference
    ref_side = reference_part
    if ref_side is None:
        with _reference_module(reference) as ref_module:
            ref_side = compute_reference_part(ref_module, tokenizer, prompts, reward, cfg, pairs, given_ref)
    expected = (len(prompts) * cfg.samples_per_prompt, None if not pairs else 2 * len(pairs))
    got = (len(ref_side.samples), None if ref_side.pair_logps is None else len(ref_side.pair_logps))
    if got != expected:
        raise ValueError(
            f"the reference part holds {got[0]} samples and {got[1]} pair rows, this evaluation needs "
            f"{expected[0]} and {expected[1]}: it was computed for other prompts, settings or pairs"
        )
    encoded = _encoded_prompts(tokenizer, prompts, cfg)
    ids = [pid for pid, _ in prompts]
    k = cfg.samples_per_prompt
    end_ids = end_token_ids(tokenizer)
    samples = {
        "policy": _sample_all(policy, tokenizer, encoded, ids, cfg, end_ids, "policy"),
        "reference": ref_side.samples,
    }
    texts = {name: [decode_completion(tokenizer, c) for c in done] for name, done in samples.items()}
    prompt_texts = _prompt_texts(prompts, k)
    rewards = {"policy": list(reward(prompt_texts, texts["policy"])), "reference": ref_side.rewards}
    n = len(samples["policy"])
    pad, opts = tokenizer.pad_token_id, _logp_options(cfg)
    own = [(encoded[i // k], c.ids) for i, c in enumerate(samples["policy"])]
    theirs = [(encoded[i // k], c.ids) for i, c in enumerate(samples["reference"])]
    # the policy on its samples (from its sampling pass when it sampled π) and on the reference's, for kl/forward;
    # the reference on the policy's samples
    lp_pol_own = _own_logps(policy, samples["policy"], own, cfg, pad, "eval: log-probs (policy)")
    lp_pol_theirs = (
        row_logps(policy, theirs, pad, **opts, desc="eval: log-probs (policy on the reference's samples)")
        if cfg.forward_kl
        else None
    )
    with _reference_module(reference) as ref_module:
        lp_ref_own = row_logps(ref_module, own, pad, **opts, desc="eval: log-probs (reference on the policy's samples)")
    lp_ref_theirs = torch.tensor(ref_side.self_logps)
    kl_values = (lp_pol_own - lp_ref_own).tolist()  # y ~ π: log π − log π_ref
    metrics: dict[str, Any] = {}
    for name in ("policy", "reference"):
        _with_se(metrics, f"{name}/gold_reward", estimate(grouped(rewards[name], k)))
        metrics[f"{name}/gold_reward_std"] = _mean_std(rewards[name])[1]
        metrics[f"{name}/response_tokens"] = statistics.fmean(len(c.ids) for c in samples[name])
        metrics[f"{name}/finished"] = statistics.fmean(c.finished for c in samples[name])
        metrics[f"{name}/distinct_2"] = distinct_n(texts[name], 2)
        metrics[f"{name}/one_token_repeated"] = sum(one_token_repeated(c.ids, end_ids) for c in samples[name])
    _with_se(metrics, "gold_reward_gain", paired_gain(rewards["policy"], rewards["reference"], k), interval=True)
    _with_se(metrics, "kl", estimate(grouped(kl_values, k)))
    metrics["kl/std"] = _mean_std(kl_values)[1]
    if lp_pol_theirs is not None:
        forward_values = (lp_ref_theirs - lp_pol_theirs).tolist()  # y ~ π_ref: log π_ref − log π
        _with_se(metrics, "kl/forward", estimate(grouped(forward_values, k)))
        metrics["kl/forward_std"] = _mean_std(forward_values)[1]
    _with_se(metrics, "win_rate", win_rate(rewards["policy"], rewards["reference"], k), interval=True)
    ref_pairs = given_ref if given_ref is not None else ref_side.pair_logps
    pol_pairs = None if pair_scores is None else pair_scores.policy
    metrics.update(_pair_metrics(policy, pairs, ref_pairs, pad, beta, cfg, pol_pairs))
    metrics["num_prompts"], metrics["num_samples"], metrics["samples_per_prompt"] = len(prompts), n, k
    records = [
        {
            "prompt_id": ids[i // k],
            "sample": i % k,
            "prompt": prompt_texts[i],
            "policy": texts["policy"][i],
            "reference": texts["reference"][i],
            "policy_reward": rewards["policy"][i],
            "reference_reward": rewards["reference"][i],
            "policy_logp": float(lp_pol_own[i]),
            "policy_ref_logp": float(lp_ref_own[i]),
            "reference_logp": float(lp_ref_theirs[i]),
            "reference_policy_logp": None if lp_pol_theirs is None else float(lp_pol_theirs[i]),
        }
        for i in range(n)
    ]
    return metrics, records


def _pair_metrics(
    policy: nn.Module,
    pairs: Sequence[Any] | None,
    ref_logps: list[float] | None,
    pad_id: int,
    beta: float,
    cfg: EvalConfig,
    policy_logps: list[float] | None = None,
) -> dict[str, Any]:
    """Preference accuracy and mean implicit reward margin on held-out pairs (None without pairs); the policy's
    log-probs of their rows are scored here unless given (``policy_logps``, the trainer's held-out pass)."""
    if not pairs or ref_logps is None:
        return {
            "preference_accuracy": None,
            "preference_accuracy_se": None,
            "reward_margin": None,
            "reward_margin_se": None,
            "num_pairs": 0,
            "beta": beta,
        }
    lp_pol = (
        torch.tensor(policy_logps, dtype=torch.float32)
        if policy_logps is not None
        else row_logps(policy, pair_rows(pairs), pad_id, **_logp_options(cfg), desc="eval: held-out pairs (policy)")
    )
    lp_ref = torch.tensor(ref_logps, dtype=torch.float32)
    p = len(pairs)
    margins = beta * ((lp_pol[:p] - lp_ref[:p]) - (lp_pol[p:] - lp_ref[p:]))  # r̂(y_w) − r̂(y_l)
    metrics: dict[str, Any] = {"num_pairs": p, "beta": beta}
    _with_se(metrics, "preference_accuracy", estimate((margins > 0).float().tolist()))
    _with_se(metrics, "reward_margin", estimate(margins.tolist()))
    return metrics


# ---- loading ------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModels:
    policy: nn.Module
    reference: nn.Module
    tokenizer: Any
    beta: float
    data: Any  # the run's DataConfig, or None
    names: dict[str, str]
    reference_id: str  # what determines the reference's weights (epsdpo.stages.select.model_identity)


def load_run_models(cfg: EvalConfig) -> LoadedModels:
    run = Path(str(cfg.run_dir))
    run_cfg = load_run_config(run / "config.yaml")
    final = run / "final"
    if cfg.model is None and cfg.checkpoint is None and not final.is_dir():
        raise FileNotFoundError(
            f"{run} has no final/ model (training did not finish); finish or resume the run "
            "(resume_from_checkpoint=auto), or give model=PATH."
        )
    tokenizer = load_tokenizer(
        cfg.tokenizer or (str(final) if final.is_dir() else tokenizer_name(run_cfg)), cfg.trust_remote_code
    )
    m = run_cfg.models
    if m.trust_remote_code and not cfg.trust_remote_code:  # a run directory never grants it (it may come from anyone)
        print(
            f"epsdpo eval: {run} was trained with trust_remote_code=true; a run directory never grants it: pass "
            "trust_remote_code=true to this evaluation if its models need their own code and you trust it",
            file=sys.stderr,
            flush=True,
        )

    def initial() -> nn.Module:  # the run's starting point, rebuilt exactly as the trainer built it
        return initial_model(m.model, m.model_config, len(tokenizer), run_cfg.train.seed, cfg.trust_remote_code)

    if cfg.checkpoint is not None:
        policy = checkpoint_policy(run, cfg.checkpoint, m, initial)
        policy_name = f"{run} after {cfg.checkpoint} steps" + ("" if cfg.checkpoint else " (the initial model)")
    elif cfg.model is not None:
        policy, policy_name = load_causal_lm(cfg.model, cfg.trust_remote_code), cfg.model
    elif (final / "adapter_config.json").is_file():  # LoRA: the base with the adapter merged in
        with quiet_peft_wrapping():
            policy = PeftModel.from_pretrained(initial(), str(final)).merge_and_unload()
        policy_name = f"{m.model} + LoRA adapter {final}"
    else:
        policy, policy_name = load_causal_lm(str(final), cfg.trust_remote_code), str(final)
    ref_name = cfg.ref_model or m.ref_model
    reference = load_causal_lm(ref_name, cfg.trust_remote_code) if ref_name else initial()
    ref_label = ref_name or (
        m.model if m.model_config is None else f"{m.model} (random init, seed {run_cfg.train.seed})"
    )
    ref_id = model_identity(ref_name) if cfg.ref_model else reference_identity(m, run_cfg.train.seed)
    if cfg.beta is not None:
        beta = cfg.beta
    else:
        beta = final_beta(run, run_cfg) if cfg.checkpoint is None else beta_at_step(run, cfg.checkpoint, run_cfg)
    return LoadedModels(
        policy,
        reference,
        tokenizer,
        beta,
        run_cfg.data,
        {"policy": policy_name, "reference": ref_label},
        ref_id,
    )


def _load_models(cfg: EvalConfig) -> LoadedModels:
    if cfg.run_dir is not None:
        loaded = load_run_models(cfg)
    else:
        if cfg.model is None or cfg.ref_model is None:
            raise ConfigError("give a run directory (epsdpo eval RUN_DIR), or both model=… and ref_model=…")
        loaded = LoadedModels(
            load_causal_lm(cfg.model, cfg.trust_remote_code),
            load_causal_lm(cfg.ref_model, cfg.trust_remote_code),
            load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code),
            cfg.beta or 0.1,
            None,
            {"policy": cfg.model, "reference": cfg.ref_model},
            model_identity(cfg.ref_model),
        )
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for model in (loaded.policy, loaded.reference):
        model.requires_grad_(False).eval().to(device)
    return loaded


def _held_out_pairs(cfg: EvalConfig, run_data: Any, tokenizer: Any) -> tuple[list[Any] | None, str | None]:
    """The held-out pairs (the first ``max_pairs``) and where they came from."""
    pairs, source = _all_held_out_pairs(cfg, run_data, tokenizer)
    if pairs is not None and cfg.max_pairs is not None:
        pairs = pairs[: cfg.max_pairs]
    return pairs, source


def _all_held_out_pairs(cfg: EvalConfig, run_data: Any, tokenizer: Any) -> tuple[list[Any] | None, str | None]:
    """The held-out pairs (tokenized as in training, with the run's length limits) and where they came from."""

    base = run_data if run_data is not None else DataConfig()
    if cfg.eval_dataset is None:
        if run_data is None:
            return None, None
        loaded = load_eval_dataset(run_data, tokenizer)
        source = run_data.eval_dataset or f"{run_data.dataset}[{run_data.eval_split}]"
        return (loaded[0], source) if loaded else (None, None)
    source = cfg.eval_dataset
    if source == "bundled":
        source = str(files("epsdpo.assets").joinpath(BUNDLED_TEST_PAIRS))
    pairs, _ = load_preference_dataset(replace(base, dataset=source, split="train"), tokenizer)
    return pairs, source


def evaluate(
    config: EvalConfig | str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    held_out: PairScores | None = None,
) -> dict[str, Any]:
    """Load the models, sample, score and write ``eval.json`` (and ``…_samples.jsonl``); returns the metrics.

    ``config``: an :class:`EvalConfig`, a run directory, a YAML file, a mapping or ``None``, plus overrides.
    ``held_out``: the held-out pairs as the trainer's end-of-training pass scored them, for the policy being
    evaluated (the run's final model): used instead of scoring the pairs again when they are this evaluation's pairs
    at its precision (the reference's, also when they are its reference's); otherwise ignored, and said so.
    """

    cfg = load_eval_config(config, overrides)
    started = time.perf_counter()
    # where it goes, and whether that is allowed, before the minutes of sampling (a refusal costs nothing)
    name, output, samples_path = destination(cfg)
    settings = evaluation_settings(cfg)
    check_overwrite(output, settings, cfg.overwrite)
    # one writer per evaluation file (evaluations into other files of one run may run side by side); taking the
    # lock also proves the destination writable, before any model is loaded or sampled
    with output_file_lock(output):
        return _evaluate(cfg, name, output, samples_path, settings, started, held_out)


def _evaluate(
    cfg: EvalConfig,
    name: str,
    output: Path,
    samples_path: Path,
    settings: dict[str, Any],
    started: float,
    held_out: PairScores | None,
) -> dict[str, Any]:
    _say(cfg, "eval: loading the policy and the reference")
    loaded = _load_models(cfg)
    prompts = load_prompts(cfg.prompts, cfg.prompt_split, cfg.prompt_column, cfg.num_prompts)
    pairs, pairs_source = _held_out_pairs(cfg, loaded.data, loaded.tokenizer)
    reward = load_reward(cfg.reward)
    scores = _usable_scores(held_out, pairs, cfg, loaded.reference_id)
    given = None if scores is None else scores.reference
    part, cache_file = reference_part_for(
        loaded.reference, loaded.reference_id, loaded.tokenizer, prompts, reward, cfg, pairs, given
    )
    metrics, records = evaluate_models(
        loaded.policy,
        loaded.reference,
        loaded.tokenizer,
        prompts,
        reward,
        cfg,
        pairs=pairs,
        beta=loaded.beta,
        reference_part=part,
        pair_scores=scores,
    )
    result = {
        **metrics,
        "name": name,
        "policy": loaded.names["policy"],
        "reference": loaded.names["reference"],
        "eval_dataset": pairs_source,
        "samples_file": samples_path.name,
        "seconds": time.perf_counter() - started,
        "reference_cache": None if cache_file is None else str(cache_file),
        "machine": machine_label(),
        "settings": settings,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    samples_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    result["output"] = str(output)
    return result


def _say(cfg: EvalConfig, message: str, info: bool = False) -> None:
    """A progress line on stderr (unless ``disable_tqdm``); ``info``: also logged (``logging``, INFO)."""
    if info:
        logger.info("%s", message)
    if not cfg.disable_tqdm:
        print(message, file=sys.stderr, flush=True)


def _usable_scores(
    held_out: PairScores | None, pairs: Sequence[Any] | None, cfg: EvalConfig, reference_id: str
) -> PairScores | None:
    """The trainer's held-out log-probs where this evaluation may use them instead of scoring its pairs again: the
    same pairs (token ids), the same precision; the reference's only when it is this evaluation's reference."""
    if held_out is None:
        return None
    why = None
    if not pairs or held_out.key != pairs_key(pairs):
        why = "the evaluation's held-out pairs are other pairs"
    elif held_out.bf16 != cfg.bf16:
        why = f"training scored them with bf16={held_out.bf16}, the evaluation runs with bf16={cfg.bf16}"
    if why is not None:
        _say(cfg, f"eval: scoring the held-out pairs again ({why})", info=True)
        return None
    if held_out.reference is not None and held_out.reference_id != reference_id:
        held_out = replace(held_out, reference=None, reference_id=None)
    whose = "the policy's and the reference's" if held_out.reference is not None else "the policy's"
    _say(cfg, f"eval: held-out pairs: {whose} log-probs from the trainer's held-out pass", info=True)
    return held_out


def default_reference_cache_dir() -> Path:
    """Where the reference's parts of evaluations are kept by default: ``$EPSDPO_CACHE_DIR/eval_reference`` (or
    ``~/.cache/epsdpo/eval_reference``)."""
    return cache_dir() / "eval_reference"


def _weights_identity(reference_id: str) -> str:
    """The reference's identity made to follow its weights: a Hugging Face Hub id (whose files
    :func:`~epsdpo.models.model_identity` does not see) gets the commit of the snapshot the local Hub cache holds."""
    if reference_id.startswith("random:") or "|" in reference_id or Path(reference_id).exists():
        return reference_id
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(reference_id, "config.json")
    except Exception:  # not a repository id (or an old huggingface_hub): the name is all there is
        return reference_id
    return f"{reference_id}@{Path(found).parent.name}" if isinstance(found, str) else reference_id


def _reward_identity(spec: str) -> str:
    """The gold reward's identity: its spec, with the VADER version for ``sentiment``, the module file's digest for
    ``module:function`` and the weights' identity for a reward model."""
    import importlib.metadata
    import importlib.util

    if spec == "sentiment":
        try:
            return f"sentiment|vaderSentiment {importlib.metadata.version('vaderSentiment')}"
        except importlib.metadata.PackageNotFoundError:
            return spec
    if ":" in spec and not Path(spec).exists():
        try:
            found = importlib.util.find_spec(spec.split(":", 1)[0])
        except (ImportError, ValueError):
            found = None
        origin = None if found is None else found.origin
        if origin and Path(origin).is_file():
            return f"{spec}|{hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]}"
        return spec
    return _weights_identity(model_identity(spec))


def reference_part_for(
    reference: ReferenceModel,
    reference_id: str,
    tokenizer: Any,
    prompts: Sequence[tuple[str, str]],
    reward: Any,
    cfg: EvalConfig,
    pairs: Sequence[Any] | None = None,
    pair_logps: Sequence[float] | None = None,
) -> tuple[ReferencePart, Path | None]:
    """The reference's part of an evaluation and the cache file it was read from or written to (None with
    ``reference_cache=false``): read from the cache on a hit, else computed (:func:`compute_reference_part`) and,
    with the cache on, written there. ``reference_id``: what determines the reference's weights
    (:func:`~epsdpo.models.reference_identity`); ``pair_logps``: as in :func:`compute_reference_part`."""
    expected = (len(prompts) * cfg.samples_per_prompt, 2 * len(pairs) if pairs else None)
    with _reference_module(reference) as module:
        cache_file, key, part = None, "", None
        if cfg.reference_cache:
            cache_file, key = _reference_cache_file(cfg, module, reference_id, tokenizer, prompts, pairs)
            part = _read_reference_part(cache_file, key, expected, cfg)
        if part is None:
            part = compute_reference_part(module, tokenizer, prompts, reward, cfg, pairs, pair_logps)
            if cache_file is not None:  # concurrent writers each rename a complete file of their own
                entry = {"format": REFERENCE_CACHE_FORMAT, "key": key, **part.to_dict()}
                write_text_atomically(cache_file, json.dumps(entry))
                _say(cfg, f"eval: reference part written to the cache: {cache_file}", info=True)
    return part, cache_file


def _reference_cache_file(
    cfg: EvalConfig,
    reference: nn.Module,
    reference_id: str,
    tokenizer: Any,
    prompts: Sequence[tuple[str, str]],
    pairs: Sequence[Any] | None,
) -> tuple[Path, str]:
    """The cache file of the reference's part and its key: a digest of everything that determines the part.

    The reference's weights (:func:`~epsdpo.models.model_identity`: a local directory's weights files, a random
    model's architecture and seed, a Hub snapshot's commit), its dtype and device, the torch and transformers
    versions (their kernels decide the rounding), the prompts as text and as token ids, the end and pad tokens, every
    sampling and scoring setting (``reference_part`` on the config's fields: lengths, temperature, top_p, batch size,
    seed, chat template, samples per prompt, bf16), the reward, and the held-out pairs' token ids (which carry the
    pairs' length limits)."""
    import transformers

    param = next(reference.parameters())
    determines = {
        "format": REFERENCE_CACHE_FORMAT,
        "reference": _weights_identity(reference_id),
        "dtype": str(param.dtype),
        "device": param.device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompts": list(prompts),
        "reward": _reward_identity(cfg.reward),
        "prompt_ids": _encoded_prompts(tokenizer, prompts, cfg),
        "pad": tokenizer.pad_token_id,
        "end_ids": list(end_token_ids(tokenizer)),
        "settings": {k: getattr(cfg, k) for k in fields_where(cfg, "reference_part", default=False)},
        "pairs": None if not pairs else [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs],
    }
    key = hashlib.sha256(json.dumps(determines, sort_keys=True).encode()).hexdigest()[:24]
    directory = Path(cfg.reference_cache_dir) if cfg.reference_cache_dir else default_reference_cache_dir()
    return directory / f"eval_reference-{key}.json", key


def _read_reference_part(
    path: Path, key: str, expected: tuple[int, int | None], cfg: EvalConfig
) -> ReferencePart | None:
    """The cached part at ``path`` (a hit), or None (a miss): absent, or unusable (not JSON, cut short, another
    format or key, the wrong fields or lengths), which is logged and then recomputed, never used."""
    if not path.is_file():
        _say(cfg, f"eval: reference cache miss (key {key}): computing the reference's part", info=True)
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or entry.get("format") != REFERENCE_CACHE_FORMAT or entry.get("key") != key:
            raise ValueError(f"not a format-{REFERENCE_CACHE_FORMAT} entry of key {key}")
        part = ReferencePart.from_dict(entry)
        got = (len(part.samples), None if part.pair_logps is None else len(part.pair_logps))
        if got != expected:
            raise ValueError(f"{got[0]} samples and {got[1]} pair rows where {expected[0]} and {expected[1]} belong")
    except (OSError, UnicodeDecodeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        logger.warning("reference cache entry %s is unusable (%s): computing the reference's part again", path, err)
        _say(cfg, f"eval: reference cache entry {path} is unusable ({err}): computing it again")
        return None
    _say(cfg, f"eval: reference cache hit (key {key}): {path}", info=True)
    return part
