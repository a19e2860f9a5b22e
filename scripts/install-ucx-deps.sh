#!/usr/bin/env bash
# Installs what the `ucx` feature of comet-transport needs on a fresh Debian
# (bookworm) machine: UCX's headers and libraries (libucx-dev, UCX 1.13) and
# a C compiler for the small C layer over UCP. Idempotent and quiet; run as
# root (CI) or through sudo. Nothing is done when everything is there.
set -euo pipefail

need=()
[ -f /usr/include/ucp/api/ucp.h ] || need+=(libucx-dev)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
# ucx_info is handy to see which transports UCX finds (UCX_TLS).
command -v ucx_info >/dev/null 2>&1 || need+=(ucx-utils)

if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install-ucx-deps: installed ${need[*]}"
