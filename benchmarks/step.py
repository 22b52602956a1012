"""Full training steps (forward, backward, optimizer) of ε-DPO and DPO: epsdpo vs a naive ε-DPO vs TRL's DPOTrainer.

    .venv/bin/python benchmarks/step.py                   # both configurations, all contenders, 3 rounds
    .venv/bin/python benchmarks/step.py --configs b --contenders epsdpo-epsilon,epsdpo-dpo,trl-dpo --rounds 4
    .venv/bin/python benchmarks/step.py --configs a,b --paired epsdpo-epsilon,epsdpo-dpo --cycles 10
    .venv/bin/python benchmarks/step.py --configs a,b,default --paired epsdpo-epsilon,epsdpo-epsilon-unshared
    .venv/bin/python benchmarks/step.py --configs a --paired epsdpo-epsilon,epsdpo-epsilon-unshared --prompt-share 0.5
    python3 benchmarks/step.py --device cuda --configs a,b        # on a GPU (scripts/gpu_check.sh runs this)
    python3 benchmarks/step.py --device cuda --configs 1.5b,1.5b-lora --contenders epsdpo-epsilon,epsdpo-dpo,trl-dpo
    .venv/bin/python benchmarks/step.py --configs 1.5b-lora --layers 1 --rounds 1 --steps 1   # CPU dry run

Configurations (issue #8):
  a  SmolLM2-135M-Instruct (offline alias), bf16 autocast, 4 pairs x 256 tokens
  b  a randomly initialised Qwen2-style model, vocabulary 151,936, hidden 256, 4 layers, fp32, 2 pairs x 512 tokens
  default  the bundled default run (`epsdpo train` without a config: SmolLM2-135M-Instruct with LoRA, fp32, 2
     micro-batches of 4 bundled sentiment pairs per step), stepping through its own training windows in order
Realistic sizes (issue #34; for a GPU), randomly initialised from public architectures, bf16 autocast, rows of
prompt 256 + response 512 tokens:
  1.5b       Qwen2.5-1.5B's architecture (1.54B parameters, vocabulary 151,936), full fine-tuning, 4 pairs a step
  1.5b-lora  the same with LoRA (rank 16, alpha 32, every linear layer but the head: the bundled default's adapters)
  8b-lora    Llama-3.1-8B's architecture (8.03B parameters, vocabulary 128,256, untied head), LoRA, 2 pairs a step
``--layers N`` builds any of them with N decoder layers (a dry run of their code paths on a small machine).

In the synthetic configurations every row (prompt + one response) is exactly the configured length and
``--prompt-share`` of it is the prompt (default: the configuration's, else 0.25); the default configuration has its
data's own prompt share (printed).

Contenders, each in its own process on the same synthetic text pairs (every row exactly the configured length):
  epsdpo-epsilon  epsdpo's Trainer.train_step, loss_type=epsilon_dpo (chunked fused log-probs)
  epsdpo-dpo      the same with loss_type=dpo
  epsdpo-simpo    the same with loss_type=simpo: no reference model loaded, no reference forward (reference-free)
  epsdpo-epsilon-eager  epsdpo-epsilon with logps_kernel=eager (torch passes over each (chunk, V) block instead of
                  the compiled one-pass kernel the default picks; see epsdpo.logps.vocab)
  epsdpo-epsilon-cached  epsdpo-epsilon with precompute_ref_hidden_states=true: the reference's hidden states are
                  computed once before timing (reported: that time and the file's size) and no reference forward runs
  epsdpo-epsilon-unshared  epsdpo-epsilon with prefix_sharing=false: two rows per pair, the prompt run twice
  naive-epsilon   ε-DPO built like the published code: four full-vocabulary tensors in autograd (naive_epsilon_dpo.py)
  trl-dpo         TRL's DPOTrainer, loss_type="sigmoid" (needs `pip install trl`; skipped if missing), on the same
                  model (with LoRA the same adapters, its reference the adapter-disabled base)
  trl-dpo-liger   the same with use_liger_kernel=True (Liger's layer kernels; needs `pip install liger-kernel`)

Reported per contender: median step time after warm-up, tokens/s (all rows, prompt included), peak resident memory
during the timed steps and its excess over the resident size before them (model, optimizer state, allocator), and
achieved model FLOP/s — 8 x tokens x (non-embedding parameters + the head's V x H), i.e. policy forward + backward and
reference forward (6 x with LoRA: no weight gradients of the frozen base), the same useful work for every
contender — as a fraction of this machine's measured matmul peak for
the dtype (a 2048^3 matmul).

Contenders timed one after another drift (the same code gave ε-DPO / DPO = 1.13 in one run and 0.95 in another on
one machine), so the contenders run in ``--rounds`` rounds, each contender once per round in its own fresh process,
the order reversed every other round (A B C, C B A, A B C, ...). Every ratio is computed within each round, and
reported as the median over rounds with its range (min–max) and, from 3 rounds, mean ± standard error.
Separate processes still differ by several percent (memory placement, the allocator); ``--paired A,B`` removes that
for two epsdpo contenders: both are built in one process and their steps interleaved (A B, B A, ...), giving a
per-cycle time ratio (its memory cannot be told apart there; the rounds give it), and the same ratio of the process's
CPU seconds, which other jobs on a shared machine disturb less than wall time on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
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

#: the architecture of Qwen2.5-1.5B (its public config.json: 1.54B parameters, the head tied to the embedding)
QWEN25_1_5B: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 151_936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32_768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}
#: the architecture of Llama-3.1-8B (its public config.json: 8.03B parameters, an untied head; its long-context RoPE
#: scaling is left out, as it changes no cost at 768 tokens)
LLAMA31_8B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128_256,
    "hidden_size": 4096,
    "intermediate_size": 14_336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500_000.0,
    "tie_word_embeddings": False,
}
CHAT_ROWS: dict[str, Any] = {"bf16": True, "tokens": 768, "prompt_share": 256 / 768}
QWEN_1_5B_RUN: dict[str, Any] = {
    "model": "qwen2.5-1.5b-architecture-random",
    "model_config": QWEN25_1_5B,
    "pairs": 4,
    **CHAT_ROWS,
}
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
    # the bundled default run; "tokens" (its max_length) only scales the reported tokens/s and FLOP/s
    "default": {"model": "default", "model_config": None, "bf16": False, "pairs": 4, "tokens": 160},
    # realistic sizes (issue #34), randomly initialised from public architectures, bf16 autocast, rows of chat length:
    # prompt 256 + response 512 tokens
    "1.5b": QWEN_1_5B_RUN,
    "1.5b-lora": {**QWEN_1_5B_RUN, "lora": True},
    "8b-lora": {
        "model": "llama-3.1-8b-architecture-random",
        "model_config": LLAMA31_8B,
        "pairs": 2,
        "lora": True,
        **CHAT_ROWS,
    },
}
CONTENDERS = (
    "epsdpo-epsilon",
    "epsdpo-dpo",
    "epsdpo-simpo",
    "epsdpo-epsilon-eager",
    "epsdpo-epsilon-cached",
    "epsdpo-epsilon-unshared",
    "naive-epsilon",
    "trl-dpo",
    "trl-dpo-liger",
)
#: (name, numerator, denominator, what is compared, target): each computed within a round
RATIOS = (
    ("ε-DPO / DPO step time", "epsdpo-epsilon", "epsdpo-dpo", "median_s", 1.03),
    ("ε-DPO / DPO peak memory", "epsdpo-epsilon", "epsdpo-dpo", "peak_mib", 1.02),
    ("ε-DPO / TRL DPO step time", "epsdpo-epsilon", "trl-dpo", "median_s", 0.8),
    ("ε-DPO / TRL DPO peak memory", "epsdpo-epsilon", "trl-dpo", "peak_mib", 0.7),
    ("ε-DPO / TRL DPO + Liger step time", "epsdpo-epsilon", "trl-dpo-liger", "median_s", 0.8),
    ("ε-DPO / TRL DPO + Liger peak memory", "epsdpo-epsilon", "trl-dpo-liger", "peak_mib", 0.7),
    ("DPO / TRL DPO step time", "epsdpo-dpo", "trl-dpo", "median_s", None),
    ("DPO / TRL DPO peak memory", "epsdpo-dpo", "trl-dpo", "peak_mib", None),
    ("ε-DPO / naive ε-DPO excess memory", "epsdpo-epsilon", "naive-epsilon", "excess_mib", 0.5),
    ("compiled / eager kernel, ε-DPO step time", "epsdpo-epsilon", "epsdpo-epsilon-eager", "median_s", None),
    ("cached reference / not, ε-DPO step time", "epsdpo-epsilon-cached", "epsdpo-epsilon", "median_s", None),
    ("shared / unshared prefix, ε-DPO step time", "epsdpo-epsilon", "epsdpo-epsilon-unshared", "median_s", None),
    ("SimPO / DPO step time", "epsdpo-simpo", "epsdpo-dpo", "median_s", None),
    ("SimPO / DPO peak memory", "epsdpo-simpo", "epsdpo-dpo", "peak_mib", None),
    ("SimPO / DPO excess memory", "epsdpo-simpo", "epsdpo-dpo", "excess_mib", None),
)
BETA, EPSILON, LR = 0.1, 0.01, 1e-6


def synthetic_pairs(path: Path, tokenizer: Any, pairs: int, tokens: int, prompt_share: float = 0.25) -> None:
    """Text pairs whose prompt + completion (+ EOS) tokenize to exactly ``tokens`` ids, ``prompt_share`` of them the
    prompt."""
    prompt_len = max(1, round(tokens * prompt_share))
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


def run_config(
    spec: dict[str, Any],
    data: Path,
    out_dir: Path,
    loss_type: str,
    cached: bool = False,
    kernel: str = "auto",
    device: str = "cpu",
    prefix_sharing: bool = True,
) -> Any:
    from epsdpo.training import load_run_config

    if spec["model"] == "default":  # the bundled default run, only what a benchmark must change
        from epsdpo.assets import bundled_config

        default = {
            "output_dir": str(out_dir),
            "max_steps": 1000,
            "disable_tqdm": True,
            "eval_after_training": False,
            "plot_after_training": False,
            "save_steps": 0,
            "loss_type": loss_type,
            "logps_kernel": kernel,
            "use_cpu": device == "cpu",
            "prefix_sharing": prefix_sharing,
        }
        return load_run_config(bundled_config("default"), [f"{k}={v}" for k, v in default.items()])
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
        "logps_kernel": kernel,
        "use_cpu": device == "cpu",
        "ref_cache_dir": str(out_dir.parent / "ref_cache"),
        "prefix_sharing": prefix_sharing,
    }
    if spec.get("lora"):  # the bundled default's adapters: rank 16 on every linear layer but the head
        overrides |= {"use_lora": True, "lora_r": 16, "lora_alpha": 32, "lora_target_modules": "all-linear"}
    return load_run_config({k: v for k, v in overrides.items() if v is not None})


def model_flops(model: torch.nn.Module, tokens: int, lora: bool = False) -> float:
    """The useful work of one step: 2 FLOPs a weight a token for the policy's forward, 2 for the backward's
    activation gradients, 2 for its weight gradients (not with LoRA: the base weights are frozen) and 2 for the
    reference's forward; the embedding is a lookup, the head a product."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    non_embedding = sum(p.numel() for p in model.parameters() if p is not embedding and p is not head)
    return (6.0 if lora else 8.0) * tokens * (non_embedding + head.numel())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str = "cpu") -> float:
    size = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


class PeakCUDA:
    """Peak GPU memory allocated by torch inside the block (the CUDA counterpart of PeakRSS), in bytes."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.peak = 0
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def memory_now(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else psutil.Process().memory_info().rss


def timed(step: Any, device: str) -> float:
    """Seconds one call of ``step`` takes, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def time_steps(step: Any, warmup: int, steps: int, device: str = "cpu") -> tuple[list[float], int, int]:
    for _ in range(warmup):
        step()
    sync(device)
    before = memory_now(device)
    with PeakCUDA() if device == "cuda" else PeakRSS() as peak:
        times = [timed(step, device) for _ in range(steps)]
    return times, before, peak.peak


def resolve_spec(
    config: str, fp32: bool = False, prompt_share: float | None = None, layers: int | None = None
) -> dict[str, Any]:
    """A configuration as run: float32 instead of its bf16 with ``fp32``, ``prompt_share`` instead of its own (0.25
    unless it names one), ``layers`` decoder layers instead of its architecture's (every layer's shapes kept: a
    realistic configuration's code paths on a machine too small for the whole model, e.g. a CPU dry run)."""
    if config not in CONFIGS:
        raise SystemExit(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")
    spec = {**CONFIGS[config], "bf16": CONFIGS[config]["bf16"] and not fp32}
    spec["prompt_share"] = prompt_share if prompt_share is not None else spec.get("prompt_share", 0.25)
    if layers is not None:
        if spec["model_config"] is None:
            raise SystemExit(f"--layers needs a configuration built from an architecture; {config!r} loads a model")
        spec["model_config"] = {**spec["model_config"], "num_hidden_layers": layers}
    return spec


def _setup(config: str, spec: dict[str, Any], contender: str, device: str) -> tuple[Path, Any, Path, Any]:
    """A work directory, the tokenizer, the synthetic pairs and the run config of one contender."""
    from epsdpo.models import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix=f"epsdpo-step-{config}-{contender}-"))
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data = work / "pairs.jsonl"
    if config != "default":
        synthetic_pairs(data, tokenizer, spec["pairs"], spec["tokens"], spec["prompt_share"])
    cached = contender == "epsdpo-epsilon-cached"
    loss = {"epsdpo-dpo": "dpo", "epsdpo-simpo": "simpo"}.get(contender, "epsilon_dpo")
    kernel = "eager" if contender == "epsdpo-epsilon-eager" else "auto"
    sharing = contender != "epsdpo-epsilon-unshared"
    return work, tokenizer, data, run_config(spec, data, work / "run", loss, cached, kernel, device, sharing)


def prompt_share_of(trainer: Any) -> float:
    """The share of the unshared rows' tokens that is prompt, over the run's training pairs."""
    pairs = trainer.train_pairs
    prompt = sum(2 * len(p.prompt_ids) for p in pairs)
    return prompt / sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def _epsdpo_step(cfg: Any, spec: dict[str, Any], work: Path, cached: bool) -> tuple[Any, Any, dict[str, Any]]:
    """(one training step as a function, the policy, cache figures and the prompt share) for an epsdpo contender;
    the default configuration steps through its own windows, in order (two contenders built alike see the same
    windows step by step), the others repeat one window of the synthetic pairs."""
    from epsdpo.recipes.train import prepare_run

    start = time.perf_counter()
    trainer = prepare_run(cfg).trainer  # with the cache: computes it (and frees the reference) before step 1
    extra: dict[str, Any] = {}
    if cached:
        extra["cache_build_s"] = time.perf_counter() - start  # the whole preparation, cache included
        extra["cache_mib"] = sum(f.stat().st_size for f in (work / "ref_cache").glob("*.safetensors")) / 2**20
        extra["cache_pairs"] = len(trainer.train_pairs)
    extra["prompt_share"] = prompt_share_of(trainer)
    extra["prefix_sharing"] = trainer.plan.prefix_sharing
    if spec["model"] == "default":
        windows = trainer._windows()
        return (lambda: trainer.train_step(next(windows))), trainer.unwrapped, extra
    window = [list(range(spec["pairs"]))]
    return (lambda: trainer.train_step(window)), trainer.unwrapped, extra


def measure_paired(
    config: str, spec: dict[str, Any], pair: list[str], warmup: int, cycles: int, device: str = "cpu"
) -> dict[str, Any]:
    """Child process: two epsdpo contenders built side by side, their steps interleaved A B, B A, A B, ... (a cycle
    is one step of each), so both see the same process and machine state; every step time of each."""
    steps, extras = {}, {}
    for name in pair:
        work, _, _, cfg = _setup(config, spec, name, device)
        steps[name], _, extras[name] = _epsdpo_step(cfg, spec, work, name == "epsdpo-epsilon-cached")
    for name in pair:
        for _ in range(warmup):
            steps[name]()
    flops = {name: step_flops(steps[name]) for name in pair}  # one more step each, counted, not timed
    times: dict[str, list[float]] = {name: [] for name in pair}
    cpu: dict[str, list[float]] = {name: [] for name in pair}  # CPU seconds of the process (all threads)
    for cycle in range(cycles):
        for name in pair if cycle % 2 == 0 else pair[::-1]:
            start = time.process_time()
            times[name].append(timed(steps[name], device))
            cpu[name].append(time.process_time() - start)
    return {
        "config": config,
        "pair": pair,
        "times": times,
        "cpu_times": cpu,
        "flops": flops,
        "device": device,
        "versions": versions(),
        "prompt_share": extras[pair[0]]["prompt_share"],
        "prefix_sharing": {name: extras[name]["prefix_sharing"] for name in pair},
    }


def step_flops(step: Any) -> float:
    """The floating-point operations of one call of ``step`` as torch's FlopCounterMode counts them (matmuls and
    attention, forward and backward; attention counted in full, as if no position were masked): a figure the
    machine's load cannot disturb."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(
    config: str, spec: dict[str, Any], contender: str, warmup: int, steps: int, device: str = "cpu"
) -> dict[str, Any]:
    """Child process: build one contender (``spec``: the configuration as :func:`resolve_spec` resolved it) and time
    it.

    Memory: on the CPU the process's resident set size; on CUDA the GPU memory torch allocated."""
    why = not_applicable(config, spec, contender, device)
    if why:
        raise SystemExit(f"{contender} in {config}: {why}")
    work, tokenizer, data, cfg = _setup(config, spec, contender, device)
    tokens = 2 * spec["pairs"] * spec["tokens"]
    lora = bool(spec.get("lora"))
    extra: dict[str, Any] = {}
    if contender.startswith("epsdpo"):
        step, model, extra = _epsdpo_step(cfg, spec, work, contender == "epsdpo-epsilon-cached")
        times, before, peak = time_steps(step, warmup, steps, device)
    elif contender == "naive-epsilon":
        from epsdpo.data import PreferenceCollator, load_preference_dataset
        from epsdpo.training.policy import build_policy_and_reference
        from naive_epsilon_dpo import naive_epsilon_dpo_step

        models = build_policy_and_reference(cfg.models, len(tokenizer), 0)
        model, reference = models.policy.to(device), models.reference.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        pairs, _ = load_preference_dataset(cfg.data, tokenizer)
        collated = PreferenceCollator(tokenizer.pad_token_id)(pairs[: spec["pairs"]])
        batch = {k: v.to(device) for k, v in collated.items()}

        def naive() -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=spec["bf16"]):
                naive_epsilon_dpo_step(model, reference, batch, BETA, EPSILON, optimizer)

        times, before, peak = time_steps(naive, warmup, steps, device)
    else:
        liger = contender == "trl-dpo-liger"
        times, before, peak, model = _trl(cfg, spec, data, tokenizer, warmup, steps, device, liger)
    flops = model_flops(model, tokens, lora)
    median = statistics.median(times)
    return {
        "config": config,
        "contender": contender,
        "bf16": spec["bf16"],
        "lora": lora,
        "layers": (spec["model_config"] or {}).get("num_hidden_layers"),
        "prompt_share": spec["prompt_share"],
        "times": times,
        "median_s": median,
        "tokens_per_s": tokens / median,
        "rss_before_mib": before / 2**20,
        "peak_mib": peak / 2**20,
        "excess_mib": (peak - before) / 2**20,
        "model_gflops_per_s": flops / median / 1e9,
        "peak_gflops_per_s": matmul_peak(torch.bfloat16 if spec["bf16"] else torch.float32, device) / 1e9,
        "device": device,
        "versions": versions(),
        **extra,
    }


def versions() -> dict[str, str]:
    """torch, transformers and (where installed) TRL, as the child process imported them."""
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


def _trl(
    cfg: Any,
    spec: dict[str, Any],
    data: Path,
    tokenizer: Any,
    warmup: int,
    steps: int,
    device: str = "cpu",
    liger: bool = False,
) -> tuple:
    """TRL's DPOTrainer on the same pairs and the same model (with LoRA: the same adapters, the reference the
    adapter-disabled base, as TRL does for a PEFT model); ``liger``: its ``use_liger_kernel`` option (Liger's layer
    kernels; TRL keeps its own fused head). Step times from a callback."""
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
                sync(device)
                state["before"] = memory_now(device)
                state["peak"] = (PeakCUDA() if device == "cuda" else PeakRSS()).__enter__()
            state["start"] = time.perf_counter()

        def on_step_end(self, args, trainer_state, control, **kwargs):  # noqa: ANN001
            if trainer_state.global_step > warmup:
                sync(device)
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
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        max_length=spec["tokens"] + 8,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
        use_liger_kernel=liger,
    )
    # the same frozen reference as the other contenders (a config-built model has no name TRL could reload); None
    # with LoRA, where the policy is a PEFT model and TRL disables its adapters for the reference
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
    parser.add_argument("--configs", default="a,b", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every contender, order alternating")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="run every configuration in float32 (for CPUs without native bf16 matmuls, where "
        "bf16 autocast falls back to a slow generic GEMM)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--paired",
        default=None,
        metavar="A,B",
        help="instead of rounds: two epsdpo contenders in one process, steps interleaved A B, B A, ... for "
        "--cycles cycles; reports the per-cycle time ratio A/B (memory is not separable there)",
    )
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument(
        "--prompt-share",
        type=float,
        default=None,
        help="the share of each synthetic row (prompt + one response) that is prompt; default: the configuration's "
        "(1/3 for the realistic sizes: 256 + 512 tokens), else 0.25",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="build the configuration's architecture with this many decoder layers (every layer's shapes kept): its "
        "code paths on a machine too small for the whole model, e.g. a CPU dry run of 1.5b or 8b-lora",
    )
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "CONTENDER"), help=argparse.SUPPRESS)
    parser.add_argument("--paired-child", nargs=2, metavar=("CONFIG", "A,B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired_child:
        config, pair = args.paired_child[0], args.paired_child[1].split(",")
        spec = resolve_spec(config, args.fp32, args.prompt_share, args.layers)
        print("RESULT " + json.dumps(measure_paired(config, spec, pair, args.warmup, args.cycles, args.device)))
        return
    if args.paired:
        paired_main(args)
        return
    if args.child:
        spec = resolve_spec(args.child[0], args.fp32, args.prompt_share, args.layers)
        print("RESULT " + json.dumps(measure(args.child[0], spec, args.child[1], args.warmup, args.steps, args.device)))
        return
    contenders = args.contenders.split(",")
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    results = []
    for config in args.configs.split(","):
        spec = resolve_spec(config, args.fp32, args.prompt_share, args.layers)
        runnable = []
        for contender in contenders:
            why = not_applicable(config, spec, contender, args.device)
            if why:
                print(f"[{config}] {contender}: skipped ({why})")
            else:
                runnable.append(contender)
        for round_ in range(args.rounds):
            for contender in runnable if round_ % 2 == 0 else runnable[::-1]:
                label = f"[{config}] round {round_ + 1}, {contender}"
                result = run_child(["--child", config, contender, "--steps", str(args.steps)], args, label)
                if result is not None:
                    results.append({**result, "round": round_ + 1})
                    print(
                        f"{label}: {result['median_s']:.2f} s, {result['tokens_per_s']:.0f} tokens/s, peak "
                        f"{result['peak_mib']:.0f} MiB",
                        flush=True,
                    )
                    if args.json:  # after every contender: a run stopped at a time limit keeps what finished
                        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report(results)


def not_applicable(config: str, spec: dict[str, Any], contender: str, device: str = "cpu") -> str | None:
    """Why ``contender`` cannot run in this configuration, on this device or in this environment, or None."""
    if config == "default" and not contender.startswith("epsdpo"):
        return "the default configuration runs the epsdpo contenders only"
    if contender == "naive-epsilon" and spec.get("lora"):
        return "the naive ε-DPO trains all weights; it has no LoRA form"
    if contender.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install trl)"
    if contender == "trl-dpo-liger" and importlib.util.find_spec("liger_kernel") is None:
        return "Liger-Kernel is not installed (pip install liger-kernel)"
    if contender == "trl-dpo-liger" and device == "cpu":
        return "Liger's kernels are Triton kernels for a GPU"
    return None


def run_child(child_args: list[str], args: argparse.Namespace, label: str) -> dict[str, Any] | None:
    """Run this script as a child process with ``child_args`` (and the shared flags); its RESULT, or None with the
    failure's last lines printed under ``label``."""
    cmd = [sys.executable, __file__, *child_args, "--warmup", str(args.warmup), "--device", args.device]
    cmd += ["--prompt-share", str(args.prompt_share)] if args.prompt_share is not None else []
    cmd += ["--layers", str(args.layers)] if args.layers is not None else []
    cmd += ["--fp32"] if args.fp32 else []
    # benchmarks/ first, then whatever the caller had on the path (a checkout's src/ before an installed epsdpo)
    path = [str(Path(__file__).parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        print(f"{label}: failed ({' | '.join(tail)})")
        return None
    return json.loads(line[len("RESULT ") :])


def paired_main(args: argparse.Namespace) -> None:
    """One child per configuration with the two contenders interleaved; the ratio A/B per cycle."""
    from epsdpo.machine import machine_label

    pair = args.paired.split(",")
    if len(pair) != 2 or not all(p.startswith("epsdpo") and p in CONTENDERS for p in pair):
        raise SystemExit(f"--paired needs two epsdpo contenders (A,B), got {args.paired!r}")
    results = []
    for config in args.configs.split(","):
        child = ["--paired-child", config, args.paired, "--cycles", str(args.cycles)]
        result = run_child(child, args, f"[{config}] paired {args.paired}")
        if result is not None:
            results.append(result)
    print(f"\n{machine_label()}, {os.cpu_count()} cores; on {args.device}; interleaved A B, B A, ... in one process")
    for r in results:
        a, b = (r["times"][name] for name in r["pair"])
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        sharing = ", ".join(f"{k} prefix_sharing={v}" for k, v in r["prefix_sharing"].items())
        print(f"[{r['config']}] {versions}; {len(ratios)} cycles; prompt share {r['prompt_share']:.2f}; {sharing}")
        for name, t in zip(r["pair"], (a, b), strict=True):
            listed = ", ".join(f"{x:.2f}" for x in t)
            print(f"[{r['config']}]   {name:<22} median step {statistics.median(t):.3f} s  ({listed})")
        print(f"[{r['config']}]   {r['pair'][0]} / {r['pair'][1]} per cycle: {spread(ratios)}")
        ca, cb = (r["cpu_times"][name] for name in r["pair"])
        cpu_ratios = [x / y for x, y in zip(ca, cb, strict=True)]
        fa, fb = (r["flops"][name] for name in r["pair"])
        print(f"[{r['config']}]   counted GFLOP per step {fa / 1e9:.0f} / {fb / 1e9:.0f} = {fa / fb:.3f}")
        print(
            f"[{r['config']}]   CPU seconds (all threads), medians {statistics.median(ca):.2f} / "
            f"{statistics.median(cb):.2f}; ratio per cycle: {spread(cpu_ratios)}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def spread(values: list[float]) -> str:
    """median [min–max] over rounds, and mean ± standard error from 3 rounds."""
    med = statistics.median(values)
    text = f"{med:.3f} [{min(values):.3f}–{max(values):.3f}]"
    if len(values) >= 3:
        se = statistics.stdev(values) / len(values) ** 0.5
        text += f", mean {statistics.fmean(values):.3f} ± {se:.3f}"
    return text


def round_ratios(results: list[dict[str, Any]], config: str) -> dict[str, list[float]]:
    """Each ratio of RATIOS computed within every round that has both contenders."""
    out: dict[str, list[float]] = {}
    for round_ in sorted({r["round"] for r in results if r["config"] == config}):
        by = {r["contender"]: r for r in results if r["config"] == config and r["round"] == round_}
        for name, num, den, key, _ in RATIOS:
            if num in by and den in by:
                out.setdefault(name, []).append(by[num][key] / max(by[den][key], 1e-9))
    return out


def report(results: list[dict[str, Any]]) -> None:
    from epsdpo.machine import machine_label

    dtypes = ", ".join(sorted({"bf16" if r.get("bf16") else "fp32" for r in results}))
    seen = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in results if "versions" in r})
    devices = ", ".join(sorted({r.get("device", "cpu") for r in results}))
    memory = "GPU memory allocated by torch" if "cuda" in devices else "resident set size"
    print(f"\n{machine_label()}, {os.cpu_count()} cores; {dtypes}; on {devices}; {' / '.join(seen)}; memory: {memory}")
    header = (
        f"{'cfg':<10}{'contender':<23}{'rounds':>7}{'step s':>8}{'tok/s':>9}{'peak MiB':>10}{'excess MiB':>11}"
        f"{'GFLOP/s':>9}{'% peak':>8}"
    )
    print("medians over rounds:\n" + header)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["config"], r["contender"]), []).append(r)
    for (config, contender), rs in groups.items():

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"{config:<10}{contender:<23}{len(rs):>7}{med('median_s'):>8.2f}{med('tokens_per_s'):>9.0f}"
            f"{med('peak_mib'):>10.0f}{med('excess_mib'):>11.0f}{med('model_gflops_per_s'):>9.1f}"
            f"{100 * med('model_gflops_per_s') / med('peak_gflops_per_s'):>7.1f}%"
        )
    for r in results:
        if "cache_build_s" in r:
            print(
                f"[{r['config']}] reference cache: built in {r['cache_build_s']:.1f} s for {r['cache_pairs']} pairs, "
                f"{r['cache_mib']:.1f} MiB on disk ({r['cache_mib'] / r['cache_pairs']:.2f} MiB per pair)"
            )
    targets = {name: target for name, *_, target in RATIOS}
    for config in sorted({r["config"] for r in results}):
        for name, values in round_ratios(results, config).items():
            target, verdict = targets[name], ""
            if target is not None:
                verdict = f"  (target <= {target:.2f}) {'OK' if statistics.median(values) <= target else 'MISSED'}"
            print(f"[{config}] {name:<42} {spread(values)}{verdict}")


if __name__ == "__main__":
    main()
