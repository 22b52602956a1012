"""Writes configs/data/tiny_preferences.jsonl: a small synthetic preference set for smoke tests and configs/tiny.yaml.

    python scripts/make_tiny_data.py        # rewrites the file; byte-identical on every run

Each pair asks for a short remark about an everyday subject; the chosen response is upbeat, the rejected one glum,
so even a tiny random model has a learnable signal within a few dozen steps. Nothing here is meant to be realistic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    "the morning bus",
    "a new notebook",
    "the city park",
    "a rainy afternoon",
    "the office coffee",
    "a long walk",
    "the weekend market",
    "an old bicycle",
    "the school concert",
    "a quiet library",
    "the kitchen radio",
    "a train journey",
    "the garden in spring",
    "a board game night",
    "the local bakery",
    "a phone call from home",
]
ASKS = ["Say something about {}.", "Write one sentence about {}.", "Describe {} briefly.", "What do you think of {}?"]
GOOD = [
    "I really enjoyed {}; it made my day brighter.",
    "{} was lovely and I felt happy.",
    "What a pleasant surprise {} turned out to be!",
    "{} is wonderful, calm and cheerful.",
]
BAD = [
    "{} was dull and I felt tired.",
    "I did not like {}; it was a gloomy mess.",
    "{} turned out to be a disappointment.",
    "{} is boring, grey and sad.",
]


def main() -> None:
    rng = random.Random(0)
    rows = []
    for subject in SUBJECTS:
        for ask in ASKS:
            good, bad = rng.choice(GOOD), rng.choice(BAD)
            rows.append(
                {
                    "prompt": ask.format(subject),
                    "chosen": good.format(subject).capitalize(),
                    "rejected": bad.format(subject).capitalize(),
                    "score_chosen": 1.0,
                    "score_rejected": 0.0,
                }
            )
    rng.shuffle(rows)
    out = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_preferences.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {out}")


if __name__ == "__main__":
    main()
