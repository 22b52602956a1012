"""What a reader sees of an evaluation: the text table and the figures a summary keeps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SUMMARY_KEYS", "format_table"]

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
