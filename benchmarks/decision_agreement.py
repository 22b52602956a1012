"""Do two ε-DPO runs make the same per-pair decisions? A reference run A (e.g. float32 on the CPU) against a candidate
B (e.g. bf16 autocast on a GPU), from the ``decisions.jsonl`` each wrote with ``decision_records=true``.

    python benchmarks/decision_agreement.py benchmarks/reference_runs/default-8steps-fp32-cpu RUN_DIR
    python benchmarks/decision_agreement.py benchmarks/reference_runs/default-8steps-published-bf16-cpu RUN_DIR \
        --shares-only                                  # the published regime: its shares of s, not pair by pair
    python benchmarks/decision_agreement.py --record RUN_DIR --command "epsdpo train ..."   # RUN_DIR/provenance.json

A and B are run directories (``decisions.jsonl``, ``metrics.jsonl``, ``config.yaml``, ``provenance.json`` if any) or
``decisions.jsonl`` files with those files beside them. It prints what it can read of each run's machine and regime,
the config keys that differ, then per step: the pairs, how many decisions s agree, both runs' global β (``kl/beta``
of ``metrics.jsonl``, the β the step's loss used) and their relative difference, and the largest gap difference as a
fraction of its tolerance; every pair whose s differs, with both runs' gaps and whether rounding explains it; the
first step at which β differs; and the shares of s = +1 / 0 / −1 over all records of each run, with standard errors.

**When is a disagreement explained by rounding?** A pair's s compares two gaps with the dead band ±τ
(``decision_tolerance``, 0 by default): the weaker gap z⁻ − z and the stronger gap z − z⁺ (+1 when both exceed τ,
−1 when both are below −τ, else 0; :func:`epsdpo.perturbation_steps`). If both runs computed the same true gap g with
rounding errors e_A and e_B, a gap that lies on different sides of a boundary in the two runs has
|g_A − g_B| = |e_A − e_B| ≤ δ_A + δ_B, each run's allowance δ bounding its error. So a disagreement is *explained*
when every gap that changed side differs between the runs by at most ``scale`` · (δ_A + δ_B) + ``abs_tolerance``.
Asking only that one run's gap be small would accept a gap of +5 nats in A against −0.01 in B, which no rounding
makes. A run's allowance for a pair is

    δ = S · (u_decision + ε · u_forward)

- S, in nats: the magnitudes of the four sequence log-probs a gap is built from, the chosen and rejected responses'
  under the policy and under the reference. The records give each pair's token counts; ``metrics.jsonl`` gives the
  step's means of the four sums (``logps/chosen``, ``logps/rejected``, ``logps/ref_chosen``, ``logps/ref_rejected``),
  hence the step's nats per token ν, and S = ν · (chosen_tokens + rejected_tokens). (About 600 nats for the default
  SmolLM2 pairs of 48 + 48 tokens at ~3 nats a token.)
- u_decision, the unit roundoff of the decision arithmetic: 2⁻⁸ (bf16) for ``decision_precision`` ``published`` or
  ``bfloat16``, 2⁻²⁴ for ``float32``. In the published order z and z⁻ are differences of bf16 sums of magnitude
  |log π(y_w)|, |log π(y_l)| (and the per-token log-probs are bf16 too); one rounding of a number x errs by at most
  u·|x|, so the four sums a gap subtracts err by about u·S in all.
- u_forward, the unit roundoff of the forward pass that produced the logits: 2⁻⁸ under bf16 autocast
  (``bf16=true``), 2⁻²⁴ in float32. It counts ε times because with float32 decisions a logit's rounding reaches z
  and z⁻ alike and cancels but for its ε-weighted part: to first order z⁻ − z = ε·a, with a = Σ_t [log p − log q −
  KL(p_t‖q_t)] chosen minus rejected (docs/epsilon_dpo.md), made of the same four sums; a relative error u in them
  moves the gap by ε·u·S.

So float32 decisions from a float32 forward get δ ≈ 2⁻²⁴·S (≈ 4e-5 nats), from a bf16 forward ε·2⁻⁸·S (≈ 0.02
nats at ε = 0.01), and bf16 decisions u·S (≈ 2 nats, the published regime's resolution). δ is a scale with one
rounding per quantity and every token's error of one sign, not a proven bound: errors of random sign are smaller
(÷ √tokens), while a logit error larger than u·|log p| (logits are larger than log-probs) or one compounded through
the layers can be larger; the report's "largest |Δgap| / tol" over all matched gaps shows where the runs actually sit
inside it (benchmarks/reference_runs/README.md has it for a CPU bf16-autocast run). Weights that differ by the
rounding of earlier updates are not in δ: at the default learning rate they move the gaps by far less over a few
steps (Adam's first update is sign-like, so rounding changes it only where a gradient is near 0).

**β and when to stop comparing pair by pair.** The global β is a Python float updated from the counts of s (β ←
β / (1 + ε·mean s)), so equal decisions give equal β to the last bit, and one flip among 8 pairs moves it by ε/8
relative. The decisions of a step are compared pair by pair ("judged") up to and including the first step whose β
differs beyond ``beta_rtol``: those were made by weights trained with the same β (a flipped pair's own β̃ differs by
ε, a change to the update of the order of bf16 rounding). After it the runs train with different β and their
decisions legitimately diverge; later steps are still listed (their flips marked "not judged") and the shares cover
every step. Where ``metrics.jsonl`` is missing, β is taken to differ from the step after the first flip.

**Shares** (for a regime whose decisions are rounding noise, ``published``, where pair-by-pair agreement is not the
claim): p̂ = count / N over all records of a run, standard error √(p̂(1 − p̂)/N), the difference p̂_B − p̂_A with
s.e. √(se_A² + se_B²) (the two runs treated as independent samples: conservative, since they decide the same pairs
on nearly the same weights; records of one run are also treated as independent, which over few steps they roughly
are), agreeing when within 2 s.e. (with three shares, a true match fails one test at 2 s.e. now and then).

Exit status: 0 when every judged disagreement is explained and the judged steps hold the same pairs in both runs
(``--shares``: and every share agrees within 2 s.e.; ``--shares-only``: the shares alone), 1 otherwise, 2 for a
usage error. ``--json OUT`` writes the summary. The comparison is pure functions of the records (:func:`compare`);
``main`` reads the files and prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epsdpo.files import read_jsonl

#: unit roundoff (half a unit in the last place, relative) of each arithmetic
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8}
GAPS = ("weaker_gap", "stronger_gap")
NEEDED_COLUMNS = ("step", "pair", "s", *GAPS, "chosen_tokens", "rejected_tokens")
LOGP_KEYS = ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")
#: config keys that say where a run wrote or how it showed progress, not what it computed
IGNORED_CONFIG_KEYS = ("train.output_dir", "train.run_name", "train.disable_tqdm", "train.overwrite_output_dir")


@dataclass(frozen=True)
class Regime:
    """What sets a run's rounding of its gaps: ε, the decision arithmetic, the forward's dtype and the dead band τ."""

    epsilon: float
    precision: str = "float32"  # decision_precision: float32, bfloat16 or published
    bf16: bool = False  # bf16 autocast forward
    dead_band: float = 0.0  # decision_tolerance τ

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "bfloat16", "published"):
            raise ValueError(f"decision_precision must be float32, bfloat16 or published, got {self.precision!r}")
        if not (0 <= self.epsilon < 1 and self.dead_band >= 0):
            raise ValueError(f"need 0 <= epsilon < 1 and decision_tolerance >= 0, got {self.epsilon}, {self.dead_band}")

    @property
    def allowance_per_nat(self) -> float:
        """δ / S = u_decision + ε · u_forward (see the module's docstring)."""
        u_decision = UNIT_ROUNDOFF["float32" if self.precision == "float32" else "bfloat16"]
        u_forward = UNIT_ROUNDOFF["bfloat16" if self.bf16 else "float32"]
        return u_decision + self.epsilon * u_forward

    def describe(self) -> str:
        return (
            f"decision_precision={self.precision}, bf16={str(self.bf16).lower()}, ε={self.epsilon:g}, "
            f"τ={self.dead_band:g}: allowance {self.allowance_per_nat:.3g} per nat of log-prob"
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Regime:
        """From a run's ``config.yaml`` (its nested sections, or flat keys)."""
        flat = flatten(config)

        def get(section: str, key: str, default: Any) -> Any:
            return flat.get(f"{section}.{key}", flat.get(key, default))

        if get("loss", "loss_type", "epsilon_dpo") != "epsilon_dpo":
            raise ValueError(f"not an ε-DPO run (loss_type={get('loss', 'loss_type', None)}): it makes no decisions")
        return cls(
            epsilon=float(get("loss", "epsilon", 0.01)),
            precision=str(get("loss", "decision_precision", "float32")),
            bf16=bool(get("models", "bf16", False)),
            dead_band=float(get("loss", "decision_tolerance", 0.0)),
        )


@dataclass(frozen=True)
class RunRecords:
    """One run's decision records (``decisions.jsonl`` rows), metrics records and regime: all :func:`compare`
    needs."""

    decisions: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    regime: Regime


@dataclass(frozen=True)
class Settings:
    scale: float = 1.0  # multiplies δ_A + δ_B
    abs_tolerance: float = 0.0  # nats added to every tolerance
    beta_rtol: float = 1e-6  # β differs when |β_B − β_A| > beta_rtol · |β_A|
    nats_per_token: float | None = None  # overrides ν from metrics.jsonl (needed when a run has no log-prob metrics)


@dataclass
class Flip:
    """A pair whose s differs between the runs."""

    step: int
    pair: int
    s_a: int
    s_b: int
    gaps_a: tuple[float, float]  # (weaker, stronger)
    gaps_b: tuple[float, float]
    tolerance: float  # nats
    changed: tuple[str, ...]  # the gaps on different sides of a boundary
    explained: bool
    judged: bool


@dataclass
class StepRow:
    step: int
    pairs_a: int
    pairs_b: int
    matched: int
    agree: int
    beta_a: float | None
    beta_b: float | None
    beta_rel_diff: float | None
    judged: bool
    max_gap_ratio: float | None  # max over matched pairs and both gaps of |g_B − g_A| / tolerance


@dataclass(frozen=True)
class Share:
    count: int
    n: int

    @property
    def p(self) -> float:
        return self.count / self.n if self.n else float("nan")

    @property
    def se(self) -> float:
        return math.sqrt(self.p * (1 - self.p) / self.n) if self.n else float("nan")


@dataclass
class ShareRow:
    s: int
    a: Share
    b: Share

    @property
    def diff(self) -> float:
        return self.b.p - self.a.p

    @property
    def se(self) -> float:
        return math.hypot(self.a.se, self.b.se)

    @property
    def agree(self) -> bool:
        return abs(self.diff) <= 2 * self.se


@dataclass
class Comparison:
    steps: list[StepRow]
    flips: list[Flip]
    unmatched: list[tuple[int, int, str]]  # (step, pair, "only in A" / "only in B") in judged steps
    missing_steps: list[tuple[int, str]]  # (step, "only in A" / "only in B")
    beta_divergence: int | None  # the first step whose β differs beyond beta_rtol
    beta_source: str  # "metrics" or "decisions" (β inferred to differ from the step after the first flip)
    shares: list[ShareRow] = field(default_factory=list)

    @property
    def unexplained(self) -> list[Flip]:
        return [f for f in self.flips if f.judged and not f.explained]

    @property
    def decisions_ok(self) -> bool:
        return not self.unexplained and not self.unmatched and not self.missing_steps

    @property
    def shares_ok(self) -> bool:
        return all(row.agree for row in self.shares)


# ----------------------------------------------------------------------------------------------------------- pure


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"epsilon": 0.01}}`` → ``{"loss.epsilon": 0.01}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, A's value, B's value) of every config key whose value differs, but where the run wrote and how it
    showed progress; a key one config lacks shows as None."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [(k, fa.get(k), fb.get(k)) for k in keys if k not in IGNORED_CONFIG_KEYS and fa.get(k) != fb.get(k)]


def by_step(decisions: Iterable[Mapping[str, Any]]) -> dict[int, dict[int, Mapping[str, Any]]]:
    """The records as {step: {pair: record}}; a missing column or a (step, pair) seen twice is an error."""
    out: dict[int, dict[int, Mapping[str, Any]]] = {}
    for i, record in enumerate(decisions, start=1):
        missing = [c for c in NEEDED_COLUMNS if c not in record]
        if missing:
            raise ValueError(f"decision record {i} lacks {missing} (a decisions.jsonl of decision_records=true)")
        step, pair = int(record["step"]), int(record["pair"])
        if pair in out.setdefault(step, {}):
            raise ValueError(f"decision record {i}: step {step}, pair {pair} appears twice")
        out[step][pair] = record
    return out


def step_betas(metrics: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """{step: global β the step's loss used} from the training records of ``metrics.jsonl`` (``kl/beta``)."""
    return {int(r["step"]): float(r["kl/beta"]) for r in metrics if r.get("kl/beta") is not None and "step" in r}


def nats_per_token(
    metrics: Iterable[Mapping[str, Any]], steps: Mapping[int, Mapping[int, Mapping[str, Any]]]
) -> dict[int, float]:
    """{step: ν}, the nats per token of the four sequence log-probs of the step's pairs: (|logps/chosen| +
    |logps/rejected| + |logps/ref_chosen| + |logps/ref_rejected|) / mean(chosen_tokens + rejected_tokens), for the
    steps whose metrics record has the four means."""
    out = {}
    for record in metrics:
        step = record.get("step")
        if step not in steps or any(record.get(k) is None for k in LOGP_KEYS):
            continue
        rows = steps[step].values()
        tokens = sum(r["chosen_tokens"] + r["rejected_tokens"] for r in rows) / len(rows)
        if tokens > 0:
            out[int(step)] = sum(abs(float(record[k])) for k in LOGP_KEYS) / tokens
    return out


def log_mass(record: Mapping[str, Any], nu: float) -> float:
    """S of a pair, in nats: ν times its chosen plus rejected tokens."""
    return nu * (record["chosen_tokens"] + record["rejected_tokens"])


def gap_side(gap: float, dead_band: float) -> int:
    """+1 above τ, −1 below −τ, 0 in between: where the decision rule places one gap."""
    return 1 if gap > dead_band else -1 if gap < -dead_band else 0


def judge_pair(
    a: Mapping[str, Any], b: Mapping[str, Any], tolerance: float, band_a: float = 0.0, band_b: float = 0.0
) -> tuple[tuple[str, ...], bool]:
    """The gaps of a pair that lie on different sides of a decision boundary in the two runs, and whether each of
    them differs between the runs by at most ``tolerance`` nats (the disagreement is explained by rounding). With no
    gap on different sides (records whose s disagrees with their gaps, or runs with different dead bands) nothing
    is explained."""
    changed = tuple(g for g in GAPS if gap_side(float(a[g]), band_a) != gap_side(float(b[g]), band_b))
    explained = bool(changed) and all(abs(float(b[g]) - float(a[g])) <= tolerance for g in changed)
    return changed, explained


def first_beta_divergence(betas_a: Mapping[int, float], betas_b: Mapping[int, float], rtol: float) -> int | None:
    """The first step logged by both runs whose β differs by more than ``rtol`` relative to A's; None if none."""
    for step in sorted(set(betas_a) & set(betas_b)):
        if abs(betas_b[step] - betas_a[step]) > rtol * abs(betas_a[step]):
            return step
    return None


def decision_shares(decisions: Iterable[Mapping[str, Any]]) -> dict[int, Share]:
    """{s: Share} for s = +1, 0, −1 over all the records."""
    values = [int(r["s"]) for r in decisions]
    return {s: Share(values.count(s), len(values)) for s in (1, 0, -1)}


def _step_nu(nus: Mapping[int, float], step: int, override: float | None, label: str) -> float:
    if override is not None:
        return override
    if step in nus:
        return nus[step]
    if nus:  # a step without its own metrics record: the run's mean
        return sum(nus.values()) / len(nus)
    raise ValueError(
        f"run {label}: metrics.jsonl has none of {list(LOGP_KEYS)} to size the rounding tolerance; give "
        "--nats-per-token (the responses' mean −log-prob per token) or --abs-tolerance"
    )


def compare(a: RunRecords, b: RunRecords, settings: Settings | None = None) -> Comparison:
    """Compare B's decisions with A's, step by step and pair by pair (see the module's docstring)."""
    settings = settings or Settings()
    steps_a, steps_b = by_step(a.decisions), by_step(b.decisions)
    nus_a, nus_b = nats_per_token(a.metrics, steps_a), nats_per_token(b.metrics, steps_b)
    betas_a, betas_b = step_betas(a.metrics), step_betas(b.metrics)
    common = sorted(set(steps_a) & set(steps_b))
    missing = [(s, "only in A") for s in sorted(set(steps_a) - set(steps_b))]
    missing += [(s, "only in B") for s in sorted(set(steps_b) - set(steps_a))]

    flips: list[Flip] = []
    gap_ratios: dict[int, float | None] = {}
    for step in common:
        ra, rb = steps_a[step], steps_b[step]
        nu_a = _step_nu(nus_a, step, settings.nats_per_token, "A")
        nu_b = _step_nu(nus_b, step, settings.nats_per_token, "B")
        worst = None
        for pair in sorted(set(ra) & set(rb)):
            pa, pb = ra[pair], rb[pair]
            tol = (
                settings.scale
                * (a.regime.allowance_per_nat * log_mass(pa, nu_a) + b.regime.allowance_per_nat * log_mass(pb, nu_b))
                + settings.abs_tolerance
            )
            if tol > 0:
                ratio = max(abs(float(pb[g]) - float(pa[g])) / tol for g in GAPS)
                worst = ratio if worst is None else max(worst, ratio)
            if int(pa["s"]) != int(pb["s"]):
                changed, explained = judge_pair(pa, pb, tol, a.regime.dead_band, b.regime.dead_band)
                flips.append(
                    Flip(
                        step,
                        pair,
                        int(pa["s"]),
                        int(pb["s"]),
                        (float(pa["weaker_gap"]), float(pa["stronger_gap"])),
                        (float(pb["weaker_gap"]), float(pb["stronger_gap"])),
                        tol,
                        changed,
                        explained,
                        judged=False,
                    )
                )
        gap_ratios[step] = worst

    if betas_a and betas_b:
        divergence, source = first_beta_divergence(betas_a, betas_b, settings.beta_rtol), "metrics"
    else:  # no β logged: it changes from the step after the first flip (inverse_mean_step and mean_beta alike)
        divergence, source = (flips[0].step + 1 if flips else None), "decisions"
    last_judged = divergence if divergence is not None else math.inf
    for flip in flips:
        flip.judged = flip.step <= last_judged

    rows, unmatched = [], []
    for step in common:
        ra, rb = steps_a[step], steps_b[step]
        matched = set(ra) & set(rb)
        judged = step <= last_judged
        if judged:
            unmatched += [(step, p, "only in A") for p in sorted(set(ra) - matched)]
            unmatched += [(step, p, "only in B") for p in sorted(set(rb) - matched)]
        beta_a, beta_b = betas_a.get(step), betas_b.get(step)
        rel = abs(beta_b - beta_a) / abs(beta_a) if beta_a is not None and beta_b is not None else None
        agree = sum(int(ra[p]["s"]) == int(rb[p]["s"]) for p in matched)
        rows.append(StepRow(step, len(ra), len(rb), len(matched), agree, beta_a, beta_b, rel, judged, gap_ratios[step]))
    missing = [(s, w) for s, w in missing if s <= last_judged]
    shares_a, shares_b = decision_shares(a.decisions), decision_shares(b.decisions)
    shares = [ShareRow(s, shares_a[s], shares_b[s]) for s in (1, 0, -1)]
    return Comparison(rows, flips, unmatched, missing, divergence, source, shares)


def exit_status(comparison: Comparison, judge: str = "decisions") -> int:
    """0 when what ``judge`` names (``decisions``, ``shares`` or ``both``) agrees, else 1."""
    if judge not in ("decisions", "shares", "both"):
        raise ValueError(f"judge must be decisions, shares or both, got {judge!r}")
    ok = {"decisions": comparison.decisions_ok, "shares": comparison.shares_ok}
    ok["both"] = ok["decisions"] and ok["shares"]
    return 0 if ok[judge] else 1


def _fmt(x: float | None, spec: str = ".6g") -> str:
    return "-" if x is None else format(x, spec)


def format_report(comparison: Comparison, judge: str = "decisions") -> str:
    """The comparison as text: the steps, the flips, β, the shares and the verdict."""
    lines = ["step  pairs A/B  s agree   β A          β B          rel. diff   max |Δgap|/tol  judged"]
    for r in comparison.steps:
        lines.append(
            f"{r.step:>4}  {r.pairs_a:>4}/{r.pairs_b:<4} {r.agree:>3}/{r.matched:<4}  {_fmt(r.beta_a, '<12.9g')} "
            f"{_fmt(r.beta_b, '<12.9g')} {_fmt(r.beta_rel_diff, '<11.3g')} {_fmt(r.max_gap_ratio, '<15.3g')} "
            f"{'yes' if r.judged else 'no'}"
        )
    for step, which in comparison.missing_steps:
        lines.append(f"step {step}: {which} (a judged step the other run lacks)")
    for step, pair, which in comparison.unmatched:
        lines.append(f"step {step}, pair {pair}: {which} (the runs did not train on the same pairs)")
    lines.append("")
    if not comparison.flips:
        lines.append("every matched pair has the same s in both runs")
    for f in comparison.flips:
        verdict = "explained by rounding" if f.explained else "NOT explained by rounding"
        deltas = ", ".join(
            f"{g} Δ={gb - ga:+.3g}" for g, ga, gb in zip(GAPS, f.gaps_a, f.gaps_b, strict=True) if g in f.changed
        )
        lines.append(
            f"step {f.step}, pair {f.pair}: s A={f.s_a:+d} B={f.s_b:+d}; weaker_gap A={f.gaps_a[0]:.4g} "
            f"B={f.gaps_b[0]:.4g}, stronger_gap A={f.gaps_a[1]:.4g} B={f.gaps_b[1]:.4g}; changed side: {deltas}; "
            f"tolerance {f.tolerance:.3g} nats: {verdict}{'' if f.judged else ' (after β diverged: not judged)'}"
        )
    lines.append("")
    if comparison.beta_divergence is None:
        lines.append(f"β: the same at every common step (from {comparison.beta_source})")
    else:
        cause = [f for f in comparison.flips if f.step < comparison.beta_divergence]
        why = ""
        if cause:
            kind = "unexplained" if any(not f.explained for f in cause) else "explained"
            why = f", after {len(cause)} {kind} flip(s) from step {cause[0].step}"
        lines.append(
            f"β: first differs at step {comparison.beta_divergence}{why} (from {comparison.beta_source}); from step "
            f"{comparison.beta_divergence + 1} on the runs train with different β and their decisions legitimately "
            "diverge: compared by shares only"
        )
    lines.append("")
    lines.append("shares of s over all records:")
    lines.append("   s   A                          B                          B − A")
    for row in comparison.shares:
        a = f"{row.a.p:.3f} ± {row.a.se:.3f} ({row.a.count}/{row.a.n})"
        b = f"{row.b.p:.3f} ± {row.b.se:.3f} ({row.b.count}/{row.b.n})"
        flag = "" if row.agree else "  beyond 2 s.e."
        lines.append(f"  {('+1', ' 0', '-1')[1 - row.s]}   {a:<26} {b:<26} {row.diff:+.3f} ± {row.se:.3f}{flag}")
    n_judged = sum(f.judged for f in comparison.flips)
    lines.append("")
    lines.append(
        f"decisions: {'agree' if comparison.decisions_ok else 'DISAGREE'} ({n_judged} judged flip(s), "
        f"{len(comparison.unexplained)} unexplained); shares: {'agree' if comparison.shares_ok else 'DIFFER'} "
        f"within 2 s.e.; judged on {judge}: exit {exit_status(comparison, judge)}"
    )
    return "\n".join(lines)


def summary(comparison: Comparison, judge: str) -> dict[str, Any]:
    """The comparison as JSON-ready data (``--json``)."""
    return {
        "steps": [asdict(r) for r in comparison.steps],
        "flips": [asdict(f) for f in comparison.flips],
        "unmatched": comparison.unmatched,
        "missing_steps": comparison.missing_steps,
        "beta_divergence": comparison.beta_divergence,
        "beta_source": comparison.beta_source,
        "shares": [
            {
                "s": r.s,
                "a": r.a.p,
                "a_se": r.a.se,
                "b": r.b.p,
                "b_se": r.b.se,
                "n_a": r.a.n,
                "n_b": r.b.n,
                "diff": r.diff,
                "diff_se": r.se,
                "agree": r.agree,
            }
            for r in comparison.shares
        ],  # fmt: skip
        "decisions_ok": comparison.decisions_ok,
        "shares_ok": comparison.shares_ok,
        "judge": judge,
        "exit_status": exit_status(comparison, judge),
    }


# ----------------------------------------------------------------------------------------------------------- files


@dataclass
class Run:
    source: Path
    records: RunRecords
    config: dict[str, Any]
    provenance: dict[str, Any]


def load_run(path: str | Path, config_path: str | Path | None = None) -> Run:
    """A run from its directory, or from its ``decisions.jsonl`` with the other files beside it."""
    path = Path(path)
    directory, decisions = (path, path / "decisions.jsonl") if path.is_dir() else (path.parent, path)
    if not decisions.is_file():
        raise FileNotFoundError(f"{decisions}: no decision records (train with decision_records=true)")
    config_file = Path(config_path) if config_path else directory / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config to read the run's regime from; give --config-a/--config-b")
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    metrics_file = directory / "metrics.jsonl"
    metrics = read_jsonl(metrics_file) if metrics_file.is_file() else []
    provenance_file = directory / "provenance.json"
    provenance = json.loads(provenance_file.read_text(encoding="utf-8")) if provenance_file.is_file() else {}
    return Run(path, RunRecords(read_jsonl(decisions), metrics, Regime.from_config(config)), config, provenance)


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_provenance(run_dir: str | Path, command: str | None) -> Path:
    """``RUN_DIR/provenance.json``: this machine (CPU, bf16 support, GPU if any, torch), versions, date, commit and
    the command that made the run; what the comparison prints for the run."""
    import torch
    import transformers

    from epsdpo.machine import machine_label

    path = Path(run_dir) / "provenance.json"
    record = {
        "machine": machine_label(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "command": command,
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def describe_run(name: str, run: Run) -> list[str]:
    prov = run.provenance
    machine = prov.get("machine", "not recorded (no provenance.json)")
    lines = [f"{name}: {run.source}", f"   machine: {machine}"]
    if prov.get("date") or prov.get("commit"):
        lines.append(f"   date {prov.get('date', '?')}, commit {str(prov.get('commit'))[:12]}")
    if prov.get("command"):
        lines.append(f"   command: {prov['command']}")
    lines.append(f"   regime: {run.records.regime.describe()}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="A (the reference) and B (the candidate): run dirs or decisions.jsonl")
    parser.add_argument("--config-a", help="A's config.yaml, when it is not beside its decisions.jsonl")
    parser.add_argument("--config-b", help="B's config.yaml, when it is not beside its decisions.jsonl")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the rounding allowances (default 1)")
    parser.add_argument("--abs-tolerance", type=float, default=0.0, help="nats added to every tolerance (default 0)")
    parser.add_argument("--beta-rtol", type=float, default=1e-6, help="relative β difference that counts (1e-6)")
    parser.add_argument("--nats-per-token", type=float, help="ν for S instead of metrics.jsonl's log-probs")
    judge = parser.add_mutually_exclusive_group()
    judge.add_argument("--shares", action="store_true", help="also require the shares of s to agree within 2 s.e.")
    judge.add_argument("--shares-only", action="store_true", help="judge the shares of s alone")
    parser.add_argument("--json", help="write the summary to this JSON file")
    parser.add_argument("--record", metavar="RUN_DIR", help="write RUN_DIR/provenance.json for this machine and stop")
    parser.add_argument("--command", help="with --record: the command that made the run")
    args = parser.parse_args(argv)
    if args.record:
        print(f"wrote {write_provenance(args.record, args.command)}")
        return 0
    if len(args.runs) != 2:
        parser.error("give two runs: A (the reference) and B (the candidate)")
    if args.scale <= 0 or args.abs_tolerance < 0 or args.beta_rtol < 0:
        parser.error("need --scale > 0, --abs-tolerance >= 0 and --beta-rtol >= 0")
    judged_on = "shares" if args.shares_only else "both" if args.shares else "decisions"
    try:
        run_a, run_b = load_run(args.runs[0], args.config_a), load_run(args.runs[1], args.config_b)
        settings = Settings(args.scale, args.abs_tolerance, args.beta_rtol, args.nats_per_token)
        comparison = compare(run_a.records, run_b.records, settings)
    except (OSError, ValueError) as err:
        print(f"decision_agreement: {err}", file=sys.stderr)
        return 2
    lines = describe_run("A (reference)", run_a) + describe_run("B (candidate)", run_b)
    diffs = config_differences(run_a.config, run_b.config)
    lines.append("config differences (A → B): " + ("none" if not diffs else ""))
    lines += [f"   {k}: {va} → {vb}" for k, va, vb in diffs]
    lines.append(
        f"tolerance of a flip: {args.scale:g} × (δ_A + δ_B) + {args.abs_tolerance:g} nats, δ = S · allowance, S = ν · "
        f"tokens ({'ν = ' + format(args.nats_per_token, 'g') if args.nats_per_token else 'ν from metrics.jsonl'})"
    )
    print("\n".join(lines) + "\n\n" + format_report(comparison, judged_on))
    if args.json:
        out = summary(comparison, judged_on)
        out["runs"] = {
            name: {"source": str(run.source), "provenance": run.provenance, "regime": asdict(run.records.regime)}
            for name, run in (("a", run_a), ("b", run_b))
        }
        out["config_differences"] = [list(d) for d in diffs]
        out["settings"] = asdict(settings)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    return exit_status(comparison, judged_on)


if __name__ == "__main__":
    sys.exit(main())
