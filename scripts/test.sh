#!/usr/bin/env bash
# The project's test command: sets everything up (scripts/setup.sh), then runs the whole test suite offline.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" dev
venv="${EPSDPO_VENV:-$root/.venv}"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/ruff" format --check src tests benchmarks scripts experiments
"$venv/bin/ruff" check src tests benchmarks scripts experiments
exec "$venv/bin/python" -m pytest "$@"
