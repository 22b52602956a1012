"""``epsdpo iterate CONFIG.yaml [key=value …]``: rounds of on-policy generation, selection, training and evaluation
(see :mod:`epsdpo.recipes.iterate` and docs/iterate.md). Rerun the same command to continue a killed run."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        help="YAML config (training keys plus an `iterate` section); omitted: the bundled iterate config "
        "(SmolLM2-135M-Instruct, ε-DPO, 3 rounds, sentiment)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any key, e.g. rounds=2 selection=random output_dir=runs/iterate-random",
    )


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from epsdpo.cli import config_and_overrides, error_exit
    from epsdpo.errors import UserError
    from epsdpo.recipes.iterate import iterate

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, overrides = config_and_overrides(args.config, args.overrides)
    if config is None:
        from epsdpo.assets import bundled_config

        config = bundled_config("iterate")
        print(f"epsdpo iterate: no config given, running the bundled {config}")
    try:
        result = iterate(config, overrides)
    except (UserError, OSError, ValueError) as err:
        return error_exit(args, "iterate", err, 2)
    done = len([r for r in result.summary["rounds"] if "train" in r])
    state = "interrupted (rerun the same command to continue)" if result.interrupted else "done"
    print(f"epsdpo iterate: {state}; {done} round(s) trained in {result.output_dir}")
    print(f"  summary: {result.output_dir / 'summary.json'} and summary.md")
    if result.plot is not None:
        print(f"  plot:    {result.plot}")
    print((result.output_dir / "summary.md").read_text(encoding="utf-8"))
    return 130 if result.interrupted else 0
