"""``epsdpo train CONFIG.yaml [key=value …]``: align a model with ε-DPO or a baseline (see docs/training.md)."""

from __future__ import annotations

import argparse
import logging
import shlex

#: every ``loss_type``, one line each (kept here as text: ``epsdpo --help`` imports no torch; a test checks it against
#: epsdpo.losses.LossType)
METHODS = """\
methods (loss_type=…; formulas, papers and defaults: docs/methods/):
  epsilon_dpo  ε-DPO (default): DPO with a per-pair β/(1+ε s), s from a perturbation test (arXiv 2502.13177)
  dpo          DPO: −log σ(β h), h the margin of policy/reference log-ratios (arXiv 2305.18290)
  cdpo         conservative DPO: DPO with label_smoothing, the assumed share of flipped labels
  ipo          IPO: (h/|y| − 1/(2β))², on length-normalised log-ratios (arXiv 2310.12036)
  hinge        hinge: max(0, 1 − β h) on the DPO margin (SLiC/RSO form, with a reference)
  beta_dpo     β-DPO: β per batch from its margins, with margin-based filtering (arXiv 2407.08639)
  rdpo         R-DPO: −log σ(β h + α(|y_w| − |y_l|)), DPO regularised against length (arXiv 2403.19159)
  kto          KTO on pairs: each response against z₀ from mismatched pairs (arXiv 2402.01306)
  simpo        SimPO, no reference: −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ) (arXiv 2405.14734)
  orpo         ORPO, no reference: NLL(y_w) + λ · −log σ(log odds ratio) (arXiv 2403.07691)
  cpo          CPO, no reference: −log σ(β log π(y_w) − β log π(y_l)) + α NLL(y_w) (arXiv 2401.08417)
  slic         SLiC-HF, no reference: max(0, δ − log π(y_w) + log π(y_l)) + λ NLL(y_w) (arXiv 2305.10425)
  rrhf         RRHF, no reference: max(0, log π(y_l)/|y_l| − log π(y_w)/|y_w|) + λ NLL(y_w) (arXiv 2304.05302)
with any loss: rpo_alpha=α adds α NLL(y_w) to a reference-based loss (RPO, arXiv 2404.19733);
  sync_ref_model=true moves the reference toward the policy (TR-DPO, arXiv 2404.09656)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = METHODS
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
        status = error_exit(args, "train", err, 2)  # with --debug it raises the error itself, traceback and all
        print(f"  to resume it: {command}")
        return status
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
    if result.pushed is not None:
        print(f"  on the Hub:    {result.pushed.url} ({len(result.pushed.files)} files)")
    elif result.interrupted and cfg.train.push_to_hub:
        print(f"  not pushed to the Hub (unfinished); when it is done: epsdpo push {result.output_dir}")
    return 130 if result.interrupted else 0
