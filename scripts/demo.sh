#!/usr/bin/env bash
# The embedded default: a FineTuneJob trained, evaluated, published and served on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/demo.py
