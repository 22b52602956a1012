"""Where the ε-DPO forward spends its extra time: element-wise passes over one (chunk, V) float32 block.

    .venv/bin/python benchmarks/vocab_passes.py                      # 441 x 151,936 (config b's default chunk)
    .venv/bin/python benchmarks/vocab_passes.py --rows 1365 --vocab 49152

Times (median of ``--repeats`` after one warm-up) each kind of pass the chunked log-probs make over a block — max,
subtract, exp, sum, the mixture update — then one log-sum-exp, then the per-chunk work after the two products as
`epsdpo.logps.chunked` does it for DPO (policy and reference log-sum-exps) and for ε-DPO (those, f − g, and the two
mixtures' log-sum-exps). docs/performance.md quotes it: with fast matrix products these memory-bound passes are what
ε-DPO adds to DPO's step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from epsdpo.logps.chunked import _token_logps


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=441)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(args.rows, args.vocab, generator=g) * 3
    g0 = f0 + torch.randn(args.rows, args.vocab, generator=g)
    y = torch.randint(0, args.vocab, (args.rows,), generator=g)
    f, g_, scratch = (torch.empty_like(f0) for _ in range(3))
    eps = args.epsilon

    def restore() -> None:
        f.copy_(f0)
        g_.copy_(g0)

    def dpo() -> None:  # the epsilon = 0 route: policy and reference log-sum-exps
        restore()
        _token_logps(f, y, scratch)
        _token_logps(g_, y, g_)

    def epsilon_dpo() -> None:  # the float32-decision route of _FusedPerturbedTokenLogps.forward
        restore()
        _token_logps(f, y, scratch)
        _token_logps(g_, y, scratch)
        diff = torch.sub(f, g_, out=g_)
        weaker = f.add_(diff, alpha=eps)
        _token_logps(weaker, y, scratch)
        stronger = weaker.sub_(diff, alpha=2 * eps)
        _token_logps(stronger, y, stronger)

    rows = [
        ("copy back the two blocks (subtracted below)", median_ms(restore, args.repeats)),
        ("max over V", median_ms(lambda: f0.amax(dim=-1, keepdim=True), args.repeats)),
        ("subtract into a buffer", median_ms(lambda: torch.sub(f0, g0, out=scratch), args.repeats)),
        ("sum over V", median_ms(lambda: f0.sum(-1), args.repeats)),
        (
            "exp in place (after a copy, subtracted)",
            median_ms(lambda: scratch.copy_(f0).exp_(), args.repeats)
            - median_ms(lambda: scratch.copy_(f0), args.repeats),
        ),
        (
            "mixture update f += ε(f − g)",
            median_ms(lambda: scratch.copy_(f0).add_(g0, alpha=eps), args.repeats)
            - median_ms(lambda: scratch.copy_(f0), args.repeats),
        ),
        ("one log-sum-exp", median_ms(lambda: _token_logps(f0, y, scratch), args.repeats)),
    ]
    copy_ms = rows[0][1]
    dpo_ms, eps_ms = median_ms(dpo, args.repeats) - copy_ms, median_ms(epsilon_dpo, args.repeats) - copy_ms
    rows += [("DPO per-chunk work (two log-sum-exps)", dpo_ms), ("ε-DPO per-chunk work", eps_ms)]
    print(f"({args.rows}, {args.vocab}) float32 block, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, ms in rows:
        print(f"  {name:<45} {ms:8.1f} ms")
    print(f"  ε-DPO / DPO per-chunk work: {eps_ms / dpo_ms:.2f}")


if __name__ == "__main__":
    main()
