"""Sampling responses from a model exactly, reproducibly and independently of batching.

What ``epsdpo generate``, ``epsdpo eval``, training's per-sample seeds and ``epsdpo iterate`` share: the prompt and
sampling settings (:class:`SamplingConfig`), the prompts themselves (:func:`load_prompts`), and the sampler.

**Reproducible sampling.** Every sampled response has its own random stream, seeded from
``sha256(seed, prompt_id, sample index[, stream])`` (:func:`sample_seed`); at each step the next token is drawn from
that stream alone by inverting the cumulative distribution (:func:`sample_next_tokens`). A response therefore depends
only on the model, its prompt and those values, not on which other prompts shared its batch or on how many ran before
it. (The one residue: the batch's left padding changes floating-point rounding in the forward pass, which in rare
cases flips a sampled token.) ``epsdpo eval`` draws the policy's and the reference's samples from two further,
independent families of streams (``policy`` and ``reference``).

**Exact sampling.** The decoding loop (:func:`sample_completions`) is our own, not ``model.generate``: every token is
drawn from the model's raw next-token logits with only ``temperature`` and ``top_p`` applied, so at the defaults the
responses are samples of the model itself.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from epsdpo.assets import load_bundled_prompts
from epsdpo.config import ConfigError
from epsdpo.data.errors import DataError
from epsdpo.data.loading import load_rows
from epsdpo.data.tokenize import inspect_tokenizer

__all__ = [
    "Completion",
    "SamplingConfig",
    "decode_completion",
    "encode_prompt",
    "end_token_ids",
    "load_prompts",
    "sample_completions",
    "sample_next_tokens",
    "sample_seed",
    "samples_the_model",
    "wants_chat_template",
]


@dataclass
class SamplingConfig:
    """What ``epsdpo generate`` and ``epsdpo eval`` share: where the prompts come from and how responses are sampled.

    What a setting means for a run is declared on the field (``dataclasses.field`` metadata, read with
    :func:`epsdpo.config.fields_where`): ``identifies=False`` marks settings that change nothing sampled or measured
    (an evaluation's identity, a generation's resume check leave them out); ``resume=False`` those a resumed
    generation may change; ``reference_part=True`` those that decide the reference's part of an evaluation (its
    cache key).

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
    trust_remote_code: bool = field(default=False, metadata={"resume": False})
    prompts: str = "bundled"
    prompt_column: str = "prompt"
    prompt_split: str | None = "train"
    max_new_tokens: int = field(default=48, metadata={"reference_part": True})
    temperature: float = field(default=1.0, metadata={"reference_part": True})
    top_p: float = field(default=1.0, metadata={"reference_part": True})
    batch_size: int = field(default=8, metadata={"reference_part": True})
    reward: str = "sentiment"
    seed: int = field(default=0, metadata={"reference_part": True})
    use_chat_template: bool | None = field(default=None, metadata={"reference_part": True})
    device: str | None = field(default=None, metadata={"identifies": False})
    disable_tqdm: bool = field(default=False, metadata={"identifies": False})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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
    """One sampled response: its token ids (with the end token when it ended) and whether it ended in time.

    ``logp``: log π(ids | prompt) under the model that sampled it, summed over ``ids`` (the end token included when
    it was sampled, nothing after it) from the raw next-token logits the sampler drew from, when it was asked to
    keep it (``sample_completions(..., with_logps=True)``); not part of the completion's identity (equality)."""

    ids: list[int]
    finished: bool
    logp: float | None = field(default=None, compare=False)


def samples_the_model(temperature: float, top_p: float) -> bool:
    """Whether sampling with these settings draws from the model's own distribution π (temperature 1, no nucleus
    truncation): then the sampler's own log-softmax of each drawn token is log π of it, and a sample's log-prob need
    not be scored again (:func:`sample_completions` ``with_logps``)."""
    return temperature == 1.0 and top_p >= 1.0


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
    with_logps: bool = False,
) -> list[Completion]:
    """Sample one completion per row (``prompt_ids[i]``, ``seeds[i]``) in one left-padded batch.

    ``with_logps``: also keep each completion's log π(y | x) (:attr:`Completion.logp`): the sum, over the tokens
    drawn until and including the end token, of the float32 log-softmax of the raw logits each was drawn from, the
    same quantity a separate scoring pass (:func:`epsdpo.logps.scoring.row_logps`) computes, to float32 rounding. It
    is log π only when the settings sample π itself (:func:`samples_the_model`); otherwise it is refused.

    The decoding loop is our own (a KV cache, stopping at ``end_ids``), not ``model.generate``: ``generate`` merges
    the model's own ``generation_config`` into the one it is given (a Hub model's ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``suppress_tokens``, …), and its processed scores are not π. Here every token is drawn
    by :func:`sample_next_tokens` from the row's own generator, from the model's raw next-token logits, with only
    ``temperature`` and ``top_p`` applied, so the samples are samples of the model itself (at the defaults).
    """
    if len(prompt_ids) != len(seeds):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds")
    if with_logps and not samples_the_model(temperature, top_p):
        raise ValueError("with_logps needs temperature=1 and top_p=1: tempered or truncated draws are not samples of π")
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
    logps = torch.zeros(n, dtype=torch.float32, device=device)  # (N,) Σ log π of the tokens drawn so far
    cache_key, extra = _decoding_kwargs(model)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, **extra)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]  # (N, V): the raw next-token logits, no processor in between
        tokens = sample_next_tokens(logits, generators, temperature, top_p).to(device)
        if with_logps:  # the drawn token's log-softmax under π, for the rows still running (not their padding)
            picked = logits.float().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)  # (N,)
            logps += torch.where(done, torch.zeros_like(picked), picked)
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
    row_logps = logps.tolist() if with_logps else [None] * n
    for row, logp in zip(torch.stack(drawn, dim=1).tolist(), row_logps, strict=True):
        stop = next((i for i, token in enumerate(row) if token in end_set), None)
        completions.append(Completion(row if stop is None else row[: stop + 1], stop is not None, logp))
    return completions


def _decoding_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """The name of the KV-cache argument and output (``cache`` in recent transformers, ``past_key_values`` before),
    and ``logits_to_keep=1`` where the model takes it (only the last position's logits are needed)."""
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
    return sorted(inspect_tokenizer(tokenizer).end_ids)


def load_prompts(
    source: str, split: str | None = None, column: str = "prompt", limit: int | None = None
) -> list[tuple[str, str]]:
    """``(prompt_id, prompt)`` pairs from ``bundled`` or a data source (see :class:`GenerateConfig`).

    Raises ``ValueError`` naming the source and row for a missing or empty prompt, or duplicate ids.
    """
    if source == "bundled":
        rows: list[Any] = load_bundled_prompts(split)
        where = f"bundled prompts (split {split})"
    else:
        raw = load_rows(source, split=split or "train")
        rows, where = raw.rows, raw.source
    numbered = list(enumerate(rows))  # row numbers in the source name prompts without an id column
    if source != "bundled" and split is not None and "split" in raw.columns:
        numbered = [(i, r) for i, r in numbered if isinstance(r, Mapping) and r.get("split") == split]
    prompts: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, row in numbered:
        if source != "bundled" and index in raw.problems:  # a line that could not be read (bad JSON, not UTF-8)
            problem = raw.problems[index]
            raise DataError(problem.describe(raw.where(index)), source=raw.source, reason=problem.reason, row=index)
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
