"""Bridges from other training frameworks to epsdpo's ε-DPO mathematics.

- :mod:`epsdpo.integrations.trl`: ``EpsilonDPOConfig`` and ``EpsilonDPOTrainer``, a drop-in for TRL's ``DPOConfig`` /
  ``DPOTrainer`` (``pip install "epsdpo[trl]"``; see ``docs/trl.md``).

Importing this package imports no framework; each integration module checks its framework's version when imported.
"""
