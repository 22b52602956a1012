"""Full training steps (forward, backward, optimizer) of ε-DPO and DPO: epsdpo vs a naive ε-DPO vs TRL's DPOTrainer.

    .venv/bin/python benchmarks/step.py                   # both configurations, all contenders (~15 min on 2 cores)
    .venv/bin/python benchmarks/step.py --configs b --steps 3

Configurations (issue #8):
  a  SmolLM2-135M-Instruct (offline alias), bf16 autocast, 4 pairs x 256 tokens
  b  a randomly initialised Qwen2-style model, vocabulary 151,936, hidden 256, 4 layers, fp32, 2 pairs x 512 tokens

Contenders, each in its own process on the same synthetic text pairs (every row exactly the configured length):
  epsdpo-epsilon  epsdpo's Trainer.train_step, loss_type=epsilon_dpo (chunked fused log-probs)
  epsdpo-dpo      the same with loss_type=dpo
  epsdpo-epsilon-cached  epsdpo-epsilon with precompute_ref_hidden_states=true: the reference's hidden states are
                  computed once before timing (reported: that time and the file's size) and no reference forward runs
  naive-epsilon   ε-DPO built like the published code: four full-vocabulary tensors in autograd (naive_epsilon_dpo.py)
  trl-dpo         TRL's DPOTrainer, loss_type="sigmoid" (needs `pip install trl`; skipped if missing)

Reported per contender: median step time after warm-up, tokens/s (all rows, prompt included), peak resident memory
during the timed steps and its excess over the resident size before them (model, optimizer state, allocator), and
achieved model FLOP/s — 8 x tokens x (non-embedding parameters + the head's V x H), i.e. policy forward + backward and
reference forward, the same useful work for every contender — as a fraction of this machine's measured matmul peak for
the dtype (a 2048^3 matmul).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from logps_memory import PeakRSS  # the same resident-memory sampler (benchmarks/ is on sys.path)

CONFIGS: dict[str, dict[str, Any]] = {
    "a": {"model": "smollm2-135m-instruct", "model_config": None, "bf16": True, "pairs": 4, "tokens": 256},
    "b": {
        "model": "qwen2-style-random",
        "model_config": {
            "model_type": "qwen2",
            "vocab_size": 151_936,
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        },
        "bf16": False,
        "pairs": 2,
        "tokens": 512,
    },
}
CONTENDERS = ("epsdpo-epsilon", "epsdpo-dpo", "epsdpo-epsilon-cached", "naive-epsilon", "trl-dpo")
BETA, EPSILON, LR = 0.1, 0.01, 1e-6


def synthetic_pairs(path: Path, tokenizer: Any, pairs: int, tokens: int) -> None:
    """Text pairs whose prompt + completion (+ EOS) tokenize to exactly ``tokens`` ids; a quarter is prompt."""
    prompt_len = tokens // 4
    completion_len = tokens - prompt_len - 1  # the pipeline appends EOS

    def text(word: str, n: int) -> str:
        out = word * n
        assert len(tokenizer(out, add_special_tokens=False)["input_ids"]) == n, f"{word!r} is not one token each"
        return out

    rows = [
        {
            "prompt": text(" the", prompt_len),
            "chosen": text(" good", completion_len),
            "rejected": text(" bad", completion_len),
        }
        for _ in range(pairs * 4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_config(spec: dict[str, Any], data: Path, out_dir: Path, loss_type: str, cached: bool = False) -> Any:
    from epsdpo.training import load_run_config

    overrides = {
        "model": spec["model"],
        "model_config": spec["model_config"],
        "tokenizer": "smollm2-135m-instruct",
        "bf16": spec["bf16"],
        "dataset": str(data),
        "max_length": spec["tokens"] + 8,
        "max_prompt_length": spec["tokens"],
        "loss_type": loss_type,
        "beta": BETA,
        "epsilon": EPSILON,
        "output_dir": str(out_dir),
        "per_device_train_batch_size": spec["pairs"],
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "max_steps": 1000,
        "disable_tqdm": True,
        "seed": 0,
        "precompute_ref_hidden_states": cached,
        "ref_cache_dir": str(out_dir.parent / "ref_cache"),
    }
    return load_run_config({k: v for k, v in overrides.items() if v is not None})


def model_flops(model: torch.nn.Module, tokens: int) -> float:
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    non_embedding = sum(p.numel() for p in model.parameters() if p is not embedding and p is not head)
    return 8.0 * tokens * (non_embedding + head.numel())


def matmul_peak(dtype: torch.dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times)


def time_steps(step: Any, warmup: int, steps: int) -> tuple[list[float], int, int]:
    for _ in range(warmup):
        step()
    before = psutil.Process().memory_info().rss
    times = []
    with PeakRSS() as peak:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return times, before, peak.peak


def measure(config: str, contender: str, warmup: int, steps: int, fp32: bool = False) -> dict[str, Any]:
    """Child process: build one contender and time it (``fp32``: ignore the configuration's bf16)."""
    from epsdpo.models import load_tokenizer

    spec = {**CONFIGS[config], "bf16": CONFIGS[config]["bf16"] and not fp32}
    work = Path(tempfile.mkdtemp(prefix=f"epsdpo-step-{config}-{contender}-"))
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data = work / "pairs.jsonl"
    synthetic_pairs(data, tokenizer, spec["pairs"], spec["tokens"])
    cached = contender == "epsdpo-epsilon-cached"
    cfg = run_config(spec, data, work / "run", "dpo" if contender == "epsdpo-dpo" else "epsilon_dpo", cached)
    tokens = 2 * spec["pairs"] * spec["tokens"]
    extra: dict[str, Any] = {}
    if contender.startswith("epsdpo"):
        from epsdpo.recipe import prepare_run

        start = time.perf_counter()
        trainer = prepare_run(cfg).trainer  # with the cache: computes it (and frees the reference) before step 1
        if cached:
            extra["cache_build_s"] = time.perf_counter() - start  # the whole preparation, cache included
            extra["cache_mib"] = sum(f.stat().st_size for f in (work / "ref_cache").glob("*.safetensors")) / 2**20
            extra["cache_pairs"] = len(trainer.train_pairs)
        window = [list(range(spec["pairs"]))]
        times, before, peak = time_steps(lambda: trainer.train_step(window), warmup, steps)
        model = trainer.unwrapped
    elif contender == "naive-epsilon":
        from epsdpo.data import PreferenceCollator, load_preference_dataset
        from epsdpo.training.policy import build_policy_and_reference
        from naive_epsilon_dpo import naive_epsilon_dpo_step

        models = build_policy_and_reference(cfg.models, len(tokenizer), 0)
        model = models.policy
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        pairs, _ = load_preference_dataset(cfg.data, tokenizer)
        batch = PreferenceCollator(tokenizer.pad_token_id)(pairs[: spec["pairs"]])

        def naive() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"]):
                naive_epsilon_dpo_step(model, models.reference, batch, BETA, EPSILON, optimizer)

        times, before, peak = time_steps(naive, warmup, steps)
    else:
        times, before, peak, model = _trl(cfg, spec, data, tokenizer, warmup, steps)
    flops = model_flops(model, tokens)
    median = statistics.median(times)
    return {
        "config": config,
        "contender": contender,
        "bf16": spec["bf16"],
        "times": times,
        "median_s": median,
        "tokens_per_s": tokens / median,
        "rss_before_mib": before / 2**20,
        "peak_mib": peak / 2**20,
        "excess_mib": (peak - before) / 2**20,
        "model_gflops_per_s": flops / median / 1e9,
        "peak_gflops_per_s": matmul_peak(torch.bfloat16 if spec["bf16"] else torch.float32) / 1e9,
        **extra,
    }


def _trl(cfg: Any, spec: dict[str, Any], data: Path, tokenizer: Any, warmup: int, steps: int) -> tuple:
    """TRL's DPOTrainer on the same pairs; step times from a callback."""
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from epsdpo.training.policy import build_policy_and_reference

    models = build_policy_and_reference(cfg.models, len(tokenizer), 0)
    model = models.policy
    times: list[float] = []
    state = {"before": 0, "peak": None, "start": 0.0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, trainer_state, control, **kwargs):  # noqa: ANN001
            if trainer_state.global_step == warmup:
                state["before"] = psutil.Process().memory_info().rss
                state["peak"] = PeakRSS().__enter__()
            state["start"] = time.perf_counter()

        def on_step_end(self, args, trainer_state, control, **kwargs):  # noqa: ANN001
            if trainer_state.global_step > warmup:
                times.append(time.perf_counter() - state["start"])

    args = DPOConfig(
        output_dir=str(data.parent / "trl"),
        per_device_train_batch_size=spec["pairs"],
        max_steps=warmup + steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=BETA,
        loss_type="sigmoid",
        bf16=spec["bf16"],
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        max_length=spec["tokens"] + 8,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    # the same frozen reference as the other contenders (a config-built model has no name TRL could reload)
    trainer = DPOTrainer(
        model=model,
        ref_model=models.reference,
        args=args,
        processing_class=tokenizer,
        train_dataset=load_dataset("json", data_files=str(data))["train"],
        callbacks=[Timer()],
    )
    trainer.train()
    peak = state["peak"]
    peak.__exit__()
    return times, state["before"], peak.peak, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="a,b", help="comma-separated: a, b")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="run every configuration in float32 (for CPUs without native bf16 matmuls, where "
        "bf16 autocast falls back to a slow generic GEMM)",
    )
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child[0], args.child[1], args.warmup, args.steps, args.fp32)))
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    results = []
    for config in args.configs.split(","):
        for contender in args.contenders.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                config,
                contender,
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
                *(["--fp32"] if args.fp32 else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
                print(f"[{config}] {contender}: failed ({' | '.join(tail)})")
                continue
            results.append(json.loads(line[len("RESULT ") :]))
            print(f"[{config}] {contender}: done", flush=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def report(results: list[dict[str, Any]]) -> None:
    dtypes = ", ".join(sorted({"bf16" if r.get("bf16") else "fp32" for r in results}))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; {dtypes}")
    header = (
        f"{'cfg':<4}{'contender':<16}{'step s':>8}{'tok/s':>9}{'peak MiB':>10}{'excess MiB':>11}"
        f"{'GFLOP/s':>9}{'% peak':>8}"
    )
    print(header)
    for r in results:
        print(
            f"{r['config']:<4}{r['contender']:<16}{r['median_s']:>8.2f}{r['tokens_per_s']:>9.0f}"
            f"{r['peak_mib']:>10.0f}{r['excess_mib']:>11.0f}{r['model_gflops_per_s']:>9.1f}"
            f"{100 * r['model_gflops_per_s'] / r['peak_gflops_per_s']:>7.1f}%"
        )
    for r in results:
        if "cache_build_s" in r:
            print(
                f"[{r['config']}] reference cache: built in {r['cache_build_s']:.1f} s for {r['cache_pairs']} pairs, "
                f"{r['cache_mib']:.1f} MiB on disk ({r['cache_mib'] / r['cache_pairs']:.2f} MiB per pair)"
            )
    by = {(r["config"], r["contender"]): r for r in results}
    for config in sorted({r["config"] for r in results}):
        ours, dpo = by.get((config, "epsdpo-epsilon")), by.get((config, "epsdpo-dpo"))
        naive, trl = by.get((config, "naive-epsilon")), by.get((config, "trl-dpo"))
        cached = by.get((config, "epsdpo-epsilon-cached"))
        checks = []
        if ours and cached:
            time_ratio, memory_ratio = cached["median_s"] / ours["median_s"], cached["peak_mib"] / ours["peak_mib"]
            print(
                f"[{config}] ε-DPO with the reference cache / without: step time {time_ratio:.2f}, "
                f"peak memory {memory_ratio:.2f}"
            )
        if ours and dpo:
            checks += [
                ("ε-DPO / DPO step time", ours["median_s"] / dpo["median_s"], 1.05),
                ("ε-DPO / DPO peak memory", ours["peak_mib"] / dpo["peak_mib"], 1.10),
            ]
        if ours and naive:
            excess = ours["excess_mib"] / max(naive["excess_mib"], 1e-9)
            checks.append(("ε-DPO / naive excess memory", excess, 0.5))
        if ours and trl:
            checks += [
                ("ε-DPO / TRL DPO step time", ours["median_s"] / trl["median_s"], 1.0),
                ("ε-DPO / TRL DPO peak memory", ours["peak_mib"] / trl["peak_mib"], 0.8),
            ]
        for name, value, target in checks:
            verdict = "OK" if value <= target else "MISSED"
            print(f"[{config}] {name:<30} {value:6.2f}  (target <= {target:.2f}) {verdict}")


if __name__ == "__main__":
    main()
