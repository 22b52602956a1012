"""Gold reward functions: score a batch of (prompt, response) pairs, one float per pair.

Three kinds sit behind one :class:`Reward` protocol, chosen by :func:`load_reward`:

- ``"sentiment"``: the VADER compound score of the response (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based
  Model for Sentiment Analysis of Social Media Text", ICWSM). It plays the part of the sentiment classifier that served
  as gold reward in the IMDb experiment of the DPO paper (Rafailov et al. 2023, arXiv 2305.18290, §6.1), but needs no
  model download and is deterministic. The compound score normalises the summed valence x of the text's words to
  x / sqrt(x² + 15), so it lies in [−1, 1];
- a Hugging Face sequence-classification reward model, by Hub id or local path (:class:`HFRewardModel`);
- a Python function given as ``"module:function"``, imported and checked (:class:`CallableReward`): its signature
  when it is loaded, its output on every call. The spec is a name, not an expression, but importing the module runs
  its code: give only a module you trust.

Rewards are batched because the callers (``epsdpo generate`` scoring k samples per prompt, ``epsdpo eval`` scoring
held-out samples) always have many responses at hand, and a reward model is only fast on batches.
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from epsdpo.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["CallableReward", "HFRewardModel", "Reward", "RewardHookError", "SentimentReward", "load_reward"]


@runtime_checkable
class Reward(Protocol):
    """A gold reward: ``reward(prompts, responses)[i]`` scores ``responses[i]`` as an answer to ``prompts[i]``."""

    #: a short label for logs, metrics and file headers (the spec it was loaded from)
    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


def _check_batch(name: str, prompts: Sequence[str], responses: Sequence[str]) -> None:
    """Reject a batch whose prompts and responses do not pair up one to one."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"reward {name!r}: got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response "
            "(repeat a prompt for each of its sampled responses)."
        )


class SentimentReward:
    """VADER compound sentiment of the response, in [−1, 1]; the prompt is ignored.

    The prompt is ignored on purpose: the goal is a model whose *responses* read more positively, whatever it was asked.
    Scoring prompt and response together would let the prompt's own wording shift every response's reward alike and
    blur the comparison between responses to the same prompt.
    """

    name = "sentiment"

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:  # pragma: no cover - vaderSentiment is a declared dependency
            raise ImportError(
                "the 'sentiment' reward needs the vaderSentiment package; install it with `pip install vaderSentiment`."
            ) from err
        # Reading the lexicon takes a moment, so the analyzer is built once and reused for every batch.
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_batch(self.name, prompts, responses)
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in responses]


class CallableReward:
    """A user function ``fn(prompts, responses) -> sequence of floats``, its output checked on every call.

    Loaded from a ``"module:function"`` spec (the entry-point syntax; ``"module:object.attribute"`` also works) with
    :func:`importlib.import_module`: the spec is a name, not an expression, but the import runs the module's code (give
    only modules you trust). Each call checks that the function returned one finite number per response and names the
    first offending prompt index otherwise.
    """

    def __init__(self, fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]], name: str) -> None:
        if not callable(fn):
            raise TypeError(f"reward {name!r}: {type(fn).__name__} object is not callable.")
        self.fn = fn
        self.name = name

    @classmethod
    def from_spec(cls, spec: str) -> CallableReward:
        """Import the function that ``spec`` (``"module:function"``) names."""
        module_name, _, attr_path = spec.partition(":")
        if not _is_dotted_name(module_name) or not _is_dotted_name(attr_path):
            raise _HookSpecError(
                f"reward hook {spec!r} is not of the form 'module:function' (e.g. 'my_rewards:length_penalty'); both "
                "parts must be Python names, dots allowed."
            )
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
                raise _HookModuleNotFound(
                    f"reward hook {spec!r}: module {module_name!r} not found; make it importable (install it, or add "
                    "the folder that holds it to PYTHONPATH).",
                    name=err.name,
                ) from err
            raise _HookImportError(f"reward hook {spec!r}: importing module {module_name!r} failed: {err}") from err
        obj: Any = module
        for depth, part in enumerate(attr_path.split(".")):
            if not hasattr(obj, part):
                owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attr_path.split('.')[:depth])}"
                close = get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise _HookAttributeError(
                    f"reward hook {spec!r}: {owner!r} (file {getattr(module, '__file__', None)}) has no attribute "
                    f"{part!r}.{hint}"
                )
            obj = getattr(obj, part)
        if not callable(obj):
            raise RewardHookError(
                f"reward hook {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function; point the spec at a "
                "callable taking (prompts, responses) and returning one float per response."
            )
        _check_signature(spec, obj)
        return cls(obj, name=spec)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_batch(self.name, prompts, responses)
        return _validated_scores(self.name, self.fn(prompts, responses), len(responses))


class RewardHookError(UserError, TypeError):
    """A ``module:function`` reward hook that is not a function of ``(prompts, responses)``."""


class _HookSpecError(UserError, ValueError):
    pass


class _HookModuleNotFound(UserError, ModuleNotFoundError):
    pass


class _HookImportError(UserError, ImportError):
    pass


class _HookAttributeError(UserError, AttributeError):
    pass


def _check_signature(spec: str, fn: Callable[..., Any]) -> None:
    """Refuse, when it is loaded, a hook that cannot be called as ``fn(prompts, responses)`` (rather than after the
    minutes of sampling that come before the first call)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C extensions have none to read: checked when called
        return
    try:
        signature.bind(["prompt"], ["response"])
    except TypeError as err:
        raise RewardHookError(
            f"reward hook {spec!r} has the signature {signature}, which cannot be called as fn(prompts, responses) "
            f"({err}); it must take two positional arguments, the prompts and the responses (lists of strings), and "
            "return one float per response."
        ) from None


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _validated_scores(name: str, scores: Any, expected: int) -> list[float]:
    """``scores`` as a list of ``expected`` finite floats, or an error naming the first bad prompt index."""
    if isinstance(scores, (str, bytes)) or not hasattr(scores, "__len__"):
        raise TypeError(
            f"reward {name!r} returned a {type(scores).__name__}; it must return a sequence with one float per "
            f"response ({expected} here)."
        )
    if len(scores) != expected:
        raise ValueError(
            f"reward {name!r} returned {len(scores)} scores for {expected} responses; return exactly one per response."
        )
    out: list[float] = []
    for i, score in enumerate(scores):
        try:
            value = float(score)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"reward {name!r} returned {score!r} ({type(score).__name__}) for prompt index {i}; scores must be "
                "numbers."
            ) from err
        if not math.isfinite(value):
            raise ValueError(f"reward {name!r} returned {value} for prompt index {i}; scores must be finite numbers.")
        out.append(value)
    return out


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFRewardModel:
    """A Hugging Face ``AutoModelForSequenceClassification`` reward model, by Hub id or local path.

    Input: if the tokenizer has a chat template, each pair is rendered as a two-turn conversation
    ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]`` (how reward models trained on
    chat data, such as Skywork-Reward, expect it), tokenized without adding special tokens again; otherwise it is
    encoded as a text pair ``tokenizer(prompt, response)`` (how classic cross-encoder reward models such as
    OpenAssistant's DeBERTa expect it). Inputs longer than ``max_length`` tokens are truncated on the tokenizer's
    ``truncation_side``; their number is kept in :attr:`truncated` and a warning says so.

    Output: a model with one label gives its logit, r = z₀; a model with two labels is read as a (bad, good) classifier
    and gives the log-odds r = z₁ − z₀ = log p(good) − log p(bad). Other label counts are rejected at load time.

    Scoring runs in evaluation mode under :func:`torch.inference_mode`, ``batch_size`` pairs at a time; the logits are
    read in float32 whatever ``dtype`` the model runs in.
    ``trust_remote_code`` stays False unless the caller passes True, because it runs code shipped with the model.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        batch_size: int = 16,
        max_length: int = 1024,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"reward model {name_or_path!r}: batch_size and max_length must be ≥ 1.")
        self.name = name_or_path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device if device is not None else _default_device()
        #: how many (prompt, response) pairs were cut to max_length so far
        self.truncated = 0
        model_kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, **model_kwargs
            )
        except (OSError, ValueError) as err:
            raise OSError(
                f"reward {name_or_path!r} is neither 'sentiment' nor a 'module:function' hook, so it was loaded as a "
                f"Hugging Face reward model, which failed: {err}\nPass 'sentiment', a 'module:function' hook, a local "
                "folder with a sequence-classification checkpoint, or a Hub id that is cached (or reachable online)."
            ) from err
        num_labels = self.model.config.num_labels
        if num_labels not in (1, 2):
            raise ValueError(
                f"reward model {name_or_path!r} has {num_labels} labels; only 1 (the logit is the reward) or 2 (the "
                "reward is logit[1] − logit[0]) are supported. Wrap other models in a 'module:function' hook."
            )
        self.model.eval().to(self.device)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        # Models that pool the last token find it by the pad id, so model and tokenizer must agree on it. Without any
        # pad token there is no way to pad, and pairs are scored one at a time.
        text_config = self.model.config.get_text_config()
        if self.tokenizer.pad_token_id is None and text_config.pad_token_id is not None:
            self.tokenizer.pad_token_id = text_config.pad_token_id
        if self.tokenizer.pad_token_id is not None:
            text_config.pad_token_id = self.tokenizer.pad_token_id
        elif self.batch_size > 1:
            warnings.warn(
                f"reward model {name_or_path!r} defines no pad token; scoring one pair at a time.", stacklevel=2
            )
            self.batch_size = 1

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        _check_batch(self.name, prompts, responses)
        scores: list[float] = []
        truncated = 0
        with torch.inference_mode():
            for start in range(0, len(responses), self.batch_size):
                rows = slice(start, start + self.batch_size)
                batch, cut = _encode(self.tokenizer, prompts[rows], responses[rows], self.chat, self.max_length)
                truncated += cut
                logits = self.model(**batch.to(self.device)).logits.float()  # (B, num_labels)
                scores.extend(_logits_to_rewards(logits).tolist())
        if truncated:
            self.truncated += truncated
            warnings.warn(
                f"reward model {self.name!r}: {truncated} of {len(responses)} inputs were longer than max_length="
                f"{self.max_length} tokens and were truncated before scoring.",
                stacklevel=2,
            )
        return _validated_scores(self.name, scores, len(responses))


def _logits_to_rewards(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) → z₀; (B, 2) → z₁ − z₀ (the log-odds of label 1)."""
    return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]


def _encode(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], chat: bool, max_length: int
) -> tuple[Any, int]:
    """Tokenize a batch of pairs (as a chat or as text pairs); also count the inputs that max_length truncates."""
    pad = tokenizer.pad_token_id is not None
    if chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        # The template already wrote the special tokens (BOS, turn markers); adding them again would double BOS.
        args: tuple[Any, ...] = (texts,)
        kwargs: dict[str, Any] = {"add_special_tokens": False}
    else:
        args, kwargs = (list(prompts), list(responses)), {}
    lengths = [len(ids) for ids in tokenizer(*args, **kwargs)["input_ids"]]
    batch = tokenizer(*args, **kwargs, padding=pad, truncation=True, max_length=max_length, return_tensors="pt")
    return batch, sum(n > max_length for n in lengths)


def load_reward(spec: str, **options: Any) -> Reward:
    """The reward that ``spec`` names; ``options`` go to the Hugging Face reward model only.

    - ``"sentiment"``: :class:`SentimentReward` (VADER compound of the response);
    - ``"module:function"`` (contains ``:`` and is not an existing path): :class:`CallableReward`;
    - anything else: a Hub id or local folder, loaded as :class:`HFRewardModel` with ``options`` (``batch_size``,
      ``max_length``, ``device``, ``dtype``, ``trust_remote_code``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}; try 'sentiment'.")
    spec = spec.strip()
    if spec == "sentiment" or (":" in spec and not Path(spec).exists()):
        if options:
            raise TypeError(
                f"reward {spec!r} takes no options, got {sorted(options)}; options apply to Hugging Face reward "
                "models only."
            )
        return SentimentReward() if spec == "sentiment" else CallableReward.from_spec(spec)
    return HFRewardModel(spec, **options)
