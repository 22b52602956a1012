#!/usr/bin/env bash
# The main job on the embedded default, set-up included: installs the runtime (scripts/setup.sh), then aligns
# SmolLM2-135M-Instruct toward positive sentiment with ε-DPO on the bundled on-policy pairs, evaluates it on held-out
# prompts and plots the run. Extra key=value arguments override the bundled config (e.g. output_dir=runs/mine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${EPSDPO_VENV:-$root/.venv}"
cd "$root"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec "$venv/bin/epsdpo" train "$@"
