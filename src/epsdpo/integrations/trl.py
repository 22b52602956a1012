"""ε-DPO on TRL: ``EpsilonDPOConfig`` and ``EpsilonDPOTrainer``, drop-ins for TRL's ``DPOConfig`` and ``DPOTrainer``.

    from epsdpo.integrations.trl import EpsilonDPOConfig, EpsilonDPOTrainer

    args = EpsilonDPOConfig(output_dir="out", beta=0.1, epsilon=0.01)       # DPOConfig's fields plus epsilon
    trainer = EpsilonDPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()                                                          # β moves once per optimizer step

Importing this module checks the installed TRL against the supported range (:mod:`epsdpo.integrations.trl_version`)
and raises ImportError with the install command (``pip install "epsdpo[trl]"``) outside it. See ``docs/trl.md``.
"""

from epsdpo.integrations.trl_version import NEWEST_TESTED, SUPPORTED, check_trl_version, require_trl

TRL_VERSION = require_trl()

from epsdpo.integrations.trl_config import EpsilonDPOConfig, unsupported_options  # noqa: E402
from epsdpo.integrations.trl_trainer import METRIC_KEYS, EpsilonDPOCallback, EpsilonDPOTrainer  # noqa: E402

__all__ = [
    "METRIC_KEYS",
    "NEWEST_TESTED",
    "SUPPORTED",
    "TRL_VERSION",
    "EpsilonDPOCallback",
    "EpsilonDPOConfig",
    "EpsilonDPOTrainer",
    "check_trl_version",
    "unsupported_options",
]
