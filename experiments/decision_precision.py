"""Which pairs ε-DPO moves under each decision precision, on the real offline SmolLM2.

The measurement behind the "decision precision" statements in docs/epsilon_dpo.md and the README:

1. train SmolLM2-135M-Instruct with DPO, full fine-tuning (no LoRA), ``--steps`` steps of 8 bundled pairs at
   ``--lr`` (so that policy and reference differ as after a little training);
2. on ``--pairs`` held-out bundled pairs the training never saw, compute ε-DPO's decisions s ∈ {+1, 0, −1} against
   the initial model as reference, for each ε, in three regimes: ``float32`` (exact; float32 forward),
   ``bfloat16`` (float32 mixtures rounded once to bf16) and ``published`` (the published trainer's order of bf16
   operations), the last two from a bf16-autocast forward (bf16 logits, as the published runs' bf16 model);
3. print the counts and write them, with the machine, to ``--out`` (JSON).

    python experiments/decision_precision.py                  # ~5 min on 2 CPU cores
    python experiments/decision_precision.py --steps 10 --lr 5e-5 --pairs 32 --out docs/results/decision_precision.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from epsdpo.assets import bundled_config
from epsdpo.data import PreferenceCollator, load_eval_dataset
from epsdpo.logps.heads import policy_logps, reference_side
from epsdpo.machine import machine_label
from epsdpo.models import load_causal_lm, load_tokenizer
from epsdpo.recipes.train import train
from epsdpo.training import load_run_config
from epsdpo.training.config import LossConfig
from epsdpo.training.pair_loss import compute_pair_losses

REGIMES = ("float32", "bfloat16", "published")


def decisions(policy, reference, pairs, collate, epsilon: float, precision: str, batch: int = 8) -> list[int]:
    """Counts of s = +1, 0, −1 over ``pairs`` in one regime."""
    cfg = LossConfig(loss_type="epsilon_dpo", epsilon=epsilon, decision_precision=precision)
    spec = cfg.decision_spec()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32")
    counts = [0, 0, 0]
    with torch.no_grad(), autocast:
        for start in range(0, len(pairs), batch):
            data = collate(pairs[start : start + batch])
            ids, attention = data["input_ids"], data["attention_mask"]
            labels, mask = ids[:, 1:], data["completion_mask"][:, 1:]
            ref = reference_side(reference, ids, attention, fused=True)
            logps = policy_logps(policy, ids, attention, ref, labels, mask, spec, fused=True)
            steps = compute_pair_losses(logps, mask.sum(-1), cfg, beta=0.1, decision=spec).steps
            for k, s in enumerate((1, 0, -1)):
                counts[k] += int((steps == s).sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="run directory to train in (reused if trained)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="epsdpo-precision-"))
    overrides = [
        f"output_dir={work / 'dpo'}",
        "loss_type=dpo",
        "use_lora=false",
        f"learning_rate={args.lr}",
        f"max_steps={args.steps}",
        "per_device_train_batch_size=8",
        "gradient_accumulation_steps=1",
        "warmup_ratio=0",
        "lr_scheduler_type=constant",
        "save_steps=0",
        "eval_after_training=false",
        "plot_after_training=false",
        f"seed={args.seed}",
    ]
    cfg = load_run_config(bundled_config("default"), overrides)
    final = work / "dpo" / "final"
    if not final.is_dir():
        final = train(cfg).final_model_dir
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    held_out = load_eval_dataset(cfg.data, tokenizer)[0][: args.pairs]
    collate = PreferenceCollator(tokenizer.pad_token_id, None)
    policy = load_causal_lm(str(final)).eval()
    reference = load_causal_lm("smollm2-135m-instruct").eval()
    table = {
        str(eps): {p: decisions(policy, reference, held_out, collate, eps, p) for p in REGIMES} for eps in args.epsilons
    }
    report = {
        "what": "ε-DPO decisions s = +1/0/−1 on held-out bundled pairs after DPO full fine-tuning of SmolLM2",
        "command": "python experiments/decision_precision.py "
        f"--steps {args.steps} --lr {args.lr} --pairs {args.pairs} --seed {args.seed}",
        "pairs": len(held_out),
        "counts": table,
        "machine": machine_label(),
    }
    print(f"decisions (s = +1 / 0 / −1) on {len(held_out)} held-out pairs, {report['machine']}")
    for eps, row in table.items():
        print(f"  ε = {eps}: " + ", ".join(f"{p} {'/'.join(map(str, c))}" for p, c in row.items()))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
