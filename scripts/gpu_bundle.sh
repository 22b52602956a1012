#!/usr/bin/env bash
# Prepares, on a machine where pip reaches the package index, what scripts/gpu_check.sh needs on a GPU machine that
# has no network and receives at most 64 MiB a call (the device tool's limit, working tree included):
#
#   .gpu/1/  the wheels of the packages epsdpo's GPU check imports that a CUDA PyTorch image lacks (datasets, dill,
#            multiprocess, trl, peft, vaderSentiment, gguf, liger-kernel; the versions of this checkout's .venv where
#            it has them), for CPython 3.12 on manylinux x86-64, and the first part of SmolLM2's GGUF file;
#   .gpu/2/  the rest of the GGUF file.
#
# The GGUF file (98 MB) cannot travel in one call, so the check runs as two calls on one warm machine: the first
# carries .gpu/1 (wheels, part 1), the second .gpu/2 (part 2) and joins the parts, checked by their SHA-256.
# The split is computed from the sizes: part 1 takes what the first call leaves after the working tree and the wheels.
#
#   bash scripts/gpu_bundle.sh              # then: scripts/gpu_check.sh's header says how to run the two calls
#
# .gpu/ is ignored by git (.gitignore), as a carried path must be.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv_python="${PYTHON:-$root/.venv/bin/python}"
limit=$((64 * 1024 * 1024))
margin=$((1024 * 1024)) # slack for files written between bundling and the call
liger_version="0.8.5"   # not a dependency of epsdpo, so not in .venv: the version the check was prepared with

version_of() { "$venv_python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf .gpu
mkdir -p .gpu/1 .gpu/2
wheels=()
for name in datasets dill multiprocess trl peft vaderSentiment gguf; do
    wheels+=("$name==$(version_of "$name")")
done
wheels+=("liger-kernel==$liger_version")
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/1 "${wheels[@]}"

gguf="$("$venv_python" -c "from epsdpo.models import BUILTIN_MODELS as b; print(b['smollm2-135m-instruct'].gguf_path())")"
gguf_size=$(stat -c %s "$gguf")
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
wheel_bytes=$(cat .gpu/1/*.whl | wc -c)
part1=$((limit - margin - tree - wheel_bytes - 4096))
part2=$((gguf_size - part1))
if ((part1 <= 0 || tree + part2 + margin + 4096 > limit)); then
    echo "gpu_bundle: the GGUF file ($gguf_size bytes) does not fit two calls beside a $tree-byte working tree and" \
        "$wheel_bytes bytes of wheels" >&2
    exit 1
fi
head -c "$part1" "$gguf" >.gpu/1/gguf.part1
tail -c "$part2" "$gguf" >.gpu/2/gguf.part2
sum="$(sha256sum "$gguf" | cut -d' ' -f1)  $(basename "$gguf")"
echo "$sum" >.gpu/1/gguf.sha256
echo "$sum" >.gpu/2/gguf.sha256
echo "gpu_bundle: working tree $((tree / 1024)) KiB; call 1 carries .gpu/1 ($(du -sk .gpu/1 | cut -f1) KiB: ${#wheels[@]}" \
    "wheels, GGUF part 1), call 2 carries .gpu/2 ($(du -sk .gpu/2 | cut -f1) KiB); limit 64 MiB a call"
