"""On-policy preference pairs: sample k responses per prompt, score them with a gold reward, keep best and worst.

This is the data stage of the DPO paper's controlled sentiment experiment (Rafailov et al. 2023, arXiv 2305.18290,
§6.1): the pairs are drawn from the model that will be aligned, and a gold reward (here VADER sentiment, see
:mod:`epsdpo.rewards`) ranks them. For each prompt x:

    y₁ … y_k ~ π(· | x)        (temperature, top-p)
    r_i = reward(x, y_i)
    chosen = argmax_i r_i,  rejected = argmin_i r_i   (first index on ties; skipped when r_max = r_min)

**Reproducible sampling.** Every sampled response has its own random stream, seeded from
``sha256(seed, prompt_id, sample index)``; at each step the next token is drawn from that stream alone by inverting
the cumulative distribution (:func:`sample_next_tokens`). A response therefore depends only on the model, its prompt
and those three values, not on which other prompts shared its batch or on how many ran before it. (The one residue:
the batch's left padding changes floating-point rounding in the forward pass, which in rare cases flips a sampled
token; resuming keeps batches identical to an uninterrupted run, see below, so a resumed file is exactly equal.)
``epsdpo eval`` draws the policy's and the reference's samples from two further, independent families of streams.

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
uninterrupted one would (with the same ``batch_size``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from epsdpo.config import ConfigError, load_config

__all__ = [
    "Completion",
    "GenerateConfig",
    "SamplingConfig",
    "GenerateSummary",
    "decode_completion",
    "encode_prompt",
    "generate",
    "load_generate_config",
    "load_prompts",
    "sample_completions",
    "sample_next_tokens",
    "sample_seed",
]

#: settings that must match for a rerun to continue an existing output file
RESUME_KEYS = (
    "model",
    "tokenizer",
    "prompts",
    "prompt_column",
    "prompt_split",
    "num_samples",
    "max_new_tokens",
    "temperature",
    "top_p",
    "reward",
    "seed",
    "use_chat_template",
    "batch_size",
)


@dataclass
class SamplingConfig:
    """What ``epsdpo generate`` and ``epsdpo eval`` share: where the prompts come from and how responses are sampled.

    Attributes:
        tokenizer: tokenizer name or path; ``None``: the model's own (for ``eval`` of a run: the run's).
        trust_remote_code: allow model repositories to run their own Python code. Off unless you trust the source.
        prompts: ``bundled`` (the package's sentiment prompts, :func:`epsdpo.assets.load_bundled_prompts`), or a
            ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a saved dataset or a Hub id with a prompt column.
            A ``prompt_id`` or ``id`` column names each prompt; otherwise its row number does.
        prompt_column: the column holding the prompt text.
        prompt_split: ``train``/``test`` for the bundled prompts (``test`` holds out whole subjects; ``generate``
            defaults to ``train``, ``eval`` to ``test``); for other sources the rows whose ``split`` column has this
            value (or, without such a column, the dataset split to read); ``None``: every prompt.
        max_new_tokens: longest response in tokens; longer ones are cut (``finished`` false).
        temperature: sampling temperature (> 0); 1 samples from the model itself (and keeps ``eval``'s KL estimate
            unbiased).
        top_p: nucleus sampling: keep the smallest set of tokens with this much probability; 1 keeps all (and keeps
            ``eval``'s KL estimate unbiased).
        batch_size: prompts per sampling batch (each contributes one row per sample); ``eval`` also scores this
            many held-out pairs at a time.
        reward: the gold reward, a spec for :func:`epsdpo.rewards.load_reward` (``sentiment``, ``module:function``,
            or a Hugging Face reward model).
        seed: seeds every response's own random stream (with the prompt id and sample index; :func:`sample_seed`).
        use_chat_template: render each prompt as one user message through the tokenizer's chat template (with the
            assistant's generation prompt); ``None``: when the tokenizer has a template.
        device: ``cuda``, ``cpu``, …; ``None``: a GPU when there is one.
        disable_tqdm: no progress bars.
    """

    tokenizer: str | None = None
    trust_remote_code: bool = False
    prompts: str = "bundled"
    prompt_column: str = "prompt"
    prompt_split: str | None = "train"
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    reward: str = "sentiment"
    seed: int = 0
    use_chat_template: bool | None = None
    device: str | None = None
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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
    max_prompts: int | None = None
    num_samples: int = 4
    output: str = "generated/pairs.jsonl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (a pair needs two responses), got {self.num_samples}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or null (all prompts), got {self.max_prompts}")


def load_generate_config(
    source: str | Path | Mapping[str, Any] | GenerateConfig | None = None, overrides: Sequence[str] = ()
) -> GenerateConfig:
    """A :class:`GenerateConfig` from a YAML file, a mapping or ``None`` (defaults), plus ``key=value`` overrides."""
    if isinstance(source, GenerateConfig):
        if overrides:
            raise ConfigError("overrides need a YAML file or mapping, not a GenerateConfig; use dataclasses.replace")
        return source
    return load_config(source, overrides, {"generate": GenerateConfig})["generate"]


# ---- sampling -----------------------------------------------------------------------------------------------------
def sample_seed(seed: int, prompt_id: str, sample: int, stream: str = "") -> int:
    """The seed of one response's random stream: a stable hash of (seed, prompt id, sample index), 63 bits.

    ``stream`` names an independent family of streams (``epsdpo eval`` draws the policy's and the reference's
    samples from the streams ``policy`` and ``reference``, so the two are independent draws); ``""`` is the one
    ``epsdpo generate`` uses.
    """
    key = f"{seed}\x1f{prompt_id}\x1f{sample}" + (f"\x1f{stream}" if stream else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_next_tokens(
    logits: Tensor, generators: Sequence[torch.Generator], temperature: float = 1.0, top_p: float = 1.0
) -> Tensor:
    """One token per row of ``logits`` (N, V), row i drawn with ``generators[i]`` only.

    Inverse-CDF sampling: u ∈ (0, 1] from the row's generator, the token is the first whose cumulative probability
    reaches u · total. One uniform per row and step, so a row's draws never depend on the other rows.
    """
    scaled = logits.float() / temperature  # (N, V)
    if top_p < 1.0:  # nucleus: drop the tokens outside the smallest set holding top_p of the probability
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each token
        drop = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, order, before >= top_p)
        scaled = scaled.masked_fill(drop, float("-inf"))
    cdf = scaled.softmax(-1).cumsum(-1)  # (N, V)
    u = torch.tensor([1.0 - torch.rand((), generator=g).item() for g in generators], dtype=cdf.dtype)
    targets = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (N, 1), in (0, total]
    return torch.searchsorted(cdf, targets).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


@dataclass(frozen=True)
class Completion:
    """One sampled response: its token ids (with the end token when it ended) and whether it ended in time."""

    ids: list[int]
    finished: bool


@torch.inference_mode()
def sample_completions(
    model: Any,
    prompt_ids: Sequence[list[int]],
    seeds: Sequence[int],
    *,
    max_new_tokens: int,
    end_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[Completion]:
    """Sample one completion per row (``prompt_ids[i]``, ``seeds[i]``) in one left-padded batch.

    The decoding loop is our own (a KV cache, stopping at ``end_ids``), not ``model.generate``: ``generate`` merges
    the model's own ``generation_config`` into the one it is given (a Hub model's ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``suppress_tokens``, …), and its processed scores are not π. Here every token is drawn
    by :func:`sample_next_tokens` from the row's own generator, from the model's raw next-token logits, with only
    ``temperature`` and ``top_p`` applied, so the samples are samples of the model itself (at the defaults).
    """
    if len(prompt_ids) != len(seeds):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds")
    device = next(model.parameters()).device
    n, width = len(prompt_ids), max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp_(min=0)  # (N, W): each prompt's first real token at position 0
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    ends = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    drawn: list[Tensor] = []  # one (N,) tensor per new position
    cache_key, extra = _decoding_kwargs(model)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, **extra)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]  # (N, V): the raw next-token logits, no processor in between
        tokens = sample_next_tokens(logits, generators, temperature, top_p).to(device)
        tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)  # finished rows: padding
        drawn.append(tokens)
        done |= torch.isin(tokens, ends)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones((n, 1), dtype=attention.dtype, device=device)], dim=-1)
        positions = positions[:, -1:] + 1
        cache = out.get(cache_key)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{cache_key: cache},
            **extra,
        )
    end_set = set(end_ids)
    completions = []
    for row in torch.stack(drawn, dim=1).tolist():
        stop = next((i for i, token in enumerate(row) if token in end_set), None)
        completions.append(Completion(row if stop is None else row[: stop + 1], stop is not None))
    return completions


def _decoding_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """The name of the KV-cache argument and output (``cache`` in recent transformers, ``past_key_values`` before),
    and ``logits_to_keep=1`` where the model takes it (only the last position's logits are needed)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    return key, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def encode_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of a prompt as the model sees it before its answer, the way :mod:`epsdpo.data` tokenizes it.

    With the chat template: ``[{"role": "user", "content": prompt}]`` rendered with the generation prompt, as the
    data pipeline renders a conversational row. Either way the text is encoded without special tokens and starts
    with exactly one BOS when the tokenizer puts BOS in front of plain text.
    """
    text = prompt
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    plain = tokenizer("a", add_special_tokens=True)["input_ids"]
    if bos is not None and plain and plain[0] == bos:
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        if not ids or ids[0] != bos:
            ids = [bos, *ids]
    return ids


def decode_completion(tokenizer: Any, completion: Completion) -> str:
    """The response text: special tokens (the end token) removed, surrounding whitespace stripped."""
    return tokenizer.decode(completion.ids, skip_special_tokens=True).strip()


def wants_chat_template(tokenizer: Any, setting: bool | None) -> bool:
    """``use_chat_template`` resolved: ``None`` means whether the tokenizer has a template."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting and not has:
        raise ConfigError("use_chat_template=true but the tokenizer has no chat template; set it to false")
    return has if setting is None else setting


def end_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a response: EOS and the chat template's end-of-turn marker (as :mod:`epsdpo.data` finds)."""
    from epsdpo.data.tokenize import inspect_tokenizer

    return sorted(inspect_tokenizer(tokenizer).end_ids)


def load_model_for_sampling(name: str, trust_remote_code: bool, device: str | None) -> Any:
    """A causal LM in evaluation mode on ``device`` (a GPU when there is one and ``device`` is None)."""
    from epsdpo.models import load_causal_lm

    model = load_causal_lm(name, trust_remote_code)
    return model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---- prompts ------------------------------------------------------------------------------------------------------
def load_prompts(
    source: str, split: str | None = None, column: str = "prompt", limit: int | None = None
) -> list[tuple[str, str]]:
    """``(prompt_id, prompt)`` pairs from ``bundled`` or a data source (see :class:`GenerateConfig`).

    Raises ``ValueError`` naming the source and row for a missing or empty prompt, or duplicate ids.
    """
    if source == "bundled":
        from epsdpo.assets import load_bundled_prompts

        rows: list[Any] = load_bundled_prompts(split)
        where = f"bundled prompts (split {split})"
    else:
        from epsdpo.data.loading import load_rows

        raw = load_rows(source, split=split or "train")
        rows, where = raw.rows, raw.source
    numbered = list(enumerate(rows))  # row numbers in the source name prompts without an id column
    if source != "bundled" and split is not None and "split" in raw.columns:
        numbered = [(i, r) for i, r in numbered if isinstance(r, Mapping) and r.get("split") == split]
    prompts: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, row in numbered:
        if not isinstance(row, Mapping) or not isinstance(row.get(column), str) or not row[column].strip():
            raise ValueError(
                f"{where}: row {index} has no prompt text in column {column!r}; give every row a "
                "non-empty string there (or set prompt_column)."
            )
        key = next((row[k] for k in ("prompt_id", "id") if row.get(k) is not None), index)
        prompt_id = str(key)
        if prompt_id in seen:
            raise ValueError(f"{where}: row {index} repeats prompt id {prompt_id!r}; prompt ids must be unique.")
        seen.add(prompt_id)
        prompts.append((prompt_id, row[column]))
    if not prompts:
        raise ValueError(f"{where}: no prompts found; check prompts= and prompt_split=.")
    return prompts[:limit] if limit is not None else prompts


# ---- resumable output -----------------------------------------------------------------------------------------------
def _sidecar(output: Path, suffix: str) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + suffix)


def read_jsonl_resumable(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a JSONL file written by appending; a last line cut short by a kill is removed from the file.

    Returns (rows, whether a truncated line was dropped). A broken line before the last one is an error.
    """
    if not path.exists():
        return [], False
    data = path.read_bytes()
    dropped = False
    if data and not data.endswith(b"\n"):  # the writer was stopped in mid-line: cut the partial line off
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        data, dropped = data[:keep], True
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({err.msg}); the file was not written by an "
                "interrupted `epsdpo generate`. Move it away or fix the line."
            ) from err
    return rows, dropped


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


def _append(path: Path, records: Sequence[dict[str, Any]]) -> None:
    if not records:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


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
    from tqdm.auto import tqdm

    from epsdpo.models import load_tokenizer
    from epsdpo.rewards import load_reward

    cfg = load_generate_config(config, overrides)
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
            _append(skipped_path, new_skips)
            _append(output, new_rows)  # the pairs last: a prompt counts as done once its row is complete
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
