#!/usr/bin/env bash
# The embedded default: build the tiny base model, then run a FineTuneJob end to end on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
tessera model init-tiny .tessera/models/tiny-llama
tessera validate examples/tfns-sentiment.yaml
