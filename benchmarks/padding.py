"""How much of a batch is padding on the bundled pairs, with random batches and with ``group_by_length``.

    .venv/bin/python benchmarks/padding.py                 # bundled:sentiment_pairs, the default config's lengths
    .venv/bin/python benchmarks/padding.py --dataset PATH --max-length 512 --batch-sizes 2,4,8

A batch of B pairs is 2B rows padded to its longest row (``epsdpo.data.PreferenceCollator``); the transformer body
computes every position, padding included, so the padding share is the share of body compute spent on nothing.
(The log-prob head touches completion tokens only, so padding costs it nothing.) Averaged over 5 epochs' shuffles.
"""

from __future__ import annotations

import argparse

from epsdpo.data import DataConfig, batch_indices, load_preference_dataset
from epsdpo.models import load_tokenizer


def padding_share(rows: list[tuple[int, int]], batches: list[list[int]]) -> float:
    """Padding positions / all positions over ``batches`` of pairs whose two rows have lengths ``rows[i]``."""
    real = padded = 0
    for batch in batches:
        lengths = [n for i in batch for n in rows[i]]
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
    return 1.0 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="bundled:sentiment_pairs")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--max-prompt-length", type=int, default=96)
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="pairs per batch, comma-separated")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    config = DataConfig(dataset=args.dataset, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    pairs, _ = load_preference_dataset(config, tokenizer, warn=False)
    rows = [(len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids)) for p in pairs]
    lengths = [max(r) for r in rows]
    print(f"{args.dataset}: {len(pairs)} pairs, rows of {min(min(r) for r in rows)}-{max(lengths)} tokens")
    print(f"{'pairs/batch':>11} {'random batches':>15} {'group_by_length':>16}")
    for size in (int(x) for x in args.batch_sizes.split(",")):
        shares = []
        for grouped in (False, True):
            runs = [
                padding_share(rows, batch_indices(lengths, size, group_by_length=grouped, seed=epoch))
                for epoch in range(5)
            ]
            shares.append(sum(runs) / len(runs))
        print(f"{size:>11} {100 * shares[0]:>14.1f}% {100 * shares[1]:>15.1f}%")


if __name__ == "__main__":
    main()
