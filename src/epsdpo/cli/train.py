"""``epsdpo train CONFIG.yaml [key=value …]``: align a model with ε-DPO or a baseline (see docs/training.md)."""

from __future__ import annotations

import argparse
import logging
import shlex


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", help="YAML config; omitted: the bundled default (SmolLM2-135M-Instruct, ε-DPO, sentiment)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any config key, e.g. max_steps=50 output_dir=runs/x beta=0.05",
    )


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from epsdpo.cli import config_and_overrides, error_exit
    from epsdpo.errors import UserError
    from epsdpo.recipes.train import UnfinishedRunError, train
    from epsdpo.training import load_run_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, overrides = config_and_overrides(args.config, args.overrides)
    if config is None:
        from epsdpo.assets import bundled_config

        config = bundled_config("default")
        print(f"epsdpo train: no config given, running the bundled default {config}")
    try:
        cfg = load_run_config(config, overrides)
        result = train(cfg)
    except UnfinishedRunError as err:
        given = [args.config] if args.config is not None else []
        command = shlex.join(["epsdpo", "train", *given, *args.overrides, "resume_from_checkpoint=auto"])
        return error_exit(args, "train", UnfinishedRunError(f"{err}\n  to resume it: {command}"), 2)
    except (UserError, OSError) as err:  # a config, data, run directory, model path or disk problem
        return error_exit(args, "train", err, 2)
    state = "interrupted; checkpoint saved" if result.interrupted else "done"
    if result.already_finished:
        state = "already done (nothing left to train; the run is left as it is)"
    print(f"epsdpo train: {state} after {result.global_step} steps, β after training = {result.beta:.6g}")
    print(f"  run directory: {result.output_dir} (config.yaml, metrics.jsonl, checkpoints)")
    if result.final_model_dir is not None:
        print(f"  model:         {result.final_model_dir}")
    if result.eval_metrics is not None:
        print(f"  evaluation:    {result.eval_metrics.get('output')} (copied to {result.output_dir / 'eval.json'})")
    for plot in result.plots:
        print(f"  plot:          {plot}")
    return 130 if result.interrupted else 0
