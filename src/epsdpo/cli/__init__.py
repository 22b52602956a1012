"""The ``epsdpo`` command line: one verb per stage of the pipeline.

Each verb lives in its own module and is registered in ``VERBS`` as ``name: (module, help)``; the module provides
``add_arguments(parser)`` and ``run(args) -> int``. A verb module keeps its heavy imports (transformers, datasets)
inside ``run``, so ``epsdpo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from epsdpo import __version__

#: verb -> (module implementing it, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "check-data": ("epsdpo.cli.check_data", "check and tokenize preference data"),
    "generate": ("epsdpo.cli.generate", "sample responses, score them with a gold reward, write preference pairs"),
    "train": ("epsdpo.cli.train", "align a model with ε-DPO or a baseline"),
    "select": ("epsdpo.cli.select", "keep the pairs with the highest alignment potential"),
    "iterate": ("epsdpo.cli.iterate", "rounds of on-policy generation, selection, training and evaluation"),
    "eval": ("epsdpo.cli.eval", "gold reward, KL, win rate and preference accuracy of a trained model"),
    "plot": ("epsdpo.cli.plot", "training curves, β trajectory and the reward-vs-KL frontier as PNGs"),
}


def config_and_overrides(source: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(config, overrides)`` for verbs whose config is optional: a first positional with ``=`` is an override
    (``epsdpo train max_steps=5``), not a config path."""
    rest = list(overrides)
    if source is not None and "=" in source:
        return None, [source, *rest]
    return source, rest


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``verb``'s module is imported (to add its arguments), so one verb never breaks another."""
    parser = argparse.ArgumentParser(
        prog="epsdpo",
        description="ε-DPO: preference alignment with a per-pair adaptive KL penalty.",
    )
    parser.add_argument("--version", action="version", version=f"epsdpo {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module)
        if name == verb:
            importlib.import_module(module).add_arguments(verb_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)
