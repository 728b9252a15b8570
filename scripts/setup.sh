#!/usr/bin/env bash
# Installs everything Tessera needs on a fresh machine: Python packages, then helm and kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { python3 -m pip "$@"; }
# torch first, so nothing that depends on it pulls a CUDA build; on these machines this is the CPU build.
pip install -q torch==2.13.0
# DeepSpeed's setup.py imports torch: build it against the torch just installed.
pip install -q --no-build-isolation -c constraints.txt deepspeed
pip install -q -c constraints.txt -e ".[all]"
bash scripts/fetch-tools.sh
bash scripts/fetch-model.sh
