"""Where the ε-DPO forward spends its extra time: the work over one (chunk, V) float32 block, per kernel.

    .venv/bin/python benchmarks/vocab_passes.py                      # 441 x 151,936, hidden 256 (config b's chunk)
    .venv/bin/python benchmarks/vocab_passes.py --rows 1365 --vocab 49152 --hidden 576   # SmolLM2's chunk
    .venv/bin/python benchmarks/vocab_passes.py --device cuda        # adds the Triton kernel
    python3 benchmarks/vocab_passes.py --device cuda --triton-sweep        # and its launch: block size x warps

Times (median of ``--repeats`` after one warm-up, contenders alternating round by round so drift hits all alike):

1. the kinds of pass the eager kernel makes over a block (max, subtract, exp, sum, a mixture update) and one
   log-sum-exp;
2. the per-block work after the two products, for DPO (ε = 0: policy and reference log-sum-exps) and ε-DPO (those
   and both mixtures'), with each kernel of :mod:`epsdpo.logps.vocab`: ``eager`` (torch passes), ``compiled``
   (torch.compile), ``triton`` (CUDA only);
3. the algebraic alternative for a shared frozen head (the LoRA default): (1 ± ε) f ∓ ε g = W((1 ± ε) h_θ ∓ ε h_ref),
   so each mixture's log-sum-exp is an ordinary linear log-prob of mixed hidden states, one more (c, H) x (H, V)
   product each — timed as a product plus a log-sum-exp in torch, and, where TRL is installed, with TRL's chunked
   fused log-prob function (``trl.kernels.chunked_logprob``), which never writes the (c, V) block.

Each kernel's time is also given as an achieved bandwidth: the least traffic any kernel needs — f and g read once,
8 x rows x V bytes — divided by its time, as a share of the device's memory bandwidth: the datasheet peak where the
device is known (PEAK_BANDWIDTH names each figure's source) and, always, a device-to-device copy measured in the same
run (bytes read + written per second), the practical ceiling. ``--triton-sweep`` (CUDA) times the Triton kernel's
launch over block sizes and warps per program, ε-DPO and DPO, with the same shares.

docs/performance.md quotes the figures and chooses the kernel from them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from epsdpo.logps import vocab
from epsdpo.machine import machine_label

#: HBM bandwidth by device name (the first key contained in torch.cuda.get_device_name), bytes/s, and the source
PEAK_BANDWIDTH: dict[str, tuple[float, str]] = {
    "H200": (4.8e12, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e"),
    "H100 NVL": (3.9e12, "NVIDIA H100 datasheet, NVL: 3.9 TB/s"),
    "H100 PCIe": (2.0e12, "NVIDIA H100 datasheet, PCIe: 2.0 TB/s"),
    "H100": (3.35e12, "NVIDIA H100 datasheet, SXM5: 3.35 TB/s HBM3"),
    "A100-SXM4-80GB": (2.039e12, "NVIDIA A100 datasheet, 80GB SXM: 2,039 GB/s"),
    "A100": (1.555e12, "NVIDIA A100 datasheet, 40GB: 1,555 GB/s"),
    "L40S": (0.864e12, "NVIDIA L40S datasheet: 864 GB/s"),
}


def datasheet_bandwidth(device_name: str) -> tuple[float, str] | None:
    """The datasheet HBM bandwidth of a GPU by its name, or None for a device not in :data:`PEAK_BANDWIDTH`."""
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in device_name), None)


def copy_bandwidth(device: torch.device, sync: Callable[[], None], mib: int = 1024, repeats: int = 5) -> float:
    """Bytes read + written per second by a device-to-device copy of ``mib`` MiB (best of ``repeats``)."""
    src = torch.empty(mib * 2**18, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def bandwidth_line(ms: float, min_bytes: int, copy: float, sheet: tuple[float, str] | None) -> str:
    """``ms`` as achieved bandwidth (``min_bytes`` / time) and its shares of the measured copy and the datasheet."""
    achieved = min_bytes / (ms / 1000)
    line = f"{achieved / 1e9:7.0f} GB/s, {100 * achieved / copy:5.1f}% of copy"
    return line + (f", {100 * achieved / sheet[0]:5.1f}% of datasheet" if sheet else "")


def timed_rounds(contenders: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict:
    """Median ms per contender; one warm-up each, then ``repeats`` rounds in which every contender runs once, in
    an order that alternates (A B C, C B A, ...) so that slow drift of the machine is shared."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contenders[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=441)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--triton-sweep",
        action="store_true",
        help="CUDA: time the Triton kernel's launch over block sizes and warps per program",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    h_policy = torch.randn(args.rows, args.hidden, generator=gen)
    h_ref = h_policy + 0.3 * torch.randn(args.rows, args.hidden, generator=gen)
    weight = torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5 * 3
    h_policy, h_ref, weight = h_policy.to(device), h_ref.to(device), weight.to(device)
    f0, g0 = h_policy @ weight.T, h_ref @ weight.T  # (rows, V) float32
    y = torch.randint(0, args.vocab, (args.rows,), generator=gen).to(device)
    f, g, scratch = (torch.empty_like(f0) for _ in range(3))
    eps = args.epsilon

    def restore() -> None:  # the eager kernel works in place: every timed call starts from fresh copies
        f.copy_(f0)
        g.copy_(g0)

    def kernel_call(kernel: str, epsilon: float) -> Callable[[], object]:
        if kernel != "eager":  # the compiled and Triton kernels only read f and g
            return lambda: vocab.block_logps(f0, g0, y, epsilon, scratch, kernel)

        def run() -> object:
            restore()
            return vocab.block_logps(f, g, y, epsilon, scratch, kernel)

        return run

    passes = {
        "copy back the two blocks (subtracted below)": restore,
        "max over V": lambda: f0.amax(dim=-1, keepdim=True),
        "subtract into a buffer": lambda: torch.sub(f0, g0, out=scratch),
        "sum over V": lambda: f0.sum(-1),
        "copy + exp in place": lambda: scratch.copy_(f0).exp_(),
        "copy + mixture update f += ε(f − g)": lambda: scratch.copy_(f0).add_(g0, alpha=eps),
        "copy alone": lambda: scratch.copy_(f0),
        "one log-sum-exp (eager)": lambda: vocab.token_logps(f0, y, scratch),
    }
    kernels = ["eager", "compiled"] + (["triton"] if device.type == "cuda" and vocab.triton_available() else [])
    blocks = {f"{k} {method}": kernel_call(k, e) for k in kernels for method, e in (("DPO", 0.0), ("ε-DPO", eps))}
    sweep: dict[str, Callable[[], object]] = {}
    if args.triton_sweep:
        if "triton" not in kernels:
            raise SystemExit("--triton-sweep needs --device cuda and Triton")
        from epsdpo.logps.triton_kernel import four_lse

        out = torch.empty((4, args.rows), dtype=torch.float32, device=device)
        for block in (2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                for method, e in (("DPO", 0.0), ("ε-DPO", eps)):
                    sweep[f"block {block:>5}, {warps:>2} warps, {method}"] = lambda b=block, w=warps, e=e: four_lse(
                        f0, g0, e, out, b, w
                    )

    def algebraic_torch() -> object:  # the two mixtures through the head: two products and two log-sum-exps
        out = []
        for sign in (1.0, -1.0):
            mixed = (1 + sign * eps) * h_policy - sign * eps * h_ref
            torch.mm(mixed, weight.T, out=scratch)
            out.append(vocab.token_logps(scratch, y, scratch))
        return out

    algebraic = {"algebraic: 2 products + 2 log-sum-exps (torch)": algebraic_torch}
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def algebraic_trl() -> object:
            with torch.no_grad():
                return [
                    ChunkedLogProbFunction.apply(
                        (1 + s * eps) * h_policy - s * eps * h_ref, weight, None, y, 1.0, 4096, None, 1.0, ()
                    )[0]
                    for s in (1.0, -1.0)
                ]

        algebraic["algebraic: 2 x TRL chunked log-prob (no (c, V) block kept)"] = algebraic_trl
    except ImportError:
        pass

    with torch.no_grad():
        t_passes = timed_rounds(passes, args.repeats, sync)
        t_blocks = timed_rounds(blocks, args.repeats, sync)
        t_alg = timed_rounds(algebraic, args.repeats, sync)
        t_sweep = timed_rounds(sweep, args.repeats, sync) if sweep else {}
        copy_bw = copy_bandwidth(device, sync)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine_label()
    sheet = datasheet_bandwidth(device_name) if device.type == "cuda" else None
    min_bytes = 2 * args.rows * args.vocab * 4  # f and g, float32, read once
    copy_ms = t_passes["copy back the two blocks (subtracted below)"]
    copy1 = t_passes.pop("copy alone")
    for key in ("copy + exp in place", "copy + mixture update f += ε(f − g)"):
        t_passes[key.replace("copy + ", "") + " (copy subtracted)"] = t_passes.pop(key) - copy1
    print(
        f"({args.rows}, {args.vocab}) float32 block, hidden {args.hidden}, ε {eps}, {args.repeats} rounds, "
        f"device {device}, torch {torch.__version__}; {machine_label()}"
    )
    for name, ms in t_passes.items():
        print(f"  {name:<62} {ms:8.1f} ms")
    # the eager kernel's times include the copy back of the blocks it overwrote: subtracted
    block_ms = {name: ms - copy_ms if name.startswith("eager") else ms for name, ms in t_blocks.items()}
    print("  per-block work after the two products (the eager kernel's copies subtracted):")
    for name, ms in block_ms.items():
        print(f"  {name:<62} {ms:8.1f} ms")
    for name, ms in t_alg.items():
        print(f"  {name:<62} {ms:8.1f} ms")
    for k in kernels:
        dpo, eps_ms = block_ms[f"{k} DPO"], block_ms[f"{k} ε-DPO"]
        print(f"  {k}: ε-DPO − DPO per block {eps_ms - dpo:7.1f} ms (ratio {eps_ms / dpo:.2f})")
    print(
        f"  bandwidth: f and g read once = {min_bytes / 1e6:.0f} MB a block; device-to-device copy measured "
        f"{copy_bw / 1e9:.0f} GB/s (read + written); datasheet: {sheet[1] if sheet else f'not known for {device_name}'}"
    )
    for k in kernels:
        for method in ("DPO", "ε-DPO"):
            ms = block_ms[f"{k} {method}"]
            print(f"  {k + ' ' + method:<22} {ms:8.2f} ms  {bandwidth_line(ms, min_bytes, copy_bw, sheet)}")
    if t_sweep:
        print("  Triton launch sweep (no copies; the kernel alone):")
        for label, ms in t_sweep.items():
            print(f"  {label:<36} {ms:8.3f} ms  {bandwidth_line(ms, min_bytes, copy_bw, sheet)}")
        for method in ("DPO", "ε-DPO"):
            ms, label = min((ms, k) for k, ms in t_sweep.items() if k.endswith(f", {method}"))
            print(f"  fastest for {method}: {label} ({ms:.3f} ms)")


if __name__ == "__main__":
    main()
