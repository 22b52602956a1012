"""Evaluating an aligned model honestly (``../shared/SPEC.md`` §5): gold reward against KL, win rate, accuracy.

For held-out prompts x (the bundled test split by default) the policy π and the reference π_ref each sample
``samples_per_prompt`` responses, sample j of prompt x drawn by both from the same random stream (see
:mod:`epsdpo.generate`), and the gold reward scores every response. Then, over the n sampled pairs:

- ``policy/gold_reward``, ``reference/gold_reward``: mean gold reward r(x, y) of each model's samples (and ``_std``);
- ``kl`` = mean over y ~ π of log π(y|x) − log π_ref(y|x), the Monte-Carlo estimate of KL(π‖π_ref) from the
  policy's own samples (``kl/std``: the spread of the per-sample values; its standard error is std/√n);
- ``kl/forward`` = mean over y ~ π_ref of log π_ref(y|x) − log π(y|x), KL(π_ref‖π) from the reference's samples
  (unless ``forward_kl=false``);
- ``win_rate``: the share of (prompt, sample index) pairs where the policy's response gets the higher gold reward,
  ties counting ½, as in the DPO paper's win rates (Rafailov et al. 2023, §6);
- on held-out preference pairs (``eval_dataset``), with implicit reward r̂(x, y) = β (log π(y|x) − log π_ref(y|x)):
  ``reward_margin`` = mean r̂(x, y_w) − r̂(x, y_l), and ``preference_accuracy`` = the share of pairs where it is > 0.

Log-probabilities are sums over the sampled completion tokens (the end token included when it was sampled) of the
model's raw log-softmax, i.e. at temperature 1 without top-p. With the defaults ``temperature=1`` and ``top_p=1`` the
responses are samples of π itself and ``kl`` estimates the model's own KL(π‖π_ref) without bias. With other settings
the responses come from the tempered/truncated sampling policy, and ``kl`` is E_{y ~ sampler}[log π − log π_ref]: a
number to compare between runs evaluated with the same settings, not a KL of the models (the table says so).

The reward-vs-KL pair (``kl``, ``policy/gold_reward``) is one point of the frontier of the DPO paper's Figure 2 and
ε-DPO's Pareto plot; ``epsdpo plot`` draws it for several runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epsdpo.config import ConfigError, load_config
from epsdpo.files import write_text_atomically
from epsdpo.generate import (
    Completion,
    SamplingConfig,
    decode_completion,
    encode_prompt,
    end_token_ids,
    load_prompts,
    sample_completions,
    sample_seed,
    wants_chat_template,
)
from epsdpo.logps.heads import completion_logps, fused_head_matches
from epsdpo.machine import machine_label
from epsdpo.stats import Estimate, distinct_n, estimate, grouped, one_token_repeated, paired_gain, win_rate

__all__ = [
    "EvalConfig",
    "ReferencePart",
    "compute_reference_part",
    "evaluate",
    "evaluate_models",
    "format_table",
    "load_eval_config",
    "row_logps",
    "sequence_logps",
]

#: ``eval_dataset=bundled``: the held-out pairs shipped with the package (from the test prompts)
BUNDLED_TEST_PAIRS = "data/sentiment_pairs_test.jsonl"


@dataclass
class EvalConfig(SamplingConfig):
    """Settings of ``epsdpo eval`` (section ``eval``; every key also works flat and as ``key=value``).

    The prompt and sampling keys are :class:`~epsdpo.generate.SamplingConfig`'s (``prompt_split`` defaults to
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
        reference_cache_dir: keep the reference's part of the evaluation (its samples, their rewards and log-probs,
            its log-probs of the held-out pairs) in this directory, under a key over the reference's identity, the
            prompts, every sampling and scoring setting, the reward and the pairs' token ids; evaluations of other
            policies against the same reference with the same settings (a sweep, ``experiments/kl_frontier.py``)
            read it instead of sampling and scoring the reference again. None: always computed.
        name: the evaluation's name. With a run directory every evaluation is kept in ``RUN_DIR/evals/NAME/``
            (``eval.json``, ``samples.jsonl``); ``RUN_DIR/eval.json`` is a copy of the latest one, naming it, and
            ``RUN_DIR/plots/reward_vs_kl.png`` is redrawn from it. ``None``: ``after-training`` for the settings of
            the run's own evaluation (``eval_options``), else the settings that differ from those, e.g.
            ``num_prompts=64,seed=2``.
        output: write to this JSON file instead (``…_samples.jsonl`` beside it); ``RUN_DIR/eval.json`` and the plot
            are left alone. Without a run directory the default is ``eval.json``.
        overwrite: replace an earlier evaluation of the same name (or ``output``) that was made with other settings;
            without it that is refused. One with the same settings is replaced (a rerun), and said so.
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
    samples_per_prompt: int = 1
    beta: float | None = None
    reference_cache_dir: str | None = None
    name: str | None = None
    output: str | None = None
    overwrite: bool = False
    bf16: bool = False
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


# ---- log-probs ----------------------------------------------------------------------------------------------------
def _autocast(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def row_logps(
    model: nn.Module,
    rows: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str | None = None,
    disable_tqdm: bool = True,
) -> torch.Tensor:
    """Summed log π(completion | prompt) under ``model`` of each ``(prompt_ids, completion_ids)`` row, (N,) float32.

    ``desc``: a progress bar with this label (unless ``disable_tqdm``).

    Rows are right-padded in batches of ``batch_size``; the log-probs come from the final hidden states and the
    linear head, a chunk of completion positions at a time (the model's full logits only where its logits are not its
    linear head's output), as in training.
    """
    from tqdm.auto import tqdm

    from epsdpo.data import shift_for_logps

    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    fused: bool | None = None
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, disable=disable_tqdm or desc is None, dynamic_ncols=True):
        chunk = rows[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (N, T), right-padded
        completion = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (prompt, comp) in enumerate(chunk):
            ids[r, : len(prompt) + len(comp)] = torch.tensor([*prompt, *comp], dtype=torch.long)
            completion[r, len(prompt) : len(prompt) + len(comp)] = 1
            attention[r, : len(prompt) + len(comp)] = 1
        ids, completion, attention = ids.to(device), completion.to(device), attention.to(device)
        if fused is None:  # once: is head(final hidden state) exactly what the model returns as logits?
            fused = fused_head_matches(model, ids, attention)
        labels, mask = shift_for_logps(ids, completion)
        with _autocast(model, bf16):
            out.append(completion_logps(model, ids, attention, labels, mask, fused=fused).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def sequence_logps(
    policy: nn.Module,
    reference: nn.Module,
    pairs: Sequence[Any],
    pad_id: int,
    *,
    batch_size: int = 8,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs under both models of every row of ``pairs`` (:class:`TokenizedPair`).

    Returns ``(policy, reference)``, each (2P,) float32: rows 0..P−1 for the ``chosen_ids``, P..2P−1 for the
    ``rejected_ids`` (see :func:`row_logps`).
    """
    rows = _pair_rows(pairs)
    return (
        row_logps(policy, rows, pad_id, batch_size=batch_size, bf16=bf16),
        row_logps(reference, rows, pad_id, batch_size=batch_size, bf16=bf16),
    )


def _pair_rows(pairs: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]


# ---- sampling -----------------------------------------------------------------------------------------------------
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
    from tqdm.auto import tqdm

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
        with _autocast(model, cfg.bf16):
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
                )
            )
    return out


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
        return cls(
            [Completion(list(ids), bool(done)) for ids, done in d["samples"]],
            list(d["rewards"]),
            list(d["self_logps"]),
            None if d["pair_logps"] is None else list(d["pair_logps"]),
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
) -> ReferencePart:
    """Sample, score and take the log-probs the evaluation needs from the reference alone."""
    encoded = _encoded_prompts(tokenizer, prompts, cfg)
    samples = _sample_all(
        reference, tokenizer, encoded, [pid for pid, _ in prompts], cfg, end_token_ids(tokenizer), "reference"
    )
    k = cfg.samples_per_prompt
    texts = [decode_completion(tokenizer, c) for c in samples]
    rows = [(encoded[i // k], c.ids) for i, c in enumerate(samples)]
    pad, opts = tokenizer.pad_token_id, _logp_options(cfg)
    pair_logps = (
        row_logps(reference, _pair_rows(pairs), pad, **opts, desc="eval: held-out pairs (reference)").tolist()
        if pairs
        else None
    )
    self_logps = row_logps(reference, rows, pad, **opts, desc="eval: log-probs (reference)").tolist()
    return ReferencePart(samples, list(reward(_prompt_texts(prompts, k), texts)), self_logps, pair_logps)


def evaluate_models(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[tuple[str, str]],
    reward: Any,
    cfg: EvalConfig,
    *,
    pairs: Sequence[Any] | None = None,
    beta: float = 0.1,
    reference_part: ReferencePart | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The metrics of the module docstring for loaded models; also one record per sampled (prompt, j).

    ``prompts``: ``(prompt_id, text)``; ``reward``: a :class:`epsdpo.rewards.Reward`; ``pairs``: held-out
    :class:`TokenizedPair` s (or None); ``beta``: β of the implicit reward; ``reference_part``: the reference's part,
    computed earlier with the same settings (:func:`compute_reference_part`), or None to compute it here.
    """
    ref_side = reference_part or compute_reference_part(reference, tokenizer, prompts, reward, cfg, pairs)
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
    # the policy on its samples (and on the reference's, for kl/forward); the reference on the policy's samples
    lp_pol = row_logps(policy, own + (theirs if cfg.forward_kl else []), pad, **opts, desc="eval: log-probs (policy)")
    lp_ref_own = row_logps(reference, own, pad, **opts, desc="eval: log-probs (reference on the policy's samples)")
    lp_ref_theirs = torch.tensor(ref_side.self_logps)
    kl_values = (lp_pol[:n] - lp_ref_own).tolist()  # y ~ π: log π − log π_ref
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
    if cfg.forward_kl:
        forward_values = (lp_ref_theirs - lp_pol[n:]).tolist()  # y ~ π_ref: log π_ref − log π
        _with_se(metrics, "kl/forward", estimate(grouped(forward_values, k)))
        metrics["kl/forward_std"] = _mean_std(forward_values)[1]
    _with_se(metrics, "win_rate", win_rate(rewards["policy"], rewards["reference"], k), interval=True)
    metrics.update(_pair_metrics(policy, pairs, ref_side.pair_logps, pad, beta, cfg))
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
            "policy_logp": float(lp_pol[i]),
            "policy_ref_logp": float(lp_ref_own[i]),
            "reference_logp": float(lp_ref_theirs[i]),
            "reference_policy_logp": float(lp_pol[n + i]) if cfg.forward_kl else None,
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
) -> dict[str, Any]:
    """Preference accuracy and mean implicit reward margin on held-out pairs (None without pairs)."""
    if not pairs or ref_logps is None:
        return {
            "preference_accuracy": None,
            "preference_accuracy_se": None,
            "reward_margin": None,
            "reward_margin_se": None,
            "num_pairs": 0,
            "beta": beta,
        }
    lp_pol = row_logps(policy, _pair_rows(pairs), pad_id, **_logp_options(cfg), desc="eval: held-out pairs (policy)")
    lp_ref = torch.tensor(ref_logps)
    p = len(pairs)
    margins = beta * ((lp_pol[:p] - lp_ref[:p]) - (lp_pol[p:] - lp_ref[p:]))  # r̂(y_w) − r̂(y_l)
    metrics: dict[str, Any] = {"num_pairs": p, "beta": beta}
    _with_se(metrics, "preference_accuracy", estimate((margins > 0).float().tolist()))
    _with_se(metrics, "reward_margin", estimate(margins.tolist()))
    return metrics


# ---- loading ------------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    policy: nn.Module
    reference: nn.Module
    tokenizer: Any
    beta: float
    data: Any  # the run's DataConfig, or None
    names: dict[str, str]
    reference_id: str  # what determines the reference's weights (epsdpo.select.model_identity)


def _load_from_run(cfg: EvalConfig) -> _Loaded:
    from epsdpo.models import build_from_config, load_causal_lm, load_tokenizer
    from epsdpo.select import model_identity, reference_identity
    from epsdpo.training.config import load_run_config, tokenizer_name

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

    def initial_model() -> nn.Module:  # the run's starting point, rebuilt exactly as the trainer built it
        if m.model_config is not None:
            return build_from_config(m.model_config, len(tokenizer), run_cfg.train.seed)
        return load_causal_lm(m.model, cfg.trust_remote_code or m.trust_remote_code)

    if cfg.checkpoint is not None:
        policy = _checkpoint_policy(run, cfg.checkpoint, m, initial_model)
        policy_name = f"{run} after {cfg.checkpoint} steps" + ("" if cfg.checkpoint else " (the initial model)")
    elif cfg.model is not None:
        policy, policy_name = load_causal_lm(cfg.model, cfg.trust_remote_code), cfg.model
    elif (final / "adapter_config.json").is_file():  # LoRA: the base with the adapter merged in
        from peft import PeftModel

        from epsdpo.models import quiet_peft_wrapping

        with quiet_peft_wrapping():
            policy = PeftModel.from_pretrained(initial_model(), str(final)).merge_and_unload()
        policy_name = f"{m.model} + LoRA adapter {final}"
    else:
        policy, policy_name = load_causal_lm(str(final), cfg.trust_remote_code), str(final)
    ref_name = cfg.ref_model or m.ref_model
    reference = load_causal_lm(ref_name, cfg.trust_remote_code) if ref_name else initial_model()
    ref_label = ref_name or (
        m.model if m.model_config is None else f"{m.model} (random init, seed {run_cfg.train.seed})"
    )
    ref_id = model_identity(ref_name) if cfg.ref_model else reference_identity(m, run_cfg.train.seed)
    if cfg.beta is not None:
        beta = cfg.beta
    else:
        beta = _run_beta(run, run_cfg) if cfg.checkpoint is None else _beta_at_step(run, cfg.checkpoint, run_cfg)
    return _Loaded(
        policy,
        reference,
        tokenizer,
        beta,
        run_cfg.data,
        {"policy": policy_name, "reference": ref_label},
        ref_id,
    )


def _checkpoint_policy(run: Path, step: int, m: Any, initial_model: Callable[[], nn.Module]) -> nn.Module:
    """The policy after ``step`` optimizer steps: the initial policy (LoRA-wrapped as the trainer wrapped it) with
    ``checkpoint-{step}``'s trainable weights, adapters merged. Step 0: the initial model."""
    from epsdpo.training.checkpoint import MODEL_FILE, load_trainable_state
    from epsdpo.training.policy import apply_lora

    directory = run / f"checkpoint-{step}"
    if step > 0 and not (directory / MODEL_FILE).is_file():
        found = sorted(p.name for p in run.glob("checkpoint-*"))
        sharded = (
            " (a sharded FSDP/DeepSpeed checkpoint: not supported here)" if (directory / "sharded").is_dir() else ""
        )
        raise FileNotFoundError(f"{directory / MODEL_FILE} not found{sharded}; checkpoints in {run}: {found or 'none'}")
    policy = initial_model()
    if m.use_lora:
        policy = apply_lora(policy, m)
    if step > 0:
        load_trainable_state(policy, directory / MODEL_FILE)
    return policy.merge_and_unload() if m.use_lora else policy


def _beta_at_step(run: Path, step: int, run_cfg: Any) -> float:
    """The run's β after ``step`` optimizer steps (``kl/beta_next`` of that step, else the β it used)."""
    from epsdpo.training.metrics import read_metrics

    beta = float(run_cfg.loss.beta)
    if step == 0 or not (run / "metrics.jsonl").is_file():
        return beta
    for record in read_metrics(run / "metrics.jsonl"):
        if record.get("step") == step and "kl/beta" in record:
            beta = float(record.get("kl/beta_next", record["kl/beta"]))
    return beta


def _run_beta(run: Path, run_cfg: Any) -> float:
    """The β that the run's implicit reward uses at the end: the final β of an ε-DPO run, else its ``beta``."""
    metrics = run / "final" / "final_metrics.json"
    if run_cfg.loss.kind.needs_perturbation and metrics.is_file():
        recorded = json.loads(metrics.read_text(encoding="utf-8")).get("beta")
        if isinstance(recorded, int | float) and recorded > 0:
            return float(recorded)
    return float(run_cfg.loss.beta)


def _load_models(cfg: EvalConfig) -> _Loaded:
    from epsdpo.models import load_causal_lm, load_tokenizer
    from epsdpo.select import model_identity

    if cfg.run_dir is not None:
        loaded = _load_from_run(cfg)
    else:
        if cfg.model is None or cfg.ref_model is None:
            raise ConfigError("give a run directory (epsdpo eval RUN_DIR), or both model=… and ref_model=…")
        loaded = _Loaded(
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
    from importlib.resources import files

    from epsdpo.data import DataConfig, load_eval_dataset, load_preference_dataset

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
    config: EvalConfig | str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Load the models, sample, score and write ``eval.json`` (and ``…_samples.jsonl``); returns the metrics.

    ``config``: an :class:`EvalConfig`, a run directory, a YAML file, a mapping or ``None``, plus overrides.
    """
    from epsdpo.rewards import load_reward

    cfg = load_eval_config(config, overrides)
    started = time.perf_counter()
    # where it goes, and whether that is allowed, before the minutes of sampling (a refusal costs nothing)
    name, output, samples_path = _destination(cfg)
    settings = _settings(cfg)
    _check_overwrite(output, settings, cfg.overwrite)
    _say(cfg, "eval: loading the policy and the reference")
    loaded = _load_models(cfg)
    prompts = load_prompts(cfg.prompts, cfg.prompt_split, cfg.prompt_column, cfg.num_prompts)
    pairs, pairs_source = _held_out_pairs(cfg, loaded.data, loaded.tokenizer)
    reward = load_reward(cfg.reward)
    part, cache_file = None, None
    if cfg.reference_cache_dir:
        cache_file = _reference_cache_file(cfg, loaded, prompts, pairs)
        if cache_file.is_file():
            part = ReferencePart.from_dict(json.loads(cache_file.read_text(encoding="utf-8")))
    if part is None:
        part = compute_reference_part(loaded.reference, loaded.tokenizer, prompts, reward, cfg, pairs)
        if cache_file is not None:
            write_text_atomically(cache_file, json.dumps(part.to_dict()))  # concurrent writers: their own files
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
    if cfg.run_dir is not None and cfg.output is None:  # the run's latest evaluation, and its plot, follow
        from epsdpo.plots import PLOTS_DIR, plot_reward_vs_kl

        run = Path(cfg.run_dir)
        latest = {**result, "samples_file": str(samples_path.relative_to(run))}
        latest["output"] = str(output.relative_to(run))
        (run / "eval.json").write_text(json.dumps(latest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result["plot"] = str(plot_reward_vs_kl([run], run / PLOTS_DIR))
    return result


#: the figures a summary of an evaluation keeps (iterate's per-round summary, the experiments' run summaries)
SUMMARY_KEYS = (
    "gold_reward_gain",
    "gold_reward_gain_se",
    "policy/gold_reward",
    "reference/gold_reward",
    "kl",
    "kl_se",
    "kl/forward",
    "win_rate",
    "win_rate_se",
    "preference_accuracy",
    "preference_accuracy_se",
    "reward_margin",
    "beta",
    "num_prompts",
    "num_samples",
    "num_pairs",
    "policy/distinct_2",
    "reference/distinct_2",
)


def _say(cfg: EvalConfig, message: str) -> None:
    if not cfg.disable_tqdm:
        print(message, file=sys.stderr, flush=True)


#: settings that do not change what an evaluation measures
_NOT_SETTINGS = ("disable_tqdm", "output", "name", "overwrite", "device")


def _settings(cfg: EvalConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_SETTINGS}


def _run_eval_settings(run_dir: str) -> dict[str, Any] | None:
    """The settings of the run's own evaluation (its ``eval_options``), or None if they cannot be read."""
    from epsdpo.training.config import load_run_config

    try:
        run_cfg = load_run_config(Path(run_dir) / "config.yaml")
        return _settings(load_eval_config({**run_cfg.train.eval_options, "run_dir": run_dir}))
    except (ConfigError, OSError, ValueError):
        return None


def _destination(cfg: EvalConfig) -> tuple[str, Path, Path]:
    """The evaluation's name, its JSON file and its samples file (see ``name`` and ``output``)."""
    if cfg.output is not None:
        output = Path(cfg.output)
        return cfg.name or output.stem, output, output.with_name(output.stem + "_samples.jsonl")
    if cfg.run_dir is None:
        return cfg.name or "eval", Path("eval.json"), Path("eval_samples.jsonl")
    name = cfg.name or _auto_name(_settings(cfg), _run_eval_settings(cfg.run_dir))
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ConfigError(f"name={name!r} cannot name a directory; use letters, digits, '=', ',', '-' or '.'")
    directory = Path(cfg.run_dir) / "evals" / name
    return name, directory / "eval.json", directory / "samples.jsonl"


#: the order of the keys in an automatic evaluation name (fixed, so that names stay those of earlier versions)
_NAME_ORDER = (
    "run_dir",
    "model",
    "checkpoint",
    "ref_model",
    "tokenizer",
    "trust_remote_code",
    "eval_dataset",
    "prompts",
    "prompt_split",
    "prompt_column",
    "num_prompts",
    "max_pairs",
    "samples_per_prompt",
    "max_new_tokens",
    "temperature",
    "top_p",
    "reward",
    "beta",
    "batch_size",
    "seed",
    "forward_kl",
)


def _auto_name(settings: Mapping[str, Any], run_settings: Mapping[str, Any] | None) -> str:
    """``after-training`` for the run's own settings, else ``key=value,…`` of what differs (a hash when long)."""
    import hashlib
    import re

    def shown(value: Any) -> str:  # a path by its file name (a clash is caught by the settings check)
        return Path(value).name if isinstance(value, str) and "/" in value else str(value)

    base = run_settings if run_settings is not None else _settings(EvalConfig())
    keys = sorted(settings, key=lambda k: _NAME_ORDER.index(k) if k in _NAME_ORDER else len(_NAME_ORDER))
    differ = [f"{k}={shown(settings[k])}" for k in keys if k != "run_dir" and settings[k] != base.get(k)]
    if not differ:
        return "after-training"
    name = re.sub(r"[^A-Za-z0-9=,._-]", "_", ",".join(differ))
    if len(name) > 120:
        name = "settings-" + hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:10]
    return name


def _check_overwrite(output: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
    if not output.is_file():
        return
    try:
        earlier = json.loads(output.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):  # unreadable: treated as made with other settings
        earlier = {}
    if earlier == dict(settings):
        print(f"note: replacing {output}, an earlier evaluation with the same settings")
        return
    if not overwrite:
        differ = sorted(k for k in set(settings) | set(earlier) if earlier.get(k) != settings.get(k))
        raise ConfigError(
            f"{output} holds an evaluation with other settings (differing: {', '.join(differ)}); "
            "give name=… (or output=…) to keep both, or overwrite=true to replace it"
        )
    print(f"note: overwrite=true: replacing {output} (made with other settings)")


def _reference_cache_file(
    cfg: EvalConfig, loaded: _Loaded, prompts: Sequence[tuple[str, str]], pairs: Sequence[Any] | None
) -> Path:
    """The cache file of the reference's part: a key over everything that determines it."""
    import hashlib

    determines = {
        "format": 2,
        "reference": loaded.reference_id,
        "prompts": list(prompts),
        "reward": cfg.reward,
        "prompt_ids": _encoded_prompts(loaded.tokenizer, prompts, cfg),
        "pad": loaded.tokenizer.pad_token_id,
        "end_ids": list(end_token_ids(loaded.tokenizer)),
        "device": str(next(loaded.reference.parameters()).device),
        "settings": {
            k: getattr(cfg, k)
            for k in (
                "samples_per_prompt",
                "max_new_tokens",
                "temperature",
                "top_p",
                "batch_size",
                "seed",
                "bf16",
                "use_chat_template",
            )
        },
        "pairs": None if not pairs else [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs],
    }
    key = hashlib.sha256(json.dumps(determines, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cfg.reference_cache_dir or ".") / f"eval_reference-{key}.json"


def format_table(result: Mapping[str, Any]) -> str:
    """A small text table of an eval result (the dict :func:`evaluate` returns or ``eval.json`` holds).

    Every mean is shown ± its standard error over prompts (:mod:`epsdpo.stats`); n is on each line.
    """

    def num(key: str, digits: int = 3) -> str:
        value = result.get(key)
        return "—" if value is None else f"{value:.{digits}f}"

    def pm(key: str, digits: int = 3) -> str:
        se = result.get(f"{key}_se")
        return num(key, digits) + ("" if se is None else f" ± {se:.{digits}f}")

    def ci(key: str) -> str:
        lo_hi = result.get(f"{key}_ci95")
        return "" if not lo_hi else f"   95% CI [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"

    settings = result.get("settings", {})
    prompts, k = result.get("num_prompts"), result.get("samples_per_prompt", 1)
    pairs = result.get("num_pairs", 0)
    name = f" — evaluation '{result['name']}'" if result.get("name") else ""
    gain, gain_se = result.get("gold_reward_gain"), result.get("gold_reward_gain_se")
    in_se = f" = {gain / gain_se:.1f} s.e." if gain is not None and gain_se else ""
    lines = [
        f"held-out prompts: {prompts}, {k} independent sample(s) per prompt and model; mean ± standard error over "
        f"prompts{name}",
        f"{'':<26}{'policy':>16}{'reference':>18}",
        f"{'gold reward':<26}{pm('policy/gold_reward'):>16}{pm('reference/gold_reward'):>18}",
        f"{'response tokens':<26}{num('policy/response_tokens', 1):>16}{num('reference/response_tokens', 1):>18}",
        f"{'finished (share)':<26}{num('policy/finished', 2):>16}{num('reference/finished', 2):>18}",
        f"{'distinct-2':<26}{num('policy/distinct_2'):>16}{num('reference/distinct_2'):>18}",
        f"{'one token repeated':<26}{result.get('policy/one_token_repeated', '—')!s:>16}"
        f"{result.get('reference/one_token_repeated', '—')!s:>18}",
        f"gold reward gain (paired by prompt) = {pm('gold_reward_gain')}{in_se}{ci('gold_reward_gain')}",
        f"KL(π‖π_ref) = {pm('kl')}   KL(π_ref‖π) = {pm('kl/forward')}  (nats, from the samples)",
        f"win rate vs reference (independent draws, ties ½) = {pm('win_rate')}{ci('win_rate')}",
        f"held-out pairs: {pairs}   preference accuracy = {pm('preference_accuracy')}   "
        f"reward margin = {pm('reward_margin')} (β = {result.get('beta', float('nan')):.4g})",
    ]
    if settings.get("temperature", 1.0) != 1.0 or settings.get("top_p", 1.0) != 1.0:
        lines.append("note: temperature/top_p ≠ 1, so `kl` is measured on the sampler's responses, not KL(π‖π_ref)")
    return "\n".join(lines)
