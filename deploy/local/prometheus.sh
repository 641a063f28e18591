#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package when missing (bookworm:
# 2.42). `llmstream infra up --with-prometheus` runs it as a private process on a free port
# (llmstream_tools/infra/_prometheus.py); the package's own service is never used: on a host
# with systemd, `systemctl disable --now prometheus` stops the one the package starts.
# `promtool test rules` (tests/prometheus/) and tests/integration/test_prometheus.py need both.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "make prometheus: prometheus/promtool missing; install them (apt-get install prometheus) and rerun" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "make prometheus: installing Debian package prometheus ..." >&2
$SUDO apt-get update -qq || { echo "make prometheus: apt-get update failed: Debian mirrors must be reachable" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
  || { echo "make prometheus: apt-get install prometheus failed" >&2; exit 1; }
# Fail here, not in a test: both binaries answer.
prometheus --version >/dev/null 2>&1 || { echo "make prometheus: prometheus does not run" >&2; exit 1; }
promtool --version >/dev/null 2>&1 || { echo "make prometheus: promtool does not run" >&2; exit 1; }
