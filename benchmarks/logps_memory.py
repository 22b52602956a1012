"""Peak memory and time of eager vs chunked perturbed log-probs (forward + backward of the policy term).

    .venv/bin/python benchmarks/logps_memory.py                       # N=4, T=512, V=151,936, H=896, fp32
    .venv/bin/python benchmarks/logps_memory.py --dtype bf16 --completion-fraction 1.0

Both implementations start from the same inputs: final hidden states (N, T, H) and lm_head weights (V, H) of a policy
(trainable) and a reference (frozen). The eager path first builds the full logits with the head (as a model's forward
does) and then follows the formulas; the chunked path never builds them. Each implementation runs in its own process;
a sampler thread reads the resident set size every millisecond, and "extra" memory is the peak during the call minus
the resident size just before it (inputs, weights and the allocator's state already counted). Times are the median of
``--repeats`` calls after one warm-up call.

Targets (issue #2): chunked extra memory ≤ 25% of eager extra memory; chunked time ≤ 1.2× eager time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch

from epsdpo import LMHeadInput, perturbed_logps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PeakRSS:
    """Samples this process's resident set size in a background thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def make_inputs(args: argparse.Namespace) -> tuple[LMHeadInput, LMHeadInput, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    n, t, v, h = args.n, args.t, args.v, args.h
    hidden = torch.randn(n, t, h, generator=g).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).mul_(h**-0.5).to(dtype).requires_grad_(True)
    ref_hidden = hidden.detach().clone()
    ref_hidden.add_(torch.randn(n, t, h, generator=g).to(dtype), alpha=0.1)
    ref_weight = weight.detach().clone()
    labels = torch.randint(0, v, (n, t), generator=g)
    mask = torch.zeros(n, t, dtype=torch.long)
    for row in range(n):  # a prompt of random length, then the completion to the end of the row
        prompt = int(round(t * (1 - args.completion_fraction) * (0.5 + torch.rand(1, generator=g).item())))
        mask[row, min(prompt, t - 1) :] = 1
    return LMHeadInput(hidden, weight), LMHeadInput(ref_hidden, ref_weight), labels, mask


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Runs in the child process: one implementation, warm-up + repeats."""
    torch.set_num_threads(args.threads)
    policy, reference, labels, mask = make_inputs(args)
    upstream = torch.linspace(-1.0, 1.0, args.n)  # a stand-in for dL/dlogp of each sequence

    def call() -> None:
        out = perturbed_logps(policy, reference, labels, mask, 0.01, impl=args.impl, chunk_size=args.chunk_size)
        (out.policy * upstream).sum().backward()
        policy.hidden.grad = None
        policy.weight.grad = None

    call()  # warm-up (allocator, kernels); its peak is not counted
    times, extra = [], []
    for _ in range(args.repeats):
        before = psutil.Process().memory_info().rss
        with PeakRSS() as peak:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        extra.append(peak.peak - before)
    return {
        "impl": args.impl,
        "time_s": statistics.median(times),
        "extra_mib": max(extra) / 2**20,
        "rss_before_mib": before / 2**20,
        "completion_tokens": int(mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="sequences (2 × pairs)")
    parser.add_argument("--t", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--v", type=int, default=151_936, help="vocabulary (Qwen2's)")
    parser.add_argument("--h", type=int, default=896, help="hidden size (Qwen2-0.5B's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--completion-fraction",
        type=float,
        default=0.75,
        help="mean share of each row that is completion (the rest is prompt)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--impl", choices=["eager", "chunked"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(measure(args)))
        return

    results = {}
    for impl in ("eager", "chunked"):
        child = [sys.executable, __file__, "--impl", impl] + [a for a in sys.argv[1:] if not a.startswith("--impl")]
        out = subprocess.run(child, check=True, capture_output=True, text=True)
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    e, c = results["eager"], results["chunked"]
    tokens = args.n * args.t
    print(
        f"perturbed log-probs, forward + backward of the policy term; torch {torch.__version__}, "
        f"{args.threads} threads, {args.dtype}"
    )
    print(
        f"N={args.n} T={args.t} V={args.v:,} H={args.h}; completion tokens {c['completion_tokens']} "
        f"of {tokens} ({c['completion_tokens'] / tokens:.0%})"
    )
    print(f"{'impl':<8} {'time (s)':>9} {'extra peak memory (MiB)':>24}")
    for r in (e, c):
        print(f"{r['impl']:<8} {r['time_s']:>9.2f} {r['extra_mib']:>24.0f}")
    mem_ratio = c["extra_mib"] / e["extra_mib"]
    time_ratio = c["time_s"] / e["time_s"]
    print(f"chunked / eager extra memory: {mem_ratio:.2f} (target <= 0.25) {'OK' if mem_ratio <= 0.25 else 'MISSED'}")
    print(f"chunked / eager time:         {time_ratio:.2f} (target <= 1.20) {'OK' if time_ratio <= 1.2 else 'MISSED'}")


if __name__ == "__main__":
    main()
