"""Alignment-potential data selection (Huang et al., "Larger or Smaller Reward Margins to Select Preferences for
Alignment?", ICML 2025, arXiv 2503.01864; ``../shared/SPEC.md`` §3).

Score each pair before training by how much it can still teach the model:

- explicit margin  m_ex = score(y_w) − score(y_l)   (from the data's score columns, or computed with a reward;
  max − min over all responses' scores where the data scored several: a k-score ``scores`` column)
- implicit margin  m_im = | mean-token log π₀(y_w|x) − mean-token log π₀(y_l|x) |   under the initial policy π₀
  (the model training starts from; π_ref too unless a separate ``ref_model`` is configured, which is not used here)
- alignment potential  a = z(m_ex) − w · z(m_im),   z the standardisation over the dataset (population std)

and keep the top ``select_ratio`` (0.4 in the paper). A large explicit margin with a small current implicit margin
wins: the annotator is sure, the model is not yet. The baselines isolate each term:

- ``explicit``: z(m_ex) (largest explicit margins first);
- ``implicit``: −z(m_im) (smallest implicit margins first: the pairs the model separates least);
- ``random``: a seeded random subset of the same size.

Ties are broken by the row index (lower first), so the selection is deterministic.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from epsdpo.data import PreferenceCollator, TokenizedPair, shift_for_logps
from epsdpo.data.config import SelectionMethod
from epsdpo.files import cache_key, write_text_atomically
from epsdpo.logps.heads import completion_logps, fused_head_matches
from epsdpo.models import cache_dir as default_cache_dir
from epsdpo.rewards import load_reward

Method = SelectionMethod
METHODS: tuple[str, ...] = get_args(Method)


def zscore(values: Sequence[float]) -> list[float]:
    """(x − mean) / std over the list (population std); all zeros when every value is the same."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [0.0 if std == 0 else (v - mean) / std for v in values]


def selection_scores(
    method: Method, explicit: Sequence[float] | None, implicit: Sequence[float] | None, implicit_weight: float = 1.0
) -> list[float] | None:
    """Per-pair scores (higher is selected first) for a method; None for ``random`` (no score)."""
    if method == "random":
        return None
    if method in ("alignment_potential", "explicit") and explicit is None:
        raise ValueError(f"selection {method!r} needs explicit margins: score columns in the data or a reward")
    if method in ("alignment_potential", "implicit") and implicit is None:
        raise ValueError(f"selection {method!r} needs implicit margins under the initial policy π₀")
    if method == "explicit":
        return zscore(explicit)  # type: ignore[arg-type]
    if method == "implicit":
        return [-z for z in zscore(implicit)]  # type: ignore[arg-type]
    if method == "alignment_potential":
        z_ex, z_im = zscore(explicit), zscore(implicit)  # type: ignore[arg-type]
        return [e - implicit_weight * i for e, i in zip(z_ex, z_im, strict=True)]
    raise ValueError(f"selection method must be one of {METHODS}, got {method!r}")


def top_fraction(scores: Sequence[float] | None, n: int, ratio: float, seed: int = 0) -> list[int]:
    """Positions (0..n−1) of the kept pairs, ascending: the ⌈ratio·n⌉ highest scores (ties: lower position first),
    or a seeded random subset when ``scores`` is None."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"select_ratio must be in (0, 1], got {ratio}")
    k = max(1, math.ceil(ratio * n - 1e-9))
    if scores is None:
        order = list(range(n))
        random.Random(seed).shuffle(order)
    else:
        order = sorted(range(n), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def explicit_margins(pairs: Sequence[TokenizedPair]) -> list[float] | None:
    """The data's explicit margin per pair (:attr:`TokenizedPair.explicit_margin`: score_chosen − score_rejected, or
    max − min of k scores), or None when the data has no scores; an error if only some rows have them."""
    margins = [p.explicit_margin for p in pairs]
    if all(m is None for m in margins):
        return None
    missing = next((p.index for p, m in zip(pairs, margins, strict=True) if m is None), None)
    if missing is not None:
        raise ValueError(f"row {missing} has no scores while others do; explicit margins need scores on every row")
    return margins  # type: ignore[return-value]


@torch.no_grad()
def mean_token_logps(
    model: nn.Module, pairs: Sequence[TokenizedPair], collate: PreferenceCollator, batch_size: int = 8
) -> tuple[list[float], list[float]]:
    """Mean per-token log-probability of chosen and rejected completions under ``model`` (batched, no grad).

    Through the same log-prob path as training (:func:`epsdpo.logps.heads.completion_logps`): the fused head, a chunk
    of completion tokens at a time, so memory stays O(chunk · V) instead of the (2B, T, V) logits.
    """
    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    was_training = model.training
    model.eval()
    fused: bool | None = None
    for start in range(0, len(pairs), batch_size):
        batch = collate(list(pairs[start : start + batch_size]))
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (2B, T)
        labels, mask = shift_for_logps(ids, batch["completion_mask"].to(device))  # (2B, T−1)
        if fused is None:
            fused = fused_head_matches(model, ids, attention)
        total = completion_logps(model, ids, attention, labels, mask, fused=fused)  # (2B,)
        mean = total / mask.sum(-1).clamp(min=1)
        b = ids.shape[0] // 2
        chosen += mean[:b].tolist()
        rejected += mean[b:].tolist()
    model.train(was_training)
    return chosen, rejected


def implicit_margins(
    model: nn.Module,
    model_id: str,
    pairs: Sequence[TokenizedPair],
    collate: PreferenceCollator,
    cache_dir: Path | None,
    batch_size: int = 8,
) -> tuple[list[float], bool]:
    """|mean-token log π₀(y_w) − mean-token log π₀(y_l)| per pair, read from / written to the on-disk cache.

    Returns the margins and whether they came from the cache. ``model_id`` identifies the weights (e.g. the resolved
    path and the weights file's size and mtime; see :func:`model_identity`).
    """
    path = None if cache_dir is None else Path(cache_dir) / f"implicit_margins-{cache_key(model_id, pairs)}.json"
    if path is not None and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["margins"], True
    chosen, rejected = mean_token_logps(model, pairs, collate, batch_size)
    margins = [abs(c - r) for c, r in zip(chosen, rejected, strict=True)]
    if path is not None:
        # each process writes through its own temporary file: concurrent writers of one key never clash
        write_text_atomically(path, json.dumps({"model": model_id, "pairs": len(pairs), "margins": margins}))
    return margins, False


@dataclass
class Selection:
    """The outcome of a selection: kept positions plus every per-pair quantity, in the pairs' order."""

    method: str
    ratio: float
    kept: list[int]
    explicit: list[float] | None
    implicit: list[float] | None
    scores: list[float] | None

    def records(self, pairs: Sequence[TokenizedPair]) -> list[dict[str, Any]]:
        kept = set(self.kept)
        z_ex = zscore(self.explicit) if self.explicit else None
        z_im = zscore(self.implicit) if self.implicit else None
        return [
            {
                "row": p.index,
                "explicit_margin": None if self.explicit is None else self.explicit[i],
                "implicit_margin": None if self.implicit is None else self.implicit[i],
                "z_explicit": None if z_ex is None else z_ex[i],
                "z_implicit": None if z_im is None else z_im[i],
                "score": None if self.scores is None else self.scores[i],
                "selected": i in kept,
            }
            for i, p in enumerate(pairs)
        ]


def select_pairs(
    method: Method,
    pairs: Sequence[TokenizedPair],
    ratio: float,
    *,
    implicit: Sequence[float] | None = None,
    explicit: Sequence[float] | None = None,
    implicit_weight: float = 1.0,
    seed: int = 0,
) -> Selection:
    """Choose the pairs to train on (``explicit`` defaults to the data's score columns)."""
    if explicit is None:
        explicit = explicit_margins(pairs)
    scores = selection_scores(method, explicit, implicit, implicit_weight)
    kept = top_fraction(scores, len(pairs), ratio, seed)
    return Selection(
        method,
        ratio,
        kept,
        None if explicit is None else list(explicit),
        None if implicit is None else list(implicit),
        scores,
    )


def write_selection(
    selection: Selection, pairs: Sequence[TokenizedPair], out_dir: Path, raw_rows: Sequence[Any] | None = None
) -> dict[str, Path]:
    """``selection_scores.jsonl`` and ``selection_histogram.png`` in ``out_dir``; with ``raw_rows`` (the source
    rows) also ``selected.jsonl``, the kept rows as they were, in source order, loadable as a dataset."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if raw_rows is not None:
        written["selected"] = out_dir / "selected.jsonl"
        with open(written["selected"], "w", encoding="utf-8") as fh:
            for i in selection.kept:
                fh.write(json.dumps(raw_rows[pairs[i].index], ensure_ascii=False, default=str) + "\n")
    scores = out_dir / "selection_scores.jsonl"
    with open(scores, "w", encoding="utf-8") as fh:
        for record in selection.records(pairs):
            fh.write(json.dumps(record) + "\n")
    return {**written, "scores": scores, "histogram": plot_selection(selection, out_dir)}


def plot_selection(selection: Selection, out_dir: Path) -> Path:
    """Histogram of the selection scores (or margins), kept pairs highlighted, the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, label = selection.scores, "selection score"
    if values is None:  # random selection: show the explicit or implicit margins instead
        values, label = (
            (selection.explicit, "explicit margin") if selection.explicit else (selection.implicit, "implicit margin")
        )
    path = out_dir / "selection_histogram.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if values:
        kept = set(selection.kept)
        bins = min(40, max(10, len(values) // 5))
        ax.hist(
            [v for i, v in enumerate(values) if i not in kept],
            bins=bins,
            alpha=0.6,
            label="not selected",
            color="#9aa5b1",
        )
        ax.hist([values[i] for i in selection.kept], bins=bins, alpha=0.8, label="selected", color="#2b6cb0")
        if selection.scores is not None:
            ax.axvline(min(values[i] for i in selection.kept), color="#c53030", linestyle="--", label="threshold")
        ax.legend()
    ax.set_xlabel(label)
    ax.set_ylabel("pairs")
    ax.set_title(f"{selection.method}: kept {len(selection.kept)} of {len(values or [])} (ratio {selection.ratio:g})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reward_margins(pairs: Sequence[TokenizedPair], tokenizer: Any, reward_spec: str) -> list[float]:
    """Explicit margins computed by a gold reward (as ``epsdpo generate`` scores): reward(y_w) − reward(y_l)."""
    reward = load_reward(reward_spec)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    prompts = [text(p.prompt_ids) for p in pairs]
    chosen = reward(prompts, [text(p.chosen_ids) for p in pairs])
    rejected = reward(prompts, [text(p.rejected_ids) for p in pairs])
    return [c - r for c, r in zip(chosen, rejected, strict=True)]


def select_for_config(
    config: Any,
    pairs: Sequence[TokenizedPair],
    tokenizer: Any,
    reference: nn.Module | None,
    model_id: str,
    *,
    seed: int = 0,
    out_dir: Path | None = None,
    raw_rows: Sequence[Any] | None = None,
    method: Method | None = None,
    batch_size: int = 8,
) -> Selection:
    """Run the selection a :class:`~epsdpo.data.DataConfig` asks for (``method`` overrides ``config.selection``).

    ``reference`` computes the implicit margins: the initial policy π₀ (SPEC §3), also when training uses a separate
    ``ref_model``; ``model_id`` identifies it (:func:`initial_policy_identity`). It may be None for methods that do
    not need it. Outputs go to ``out_dir`` when given (see :func:`write_selection`).
    """
    method = method or config.selection
    explicit = reward_margins(pairs, tokenizer, config.select_reward) if config.select_reward else None
    implicit = None
    if method in ("alignment_potential", "implicit"):
        if reference is None:
            raise ValueError(f"selection {method!r} needs the initial policy π₀ for implicit margins")
        cache = Path(config.select_cache_dir) if config.select_cache_dir else default_cache_dir() / "margins"
        collate = PreferenceCollator(tokenizer.pad_token_id, config.pad_to_multiple_of)
        implicit, _ = implicit_margins(reference, model_id, pairs, collate, cache, batch_size)
    selection = select_pairs(
        method,
        pairs,
        config.select_ratio,
        implicit=implicit,
        explicit=explicit,
        implicit_weight=config.select_implicit_weight,
        seed=seed,
    )
    if out_dir is not None:
        write_selection(selection, pairs, out_dir, raw_rows)
    return selection
