"""On-policy preference pairs: sample k responses per prompt, score them with a gold reward, keep best and worst.

This is the data stage of the DPO paper's controlled sentiment experiment (Rafailov et al. 2023, arXiv 2305.18290,
§6.1): the pairs are drawn from the model that will be aligned, and a gold reward (here VADER sentiment, see
:mod:`epsdpo.rewards`) ranks them. For each prompt x:

    y₁ … y_k ~ π(· | x)        (temperature, top-p)
    r_i = reward(x, y_i)
    chosen = argmax_i r_i,  rejected = argmin_i r_i   (first index on ties; skipped when r_max = r_min)

Every response is sampled by :mod:`epsdpo.sampling` from its own random stream, seeded from (seed, prompt id, sample
index), so it does not depend on which prompts shared its batch; resuming keeps batches identical to an uninterrupted
run (see below), so a resumed file is exactly equal.

**Output** (one JSON object a line; TRL's conversational format when the prompt goes through the chat template, its
standard string format otherwise, so :func:`epsdpo.data.load_preference_dataset` reads the file as it is)::

    {"prompt_id": "review-001", "prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", "content": "..."}],
     "score_chosen": 0.93, "score_rejected": -0.42, "responses": ["...", ...], "scores": [0.93, ...],
     "finished": [true, false, ...]}

``finished[i]``: response i ended with an end token within ``max_new_tokens`` (false: it was cut at the limit).

**Resumable.** Rows are appended and flushed after every batch. Prompts that yield no pair are recorded, with their
reason, in ``OUTPUT.skipped.jsonl``; the settings in ``OUTPUT.settings.json``. A rerun with the same settings reads
both files and skips every prompt already in either (never one twice); a truncated last line left by a kill in
mid-write is dropped with a message. Batches are fixed slices of the prompt list, and a batch that was only partly
written is sampled again as a whole and only its missing rows are written, so a resumed run writes exactly what an
uninterrupted one would (with the same ``batch_size``). One run writes an output at a time: a second is refused while
the first holds ``.OUTPUT.lock`` beside it (:mod:`epsdpo.runlock`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from epsdpo.config import ConfigError, fields_where, load_config
from epsdpo.files import append_jsonl, read_jsonl_resumable
from epsdpo.models import load_model_for_sampling, load_tokenizer
from epsdpo.rewards import load_reward
from epsdpo.runlock import output_file_lock
from epsdpo.sampling import (
    SamplingConfig,
    decode_completion,
    encode_prompt,
    end_token_ids,
    load_prompts,
    sample_completions,
    sample_seed,
    wants_chat_template,
)

__all__ = ["GenerateConfig", "GenerateSummary", "generate", "load_generate_config", "make_row"]


@dataclass
class GenerateConfig(SamplingConfig):
    """Settings of ``epsdpo generate`` (section ``generate``; every key also works flat and as ``key=value``).

    The prompt and sampling keys are :class:`SamplingConfig`'s; the others:

    Attributes:
        model: the model to sample from: the built-in alias ``smollm2-135m-instruct``, a local directory or a Hub id.
        max_prompts: use only the first this many prompts (after the split); ``None``: all.
        num_samples: k, responses sampled per prompt (at least 2).
        output: the JSONL file written (appended to; resumed when it exists).
    """

    model: str = "smollm2-135m-instruct"
    max_prompts: int | None = field(default=None, metadata={"resume": False})
    num_samples: int = 4
    output: str = field(default="generated/pairs.jsonl", metadata={"identifies": False})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (a pair needs two responses), got {self.num_samples}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or null (all prompts), got {self.max_prompts}")


#: settings that must match for a rerun to continue an existing output file (declared on the fields)
RESUME_KEYS = tuple(
    k for k in fields_where(GenerateConfig, "identifies") if k in fields_where(GenerateConfig, "resume")
)


def load_generate_config(
    source: str | Path | Mapping[str, Any] | GenerateConfig | None = None, overrides: Sequence[str] = ()
) -> GenerateConfig:
    """A :class:`GenerateConfig` from a YAML file, a mapping or ``None`` (defaults), plus ``key=value`` overrides."""
    if isinstance(source, GenerateConfig):
        if overrides:
            raise ConfigError("overrides need a YAML file or mapping, not a GenerateConfig; use dataclasses.replace")
        return source
    return load_config(source, overrides, {"generate": GenerateConfig})["generate"]


# ---- resumable output -----------------------------------------------------------------------------------------------
def _sidecar(output: Path, suffix: str) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + suffix)


def _check_settings(path: Path, settings: dict[str, Any], has_rows: bool) -> None:
    """Write the settings beside a new output; refuse to continue an output made with other settings."""
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"{path} records other settings for this output ({detail}); rerun with the old "
                "settings to continue it, or choose another output=PATH."
            )
    elif has_rows:
        print(f"note: {path} is missing, so the settings of the existing rows cannot be checked.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


# ---- pairs --------------------------------------------------------------------------------------------------------
def make_row(
    prompt_id: str, prompt: str, texts: list[str], scores: list[float], finished: list[bool], conversational: bool
) -> tuple[dict[str, Any] | None, str | None]:
    """The output row of one prompt, or ``(None, reason)`` when it yields no usable pair.

    Empty responses cannot be trained on and take no part in the choice. Reasons: ``fewer_than_two_nonempty``,
    ``tied_scores`` (best and worst score equal), ``identical_texts`` (best and worst response the same text).
    """
    usable = [i for i, text in enumerate(texts) if text]
    if len(usable) < 2:
        return None, "fewer_than_two_nonempty"
    best = max(usable, key=lambda i: (scores[i], -i))
    worst = min(usable, key=lambda i: (scores[i], i))
    if scores[best] == scores[worst]:
        return None, "tied_scores"
    if texts[best] == texts[worst]:
        return None, "identical_texts"

    def as_turn(text: str, role: str) -> str | list[dict[str, str]]:
        return [{"role": role, "content": text}] if conversational else text

    return {
        "prompt_id": prompt_id,
        "prompt": as_turn(prompt, "user"),
        "chosen": as_turn(texts[best], "assistant"),
        "rejected": as_turn(texts[worst], "assistant"),
        "score_chosen": scores[best],
        "score_rejected": scores[worst],
        "chosen_finished": finished[best],
        "rejected_finished": finished[worst],
        "responses": texts,
        "scores": scores,
        "finished": finished,
    }, None


@dataclass
class GenerateSummary:
    """What a run of :func:`generate` did, and what the output holds now.

    Attributes:
        output: the JSONL file.
        prompts: prompts selected (split, max_prompts).
        done_before: of those, already in the output or the skipped file when the run started.
        done_now: prompts processed by this run.
        pairs_written: rows this run wrote.
        skipped: prompts this run skipped, by reason (recorded in ``OUTPUT.skipped.jsonl``).
        empty_responses: responses this run sampled that were empty after decoding.
        unfinished_responses: responses this run cut at ``max_new_tokens``.
        truncated_line_dropped: whether a partial last line from an interrupted run was removed.
        pairs_total: rows in the output now; ``mean_score_chosen``/``mean_score_rejected`` over them.
        seconds: wall time of this run.
    """

    output: str
    prompts: int
    done_before: int
    done_now: int = 0
    pairs_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    empty_responses: int = 0
    unfinished_responses: int = 0
    truncated_line_dropped: bool = False
    pairs_total: int = 0
    mean_score_chosen: float | None = None
    mean_score_rejected: float | None = None
    seconds: float = 0.0

    def text(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        lines = [
            f"{self.output}: {self.prompts} prompts selected, {self.done_before} done before, {self.done_now} now "
            f"({self.seconds:.0f} s)",
            f"  pairs written: {self.pairs_written}; skipped: {skipped}",
            f"  responses: {self.empty_responses} empty, {self.unfinished_responses} cut at max_new_tokens",
        ]
        if self.mean_score_chosen is not None:
            lines.append(
                f"  output holds {self.pairs_total} pairs: mean score chosen {self.mean_score_chosen:.4f}, "
                f"rejected {self.mean_score_rejected:.4f}"
            )
        return "\n".join(lines)


def generate(
    config: GenerateConfig | str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> GenerateSummary:
    """Sample, score and write preference pairs (see the module docstring); resumes an existing output."""
    cfg = load_generate_config(config, overrides)
    with output_file_lock(cfg.output):  # one writer: two runs into one output would each write every pair
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> GenerateSummary:
    started = time.perf_counter()
    output = Path(cfg.output)
    prompts = load_prompts(cfg.prompts, cfg.prompt_split, cfg.prompt_column, cfg.max_prompts)
    settings = {k: v for k, v in asdict(cfg).items() if k in RESUME_KEYS}
    skipped_path = _sidecar(output, ".skipped.jsonl")
    rows, dropped = read_jsonl_resumable(output)
    skipped_rows, dropped_skipped = read_jsonl_resumable(skipped_path)
    if dropped or dropped_skipped:
        print(f"note: dropped a truncated last line (an interrupted write) from {output if dropped else skipped_path}")
    _check_settings(_sidecar(output, ".settings.json"), settings, bool(rows or skipped_rows))
    done = {str(r.get("prompt_id")) for r in rows} | {str(r.get("prompt_id")) for r in skipped_rows}
    summary = GenerateSummary(
        str(output),
        len(prompts),
        sum(pid in done for pid, _ in prompts),
        truncated_line_dropped=dropped or dropped_skipped,
    )
    pending = len(prompts) - summary.done_before
    if pending:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
        chat = wants_chat_template(tokenizer, cfg.use_chat_template)
        model = load_model_for_sampling(cfg.model, cfg.trust_remote_code, cfg.device)
        reward = load_reward(cfg.reward)
        end_ids = end_token_ids(tokenizer)
        skipped: Counter[str] = Counter()
        progress = tqdm(total=pending, desc="generate", unit="prompt", disable=cfg.disable_tqdm, dynamic_ncols=True)
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]  # fixed slices: a resumed batch is the same batch
            if all(pid in done for pid, _ in batch):
                continue
            encoded = [encode_prompt(tokenizer, text, chat) for _, text in batch]
            completions = sample_completions(
                model,
                [ids for ids in encoded for _ in range(cfg.num_samples)],
                [sample_seed(cfg.seed, pid, j) for pid, _ in batch for j in range(cfg.num_samples)],
                max_new_tokens=cfg.max_new_tokens,
                end_ids=end_ids,
                pad_id=tokenizer.pad_token_id,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
            )
            texts = [decode_completion(tokenizer, c) for c in completions]
            scores = reward([text for _, text in batch for _ in range(cfg.num_samples)], texts)
            new_rows, new_skips = [], []
            for i, (pid, text) in enumerate(batch):
                if pid in done:  # written before a crash in the middle of this batch
                    continue
                mine = slice(i * cfg.num_samples, (i + 1) * cfg.num_samples)
                finished = [c.finished for c in completions[mine]]
                row, reason = make_row(pid, text, texts[mine], scores[mine], finished, chat)
                summary.empty_responses += sum(not t for t in texts[mine])
                summary.unfinished_responses += finished.count(False)
                if row is None:
                    skipped[str(reason)] += 1
                    new_skips.append(
                        {
                            "prompt_id": pid,
                            "reason": reason,
                            "prompt": text,
                            "responses": texts[mine],
                            "scores": scores[mine],
                        }
                    )
                else:
                    new_rows.append(row)
            append_jsonl(skipped_path, new_skips)
            append_jsonl(output, new_rows)  # the pairs last: a prompt counts as done once its row is complete
            rows.extend(new_rows)
            summary.done_now += len(new_rows) + len(new_skips)
            summary.pairs_written += len(new_rows)
            progress.update(len(new_rows) + len(new_skips))
        progress.close()
        summary.skipped = dict(skipped)
    summary.pairs_total = len(rows)
    if rows:
        summary.mean_score_chosen = sum(r["score_chosen"] for r in rows) / len(rows)
        summary.mean_score_rejected = sum(r["score_rejected"] for r in rows) / len(rows)
    summary.seconds = time.perf_counter() - started
    return summary
