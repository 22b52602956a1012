"""The ``epsdpo`` command line: one verb per stage of the pipeline.

Each verb lives in its own module and is registered in ``VERBS`` as ``name: (module, help)``; the module provides
``add_arguments(parser)`` and ``run(args) -> int``. A verb module keeps its heavy imports (transformers, datasets)
inside ``run``, so ``epsdpo --help`` stays fast.

Failures the user can act on (:class:`epsdpo.errors.UserError`: a bad config, bad data, a run directory in use, a
full disk, …) and file-system errors (``OSError``) end in one line, ``epsdpo VERB: error: …``, and a non-zero exit
status; ``--debug`` (before or after the verb) shows their traceback instead. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence

from epsdpo import __version__
from epsdpo.errors import UserError

#: verb -> (module implementing it, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "check-data": ("epsdpo.cli.check_data", "check and tokenize preference data"),
    "generate": ("epsdpo.cli.generate", "sample responses, score them with a gold reward, write preference pairs"),
    "train": ("epsdpo.cli.train", "align a model with ε-DPO or a baseline"),
    "select": ("epsdpo.cli.select", "keep the pairs with the highest alignment potential"),
    "iterate": ("epsdpo.cli.iterate", "rounds of on-policy generation, selection, training and evaluation"),
    "eval": ("epsdpo.cli.eval", "gold reward, KL, win rate and preference accuracy of a trained model"),
    "plot": ("epsdpo.cli.plot", "training curves, β trajectory and the reward-vs-KL frontier as PNGs"),
    "push": ("epsdpo.cli.push", "upload a finished run's model, card, evaluation and plots to the Hugging Face Hub"),
}


def config_and_overrides(source: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(config, overrides)`` for verbs whose config is optional: a first positional with ``=`` is an override
    (``epsdpo train max_steps=5``), not a config path."""
    rest = list(overrides)
    if source is not None and "=" in source:
        return None, [source, *rest]
    return source, rest


def describe_error(err: BaseException) -> str:
    """One line for a user-facing error; an ``OSError`` names its file and, for a full disk, says so."""
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full{where} ({err.strerror}); free some space and run again"
        return f"{err.strerror}{where}"
    return str(err)


def error_exit(args: argparse.Namespace, verb: str, err: BaseException, status: int) -> int:
    """Print ``err`` as ``epsdpo VERB: error: …`` and return ``status``; with ``--debug``, raise it instead."""
    if getattr(args, "debug", False):
        raise err
    print(f"epsdpo {verb}: error: {describe_error(err)}")
    return status


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``verb``'s module is imported (to add its arguments), so one verb never breaks another."""
    parser = argparse.ArgumentParser(
        prog="epsdpo",
        description="ε-DPO: preference alignment with a per-pair adaptive KL penalty.",
    )
    parser.add_argument("--version", action="version", version=f"epsdpo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module)
        verb_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UserError, OSError) as err:  # what a verb did not handle itself
        return error_exit(args, args.verb, err, 1)
