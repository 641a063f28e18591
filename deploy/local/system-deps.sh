#!/usr/bin/env bash
# Installs the system tools llmstream needs from Debian packages, only those missing.
# (PostgreSQL and Redis are installed on demand by `llmstream infra up`.)
set -euo pipefail

# command -> Debian package
declare -A NEED=(
  [java]=openjdk-17-jre-headless
  [mvn]=maven
  [kcat]=kcat
  [protoc]=protobuf-compiler
  [chromium]=chromium        # the browser page's Playwright test drives Debian's Chromium
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
# protoc needs the well-known types (google/protobuf/timestamp.proto) to decode events.
[ -f /usr/include/google/protobuf/timestamp.proto ] || missing+=(libprotobuf-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "missing packages: ${missing[*]}; install them (apt-get install ${missing[*]}) and rerun" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "installing ${missing[*]} from Debian packages ..." >&2
$SUDO apt-get update -qq || { echo "apt-get update failed: Debian mirrors must be reachable" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
  || { echo "apt-get install ${missing[*]} failed" >&2; exit 1; }
