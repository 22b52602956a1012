"""``epsdpo generate [CONFIG.yaml] [key=value …]``: sample k responses per prompt, score them, write best/worst pairs.

See :mod:`epsdpo.stages.generate` and docs/generate.md. Exit status: 0 done, 1 a data or model problem, 2 a bad config.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (omit to use defaults and overrides only)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any config key, e.g. prompts=my.jsonl num_samples=8 output=pairs.jsonl",
    )


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from epsdpo.cli import config_and_overrides, error_exit
    from epsdpo.config import ConfigError
    from epsdpo.errors import UserError
    from epsdpo.stages.generate import generate

    config, overrides = config_and_overrides(args.config, args.overrides)
    try:
        summary = generate(config, overrides)
    except ConfigError as err:
        return error_exit(args, "generate", err, 2)
    except (UserError, ValueError, OSError) as err:
        return error_exit(args, "generate", err, 1)
    print(summary.text())
    return 0
