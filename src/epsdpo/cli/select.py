"""``epsdpo select CONFIG_OR_FILE [key=value …]``: keep the pairs with the highest alignment potential."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epsdpo.stages.select import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run config (YAML) or a data file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, e.g. select_ratio=0.3 model=PATH select_reward=sentiment",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="selection method (default: the config's `selection`, else alignment_potential)",
    )
    parser.add_argument("--out", default=None, help="output directory (default: selection/ beside the data file)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass for implicit margins")


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from epsdpo.cli.check_data import CONFIG_SUFFIXES
    from epsdpo.config import ConfigError
    from epsdpo.data import DataError, load_preference_dataset
    from epsdpo.data.loading import load_rows
    from epsdpo.models import initial_model, initial_policy_identity, load_tokenizer
    from epsdpo.stages.select import select_for_config
    from epsdpo.training.config import load_run_config, tokenizer_name

    is_config = Path(args.source).suffix.lower() in CONFIG_SUFFIXES
    try:
        cfg = load_run_config(args.source if is_config else {"dataset": args.source}, list(args.overrides))
        tokenizer = load_tokenizer(tokenizer_name(cfg), cfg.models.trust_remote_code)
        pairs, report = load_preference_dataset(cfg.data, tokenizer, warn=False)
    except (ConfigError, DataError, OSError, ValueError) as err:
        print(f"epsdpo select: error: {err}", file=sys.stderr)
        return 2
    method = args.method or (cfg.data.selection if cfg.data.selection != "none" else "alignment_potential")
    m = cfg.models
    initial = None  # the initial policy π₀ (SPEC §3): the model training would start from, never a ref_model
    if method in ("alignment_potential", "implicit"):
        initial = initial_model(m.model, m.model_config, len(tokenizer), cfg.train.seed, m.trust_remote_code)
    model_id = initial_policy_identity(m, cfg.train.seed)
    data_path = Path(str(cfg.data.dataset))
    out = Path(args.out) if args.out else (data_path.parent if data_path.exists() else Path(".")) / "selection"
    raw = load_rows(cfg.data.dataset, dataset_config=cfg.data.dataset_config, split=cfg.data.split)
    try:
        selection = select_for_config(
            cfg.data,
            pairs,
            tokenizer,
            initial,
            model_id,
            seed=cfg.train.seed,
            out_dir=out,
            raw_rows=raw.rows,
            method=method,
            batch_size=args.batch_size,
        )
    except ValueError as err:
        print(f"epsdpo select: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{report.source}: {report.kept} usable pairs; {method} kept {len(selection.kept)} "
        f"(select_ratio {cfg.data.select_ratio:g})"
    )
    for name in ("selected.jsonl", "selection_scores.jsonl", "selection_histogram.png"):
        print(f"  wrote {out / name}")
    return 0
