"""Rendering, tokenization and truncation of preference pairs, with an exact prompt/completion boundary.

Rules (the invariants the tests check):

- The prompt and each completion are tokenized **separately** (``add_special_tokens=False``), so the boundary is
  exactly where the text boundary is and chosen and rejected share the very same prompt ids. (Tokenizing
  prompt + completion together and splitting afterwards lets a BPE merge straddle the boundary.)
- BOS: when the tokenizer puts a BOS in front of a plain encode (``tokenizer("a")`` starts with it), the prompt
  starts with exactly one BOS: added if missing, and a second one (a chat template that writes ``bos_token`` into
  text that already starts with it) removed and counted (``duplicate_bos_removed``). A tokenizer that adds none
  gets none added.
- EOS: every completion ends with exactly one end token: the tokenizer's EOS for standard (string) data; for
  conversational data, the end-of-turn marker the chat template writes after an assistant message (found once by
  rendering a probe conversation; ``<|im_end|>`` for SmolLM2). What a template writes after that marker (usually a
  newline) is not part of the completion: generation stops at the marker. A completion that already ends with the
  end token does not get a second one; one that contains it earlier is invalid (``end_token_in_text``). A completion
  the data marks as unfinished (``chosen_finished``/``rejected_finished`` false: generation cut it at a length limit)
  gets no end token, and the one a chat template writes after it is removed: the model did not stop there.
- Conversational rendering: prompt text = ``apply_chat_template(prompt, add_generation_prompt=True)``, completion
  text = ``apply_chat_template(prompt + [response])`` minus that prefix. A template whose full rendering does not
  start with the prompt rendering (``template_mismatch``) cannot be split exactly and the row is invalid.

Truncation (:func:`truncate_pair`), the TRL ``DPOConfig`` options with one fixed meaning:

1. ``max_prompt_length``: an over-long prompt keeps its last tokens (``truncation_mode="keep_end"``, TRL's default)
   or its first tokens (``keep_start``); a leading BOS is kept in both modes.
2. ``max_completion_length``: each completion keeps its first tokens.
3. ``max_length``: each completion keeps its first ``max_length - len(prompt)`` tokens. (TRL ≥ 0.12 applies
   ``truncation_mode`` to the whole sequence at this step instead; here the prompt is only ever cut by
   ``max_prompt_length``, so the prompt the model conditions on is the same for both responses and never loses
   its end.)

A truncated completion does not end with EOS (it was cut) and is counted as ``chosen_truncated`` /
``rejected_truncated``; a completion cut to zero tokens drops the pair (``empty_after_truncation``), and so do two
completions cut to identical ids (``identical_after_truncation``): neither can be trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from epsdpo.data.config import TruncationMode
from epsdpo.data.errors import DataError, RowProblem
from epsdpo.data.formats import Example

__all__ = [
    "RenderedPair",
    "TokenizedPair",
    "TokenizedText",
    "TokenizerSpec",
    "Truncation",
    "inspect_tokenizer",
    "mark_boundary",
    "render_example",
    "tokenize_rendered",
    "truncate_pair",
]

_PROBE = "epsdpo-probe-7f3a"


@dataclass(frozen=True)
class TokenizerSpec:
    """What the pipeline needs to know about a tokenizer, found once by :func:`inspect_tokenizer`.

    Attributes:
        name: the tokenizer's name or path, for messages.
        bos_id: the BOS id, or ``None``.
        adds_bos: whether a plain encode starts with BOS (then every prompt starts with exactly one).
        eos_id: the id that ends a standard completion.
        chat_end_id: the id the chat template writes at the end of an assistant turn (``None`` if it writes no
            special token there: conversational completions then end with ``eos_id``).
        chat_tail: the text the template writes after that marker, which is not part of the completion.
        has_chat_template: whether conversational data can be rendered at all.
    """

    name: str
    bos_id: int | None
    adds_bos: bool
    eos_id: int
    chat_end_id: int | None
    chat_tail: str
    has_chat_template: bool

    @property
    def end_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.eos_id, self.chat_end_id) if i is not None)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def inspect_tokenizer(tokenizer: Any) -> TokenizerSpec:
    """Find BOS/EOS behaviour and the chat template's end-of-turn marker; raises :class:`DataError` without EOS."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(
            f"tokenizer {name!r} has no EOS token, so completions cannot be ended; set tokenizer.eos_token.",
            source=name,
            reason="no_eos",
        )
    bos_id = tokenizer.bos_token_id
    plain = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds_bos = bos_id is not None and len(plain) > 0 and plain[0] == bos_id
    template = getattr(tokenizer, "chat_template", None)
    chat_end_id, chat_tail = None, ""
    if template:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        after = rendered[rendered.rfind(_PROBE) + len(_PROBE) :]
        after_ids = _encode(tokenizer, [after])[0]
        if after_ids and after_ids[0] in set(tokenizer.all_special_ids):
            marker = tokenizer.decode(after_ids[:1])
            if after.startswith(marker):
                chat_end_id, chat_tail = after_ids[0], after[len(marker) :]
        else:
            chat_tail = after
    return TokenizerSpec(name, bos_id, adds_bos, int(eos_id), chat_end_id, chat_tail, bool(template))


@dataclass(frozen=True)
class RenderedPair:
    """The texts of a pair exactly as they are tokenized (chat template applied, template tail removed)."""

    prompt: str
    chosen: str
    rejected: str


def _completion_text(
    tokenizer: Any,
    spec: TokenizerSpec,
    prompt: list[dict[str, Any]],
    prompt_text: str,
    response: list[dict[str, Any]],
    column: str,
) -> str:
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(prompt_text):
        raise RowProblem(
            "template_mismatch",
            column,
            "the chat template renders the conversation with this response differently from the prompt alone, so "
            "the prompt/response boundary cannot be found",
            "Use a tokenizer whose template only appends the response, or give the data as pre-rendered strings.",
        )
    text = full[len(prompt_text) :]
    if spec.chat_tail and text.endswith(spec.chat_tail):
        text = text[: -len(spec.chat_tail)]
    return text


def render_example(example: Example, tokenizer: Any, spec: TokenizerSpec, columns: tuple[str, str]) -> RenderedPair:
    """Texts for one example: as given (standard) or through the chat template (conversational).

    ``columns`` names the chosen and rejected columns for messages; raises :class:`RowProblem`.
    """
    if not example.is_conversational:
        assert isinstance(example.prompt, str) and isinstance(example.chosen, str)
        assert isinstance(example.rejected, str)
        return RenderedPair(example.prompt, example.chosen, example.rejected)
    assert isinstance(example.prompt, list) and isinstance(example.chosen, list)
    assert isinstance(example.rejected, list)
    prompt_text = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
    chosen = _completion_text(tokenizer, spec, example.prompt, prompt_text, example.chosen, columns[0])
    rejected = _completion_text(tokenizer, spec, example.prompt, prompt_text, example.rejected, columns[1])
    return RenderedPair(prompt_text, chosen, rejected)


def _prompt_ids(ids: list[int], spec: TokenizerSpec) -> tuple[list[int], bool]:
    """Exactly one leading BOS when the tokenizer adds one; returns (ids, whether a duplicate was removed)."""
    if not spec.adds_bos or spec.bos_id is None:
        return ids, False
    if not ids or ids[0] != spec.bos_id:
        return [spec.bos_id, *ids], False
    if len(ids) > 1 and ids[1] == spec.bos_id:
        return ids[1:], True
    return ids, False


def _completion_ids(
    ids: list[int], spec: TokenizerSpec, conversational: bool, column: str, finished: bool = True
) -> list[int]:
    end_id = spec.chat_end_id if conversational and spec.chat_end_id is not None else spec.eos_id
    if not finished and ids and ids[-1] in spec.end_ids:
        ids = ids[:-1]  # an end token a chat template wrote after a response that was cut
    if not ids or ids[-1] not in spec.end_ids or not finished:
        ids = [*ids, end_id]  # (an unfinished one is checked like a finished one, then loses it again below)
    early = [i for i, t in enumerate(ids[:-1]) if t in spec.end_ids]
    if early:
        raise RowProblem(
            "end_token_in_text",
            column,
            f"the response contains the end token (id {ids[early[0]]}) before its end, at token {early[0]}",
            "Remove special tokens such as EOS or end-of-turn markers from the response text: epsdpo ends every "
            "response with one end token itself.",
        )
    return ids if finished else ids[:-1]


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """One pair ready for batching (the contract the collator and trainer rely on).

    Attributes:
        prompt_ids: the shared prompt; BOS at most once, at the start, when the tokenizer wants one.
        chosen_ids: completion tokens only; ends with one end token unless ``chosen_truncated`` (cut here, or
            marked unfinished by the data).
        rejected_ids: likewise.
        score_chosen: the chosen response's score from the data, or ``None``.
        score_rejected: likewise.
        index: the row's 0-based position in its source.
        chosen_truncated: the chosen completion was cut, here or at generation (so it does not end with EOS).
        rejected_truncated: likewise.
        score_margin: the explicit margin given by several scores (their max − min), or ``None``.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    score_chosen: float | None
    score_rejected: float | None
    index: int
    chosen_truncated: bool = False
    rejected_truncated: bool = False
    score_margin: float | None = None

    @property
    def explicit_margin(self) -> float | None:
        """The explicit margin of data selection: ``score_margin`` (k scores), else chosen − rejected, else None."""
        if self.score_margin is not None:
            return self.score_margin
        if self.score_chosen is None or self.score_rejected is None:
            return None
        return float(self.score_chosen) - float(self.score_rejected)

    @property
    def length(self) -> int:
        """The longer of the two rows this pair becomes in a batch."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of one rendered pair, before truncation; ``duplicate_bos`` says a second BOS was removed."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    duplicate_bos: bool


def tokenize_rendered(
    rendered: Sequence[RenderedPair],
    conversational: Sequence[bool],
    tokenizer: Any,
    spec: TokenizerSpec,
    columns: tuple[str, str],
    finished: Sequence[tuple[bool, bool]] | None = None,
) -> list[TokenizedText | RowProblem]:
    """Tokenize many rendered pairs in one batched call; a pair that breaks an EOS rule gives its RowProblem.

    ``finished``: per pair, whether (chosen, rejected) ended on their own (default: both did).
    """
    prompts = _encode(tokenizer, [r.prompt for r in rendered])
    chosen = _encode(tokenizer, [r.chosen for r in rendered])
    rejected = _encode(tokenizer, [r.rejected for r in rendered])
    out: list[TokenizedText | RowProblem] = []
    for i, conv in enumerate(conversational):
        try:
            prompt, duplicate = _prompt_ids(prompts[i], spec)
            ends = finished[i] if finished is not None else (True, True)
            out.append(
                TokenizedText(
                    prompt,
                    _completion_ids(chosen[i], spec, conv, columns[0], ends[0]),
                    _completion_ids(rejected[i], spec, conv, columns[1], ends[1]),
                    duplicate,
                )
            )
        except RowProblem as problem:
            out.append(problem)
    return out


@dataclass(frozen=True)
class Truncation:
    """Limits and mode, as in :class:`~epsdpo.data.config.DataConfig` (see the module docstring for the rules)."""

    max_length: int
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    mode: TruncationMode = "keep_end"


def _cut_prompt(ids: list[int], limit: int, mode: str, bos_id: int | None) -> list[int]:
    if mode == "keep_start":
        return ids[:limit]
    if bos_id is not None and ids[0] == bos_id:  # keep the BOS the model expects in front
        return [bos_id, *ids[len(ids) - limit + 1 :]] if limit > 1 else [bos_id]
    return ids[len(ids) - limit :]


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], limits: Truncation, bos_id: int | None = None
) -> tuple[list[int], list[int], list[int], list[str], str | None]:
    """Apply the truncation rules; returns (prompt, chosen, rejected, truncation reasons, drop reason or None).

    ``bos_id`` is the BOS to keep in front of a ``keep_end`` cut (pass it only when the tokenizer adds BOS).
    """
    if limits.mode not in get_args(TruncationMode):
        raise ValueError(f"truncation_mode must be one of {get_args(TruncationMode)}, got {limits.mode!r}")
    reasons: list[str] = []
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        prompt = _cut_prompt(prompt, limits.max_prompt_length, limits.mode, bos_id)
        reasons.append("prompt_truncated")
    room = limits.max_length - len(prompt)
    if limits.max_completion_length is not None:
        room = min(room, limits.max_completion_length)
    cut: list[list[int]] = []
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if len(ids) > room:
            ids = ids[: max(room, 0)]
            reasons.append(f"{name}_truncated")
        cut.append(ids)
    drop = None
    if not cut[0] or not cut[1]:
        drop = "empty_after_truncation"
    elif cut[0] == cut[1]:
        drop = "identical_after_truncation"
    return prompt, cut[0], cut[1], reasons, drop


def mark_boundary(pair: TokenizedPair, tokenizer: Any, which: str = "chosen", marker: str = "⟦|⟧") -> str:
    """The decoded prompt and one completion with ``marker`` where the completion starts (for reports)."""
    completion = pair.chosen_ids if which == "chosen" else pair.rejected_ids
    decode = tokenizer.decode
    return (
        decode(pair.prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        + marker
        + decode(completion, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    )
