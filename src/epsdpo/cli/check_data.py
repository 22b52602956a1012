"""``epsdpo check-data CONFIG_OR_FILE [key=value …]``: check and tokenize a dataset exactly as training would.

Prints the report (rows, kept, dropped and truncated by reason, token-length percentiles before truncation) and a
few pairs with the prompt/completion boundary marked. Exit status: 0 when the data is usable, 1 when it is not (the
error names the file, row and column), 2 for a bad config or command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_SUFFIXES = (".yaml", ".yml")
BOUNDARY = "⟦|⟧"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="CONFIG_OR_FILE",
        help="a YAML config (with dataset: and tokenizer: or model:) or directly a data file, directory or Hub id",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. max_length=512 on_invalid=skip tokenizer=PATH",
    )
    parser.add_argument("--examples", type=int, default=2, help="how many pairs to print with the boundary marked")
    parser.add_argument("--report-dir", type=Path, default=None, help="also write data_report.json here")


def _data_config(source: str, overrides: Sequence[str]) -> tuple[Any, str]:
    """The DataConfig and the tokenizer training would use: a run config is read whole (model section included)."""
    from epsdpo.training.config import load_run_config, tokenizer_name

    is_config = Path(source).suffix.lower() in CONFIG_SUFFIXES
    cfg = load_run_config(source if is_config else {"dataset": source}, list(overrides))
    return cfg.data, tokenizer_name(cfg)


def _print_examples(pairs: Sequence[Any], tokenizer: Any, count: int) -> None:
    from epsdpo.data import mark_boundary

    for pair in pairs[:count]:
        print(f"\n--- row {pair.index} (the completion starts at {BOUNDARY}) ---")
        for which in ("chosen", "rejected"):
            cut = " [truncated]" if getattr(pair, f"{which}_truncated") else ""
            print(
                f"[{which}: prompt {len(pair.prompt_ids)} + completion "
                f"{len(getattr(pair, f'{which}_ids'))} tokens{cut}]"
            )
            print(mark_boundary(pair, tokenizer, which, BOUNDARY))


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from epsdpo.config import ConfigError
    from epsdpo.data import DataError, load_preference_dataset
    from epsdpo.models import load_tokenizer

    try:
        data, tokenizer_name = _data_config(args.source, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(tokenizer_name)
    except (OSError, ValueError) as err:
        print(f"error: cannot load tokenizer {tokenizer_name!r}: {err}", file=sys.stderr)
        return 2
    try:
        pairs, report = load_preference_dataset(data, tokenizer, report_dir=args.report_dir, warn=False)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"tokenizer: {tokenizer_name}  max_length={data.max_length} max_prompt_length={data.max_prompt_length} "
        f"truncation_mode={data.truncation_mode} on_invalid={data.on_invalid}"
    )
    print(report.summary())
    _print_examples(pairs, tokenizer, args.examples)
    if args.report_dir is not None:
        print(f"\nreport written to {Path(args.report_dir) / 'data_report.json'}")
    return 0
