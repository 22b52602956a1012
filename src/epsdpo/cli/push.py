"""``epsdpo push RUN_DIR [hub_model_id=OWNER/NAME] [hub_private_repo=true]``: upload a finished run to the Hub.

The same upload as ``push_to_hub=true`` at the end of ``epsdpo train`` (see :mod:`epsdpo.recipes.hub`): the final
model (adapter, or merged model with ``save_merged_model``), tokenizer, model card with the evaluation's figures,
``eval.json`` and the plots. ``hub_model_id`` and ``hub_private_repo`` default to the run's own config. Exit status:
0 pushed, 1 an unfinished run, no token or a failed upload, 2 a bad command line.
"""

from __future__ import annotations

import argparse

#: the settings this verb takes as key=value (any other is refused: the run's own settings are what they were)
PUSH_KEYS = ("hub_model_id", "hub_private_repo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory of `epsdpo train` (with final/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="hub_model_id=OWNER/NAME (default: the run's), hub_private_repo=true|false (default: the run's)",
    )


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from pathlib import Path

    from epsdpo.cli import error_exit
    from epsdpo.config import ConfigError, parse_override
    from epsdpo.errors import UserError
    from epsdpo.recipes.hub import check_can_push, push_run
    from epsdpo.runlock import run_dir_lock
    from epsdpo.training.config import load_run_config

    run_dir = Path(args.run_dir)
    try:
        for text in args.overrides:
            key = parse_override(text)[0]
            if key not in PUSH_KEYS:
                raise ConfigError(f"epsdpo push takes only {', '.join(PUSH_KEYS)} as key=value, not {key!r}")
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir / 'config.yaml'} not found: give the run directory of `epsdpo train`")
        cfg = load_run_config(run_dir / "config.yaml", args.overrides)
        if cfg.train.hub_model_id is None:
            raise ConfigError("no Hub repository: give hub_model_id=OWNER/NAME (or NAME, under your own account)")
    except ConfigError as err:
        return error_exit(args, "push", err, 2)
    try:
        token = check_can_push()
        with run_dir_lock(run_dir, "run_dir"):  # no training or evaluation changes the run while it is uploaded
            result = push_run(run_dir, cfg, token)
    except (UserError, OSError) as err:
        return error_exit(args, "push", err, 1)
    print(f"epsdpo push: {run_dir} → {result.url} ({result.kind}, {len(result.files)} files)")
    for name in result.files:
        print(f"  {name}")
    return 0
