"""Building the trainable policy and its frozen reference from a :class:`ModelConfig`.

Three reference arrangements:

- full fine-tuning: a frozen deep copy of the initial policy (or ``ref_model`` when given);
- LoRA (peft): the *same* model with its adapters disabled, so no second copy of the weights is held;
- ``ref_model``: another checkpoint, loaded frozen.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from epsdpo.models import initial_model, load_causal_lm, quiet_peft_wrapping
from epsdpo.training.config import ModelConfig

logger = logging.getLogger(__name__)


def apply_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``model`` wrapped with the LoRA adapters ``cfg`` asks for (peft), as training wraps the policy."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    with quiet_peft_wrapping():
        return get_peft_model(model, lora)


@dataclass
class PolicyAndReference:
    """The trainable policy and a way to run the reference.

    ``reference`` is a separate frozen module, or None when the reference is the policy with its LoRA adapters
    disabled (use :meth:`reference_mode`).
    """

    policy: nn.Module
    reference: nn.Module | None
    uses_lora: bool

    @contextlib.contextmanager
    def reference_mode(self, unwrapped_policy: nn.Module) -> Iterator[nn.Module]:
        """Yields the module to run as the reference: the frozen copy, or the policy with adapters disabled."""
        if self.reference is not None:
            yield self.reference
            return
        with unwrapped_policy.disable_adapter():
            yield unwrapped_policy


def build_policy_and_reference(
    cfg: ModelConfig, vocab_size: int, seed: int, with_reference: bool = True
) -> PolicyAndReference:
    """Load or build the policy, enable LoRA / gradient checkpointing, and set up the reference.

    ``with_reference`` False (the reference-free losses): no reference is loaded or copied (``reference`` is None
    and must not be run)."""
    policy = initial_model(cfg.model, cfg.model_config, vocab_size, seed, cfg.trust_remote_code)
    reference: nn.Module | None = None
    if with_reference and cfg.ref_model is not None:
        reference = load_causal_lm(cfg.ref_model, cfg.trust_remote_code)
    elif with_reference and not cfg.use_lora:
        reference = copy.deepcopy(policy)
    if reference is not None:
        reference.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (deprecated, removed in v6)
        if hasattr(policy, "activation_checkpointing_enable"):
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    if cfg.use_lora:
        if cfg.gradient_checkpointing:
            policy.enable_input_require_grads()
        policy = apply_lora(policy, cfg)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    logger.info("policy: %s trainable of %s parameters", f"{trainable:,}", f"{total:,}")
    return PolicyAndReference(policy, reference, cfg.use_lora)
