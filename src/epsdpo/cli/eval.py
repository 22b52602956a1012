"""``epsdpo eval RUN_DIR_OR_CONFIG [key=value …]``: gold reward, KL, win rate and preference accuracy of a policy.

See :mod:`epsdpo.stages.evaluate` and docs/generate.md. Writes the evaluation under ``RUN_DIR/evals/NAME/`` (or
``output=``), makes it the run's headline ``RUN_DIR/eval.json``, redraws ``RUN_DIR/plots/reward_vs_kl.png`` and
prints a table. Exit status: 0 done, 1 a data or model problem, 2 a bad config or command line.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        metavar="RUN_DIR_OR_CONFIG",
        help="a run directory of `epsdpo train`, or an eval config YAML (omit: overrides only)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any eval key, e.g. num_prompts=128 eval_dataset=bundled output=eval.json",
    )


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from epsdpo.cli import config_and_overrides, error_exit
    from epsdpo.config import ConfigError
    from epsdpo.errors import UserError
    from epsdpo.eval_config import load_eval_config
    from epsdpo.recipes.train import publish_run_evaluation
    from epsdpo.rundir import headline_decision
    from epsdpo.runlock import run_dir_lock
    from epsdpo.stages.evaluate import evaluate, format_table

    source, overrides = config_and_overrides(args.source, args.overrides)  # `epsdpo eval model=… ref_model=…`
    try:
        cfg = load_eval_config(source, overrides)
        # the run's headline evaluation and its plot are rewritten: the run directory's lock, taken before sampling
        publish = cfg.run_dir is not None and cfg.output is None
        with run_dir_lock(cfg.run_dir, "run_dir") if publish else contextlib.nullcontext():
            result = evaluate(cfg)
            headline, why = False, ""
            if publish:
                run_dir = Path(str(cfg.run_dir))
                headline, why = headline_decision(run_dir, result["name"], cfg.checkpoint, cfg.headline)
                if headline:
                    publish_run_evaluation(run_dir, result)
    except ConfigError as err:
        return error_exit(args, "eval", err, 2)
    except (UserError, ValueError, OSError) as err:
        return error_exit(args, "eval", err, 1)
    print(format_table(result))
    print(f"written: {result['output']}")
    if publish and headline:
        print(f"the run's headline evaluation is now this one ({why}): {Path(str(cfg.run_dir)) / 'eval.json'}")
    elif publish:
        print(f"the run's headline evaluation (eval.json, its plot) is unchanged: {why}; headline=true replaces it")
    return 0
