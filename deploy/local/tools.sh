#!/usr/bin/env bash
# Go-built tools the test suite uses, cached in $LLMSTREAM_CACHE_DIR/bin (outside the clone):
#   kustomize  renders deploy/k8s overlays (validated offline in tests)
#   grpcurl    drives the model server through reflection (tested like a user would)
# and KEDA's CRDs (from the kedacore/keda Go module) to validate ScaledObjects offline.
# Versions are pinned; each is fetched once from the Go module proxy.
set -euo pipefail
CACHE="${LLMSTREAM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmstream}"
BIN="$CACHE/bin"
KUSTOMIZE_VERSION=v5.8.2   # v5.8.3 needs go >= 1.27
GRPCURL_VERSION=v1.9.3
KEDA_VERSION=v2.21.0
mkdir -p "$BIN"
command -v go >/dev/null || { echo "go not found: install Go 1.22+ (https://go.dev/dl) to build kustomize and grpcurl" >&2; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

install_tool() {  # name module version
  local stamp="$BIN/.$1-$3"
  [ -x "$BIN/$1" ] && [ -f "$stamp" ] && return 0
  echo "building $1 $3 (once) ..." >&2
  GOBIN="$BIN" go install "$2@$3" || { echo "go install $2@$3 failed: the Go module proxy must be reachable" >&2; exit 1; }
  touch "$stamp"
}
install_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
install_tool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION"

crds="$CACHE/keda-$KEDA_VERSION/crd"
if [ ! -f "$crds/keda.sh_scaledobjects.yaml" ]; then
  dir=$(go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -n "$dir" ] || { echo "could not download github.com/kedacore/keda/v2@$KEDA_VERSION" >&2; exit 1; }
  mkdir -p "$crds" && cp "$dir"/config/crd/bases/*.yaml "$crds/"
fi
