"""Metrics: summed locally per micro-batch, reduced across processes once per logging step, written as JSON lines."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from epsdpo.distributed import gather_across_processes, sum_across_processes
from epsdpo.errors import disk_full_guard
from epsdpo.files import read_jsonl, read_jsonl_resumable
from epsdpo.stats import estimate_from_sums, last_mean, smoothing_window

logger = logging.getLogger(__name__)

#: sums that are divided by the pair count to give means
PER_PAIR = (
    "loss",
    "loss/preference",
    "loss/nll",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
    "kl/pair_beta",
    "kl/steps_weaker",
    "kl/steps_stronger",
    "kl/steps_kept",
    "kl/pairs_kept",
    "kto/reference_point",
)


def add_sums(total: dict[str, float], part: Mapping[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def reduce_sums(sums: Mapping[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """Sum ``sums`` over processes (every process passes the same ``keys``; missing keys count as 0)."""
    local = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    return dict(zip(keys, sum_across_processes(local).tolist(), strict=True))


def pair_means(sums: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """Per-pair means of the summed metrics (``pairs`` itself is dropped)."""
    pairs = sums.get("pairs", 0.0)
    if pairs <= 0:
        return {}
    return {f"{prefix}{k}": sums[k] / pairs for k in PER_PAIR if k in sums}


#: the held-out figures reported ± a standard error over pairs (``eval/KEY_se``), each with the sum of squares
#: its pass adds (:func:`epsdpo.training.pair_loss.pair_square_sums`); the accuracy's values are 0/1 (Σx² = Σx)
WITH_SE = {"loss": "loss_sq", "rewards/margins": "rewards/margins_sq", "rewards/accuracies": "rewards/accuracies"}

#: the sums of squares a held-out pass reduces besides its sums (the accuracy's is its own sum)
SQUARE_SUMS = tuple(squares for key, squares in WITH_SE.items() if squares != key)


def held_out_figures(sums: Mapping[str, float]) -> dict[str, float]:
    """A held-out pass's record from its reduced sums: the per-pair means (``eval/KEY``), the standard errors over
    pairs of the loss, margin and accuracy (``eval/KEY_se``: the spread of the per-pair values, the accuracy's a
    binomial s.e.; :func:`epsdpo.stats.estimate_from_sums`, the figures ``epsdpo eval`` gives for the same pairs)
    and the pair count (``eval/pairs``). Empty without pairs."""
    means = pair_means(sums, prefix="eval/")
    if not means:
        return {}
    out = dict(means)
    for key, squares in WITH_SE.items():
        if key in sums and squares in sums:
            out[f"eval/{key}_se"] = estimate_from_sums(sums["pairs"], sums[key], sums[squares]).se
    out["eval/pairs"] = sums["pairs"]
    return out


#: keys of a training record that are not per-step figures to average
_NOT_FIGURES = ("step", "epoch")


def last_steps_means(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's training figures at its end: each figure's mean over its last logged steps, the window of the
    plotted curves (:func:`epsdpo.stats.smoothing_window` of the number of logged steps), with the window and the
    steps it spans (``{"window": k, "first_step": a, "last_step": b, "loss": …, …}``); {} without records. One
    step's figures are means over its few pairs, too noisy to stand for the run's end alone."""
    records = [r for r in records if "step" in r and not any(k.startswith("eval/") for k in r)]
    if not records:
        return {}
    window = smoothing_window(len(records))
    tail = records[-window:]
    out: dict[str, Any] = {"window": len(tail), "first_step": tail[0]["step"], "last_step": tail[-1]["step"]}
    for key in tail[-1]:
        values = [r.get(key) for r in tail]
        if key not in _NOT_FIGURES and all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            out[key] = last_mean([float(v) for v in values], len(values))  # type: ignore[arg-type]
    return out


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop the records of a JSONL file logged after ``step`` (on resume; nothing when the file does not exist).

    A last line cut short by a kill in mid-write is dropped with a warning (its step is retrained); a broken line
    before it raises ``ValueError`` naming the file and the line.
    """
    if not path.is_file():
        return
    rows, torn = read_jsonl_resumable(path)  # cuts a torn last line off the file
    if torn:
        logger.warning("%s: its last line was cut short (a kill in mid-write); dropped it", path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line, row in zip(lines, rows, strict=True) if row.get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class DecisionRecords:
    """``decisions.jsonl``: ε-DPO's per-pair decisions of every training step (``decision_records=true``).

    :meth:`add` is a collective (the rows of every process are gathered; training micro-batches have the same
    size on every process); the main process writes a step's rows with :meth:`write`.
    """

    def __init__(self, path: Path, columns: tuple[str, ...], enabled: bool) -> None:
        self.path, self.columns, self.enabled = path, columns, enabled
        self._rows: list[Tensor] = []

    def add(self, rows: Tensor) -> None:
        gathered = gather_across_processes(rows)
        if self.enabled:
            self._rows.append(gathered.cpu())

    def write(self, step: int) -> None:
        if not self.enabled:
            return
        integer = {"pair", "s", "chosen_tokens", "rejected_tokens"}
        with disk_full_guard(self.path.parent, self.path.name), open(self.path, "a", encoding="utf-8") as fh:
            for row in torch.cat(self._rows).tolist() if self._rows else []:
                record = {"step": step}
                record.update({k: int(v) if k in integer else v for k, v in zip(self.columns, row, strict=True)})
                fh.write(json.dumps(record) + "\n")
        self._rows = []

    def truncate_after(self, step: int) -> None:
        """On resume: drop the steps after ``step`` (the resumed run writes them again)."""
        if self.enabled:
            truncate_jsonl_after(self.path, step)


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (main process only), and passes its numbers to
    the run's trackers (:class:`~epsdpo.training.trackers.Trackers`, or None)."""

    def __init__(self, path: Path, enabled: bool, trackers: Any = None) -> None:
        self.path = path
        self.enabled = enabled
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after ``step`` (the resumed run writes them again)."""
        if self.enabled:
            truncate_jsonl_after(self.path, step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with disk_full_guard(self.path.parent, self.path.name), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.trackers is not None:
            self.trackers.log(clean)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return read_jsonl(path)


def load_beta_schedule(source: str | Path) -> list[float]:
    """The per-step global β of an earlier run, for ``beta_schedule``: element k is the β optimizer step k + 1 used.

    ``source`` is a run directory (read from its ``metrics.jsonl``: the ``kl/beta`` of every step, which needs
    ``logging_steps=1`` there) or a JSON file holding a list of numbers or ``{"beta": [...]}``.
    """
    path = Path(source)
    if path.is_dir():
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"beta_schedule={source!r}: {metrics} not found; give a run directory or a file")
        by_step = {int(r["step"]): float(r["kl/beta"]) for r in read_metrics(metrics) if "kl/beta" in r}
        missing = sorted(set(range(1, max(by_step, default=0) + 1)) - set(by_step))
        if not by_step or missing:
            raise ValueError(
                f"beta_schedule={source!r}: {metrics} lacks the β of steps {missing[:8] or 'all'}; the source run "
                "must log every step (logging_steps=1)"
            )
        betas = [by_step[k] for k in sorted(by_step)]
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        betas = data["beta"] if isinstance(data, dict) else data
        if not isinstance(betas, list):
            raise ValueError(f"beta_schedule={source!r}: expected a JSON list of β per step or {{'beta': [...]}}")
        betas = [float(b) for b in betas]
    bad = [(k + 1, b) for k, b in enumerate(betas) if not (math.isfinite(b) and b > 0)]
    if bad:
        raise ValueError(f"beta_schedule={source!r}: step {bad[0][0]} has β = {bad[0][1]}; every β must be positive")
    return betas
