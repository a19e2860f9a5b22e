#!/usr/bin/env bash
# Installs NVRTC and the CUDA runtime headers (pip wheels, no toolkit, no GPU
# needed) into a project folder so that `cargo xtask ci` can compile every
# kernel variant for sm_90a and sm_80. Idempotent. Prints the environment the
# compile gate needs (eval "$(scripts/install-nvrtc.sh)" to apply it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${COMET_NVRTC_DIR:-$ROOT/.tools/nvrtc}"
NVRTC_VER="13.0.88"
RT_VER="13.0.96"
STAMP="$DEST/.installed-$NVRTC_VER-$RT_VER"

if [[ ! -f "$STAMP" ]]; then
  PY="$(command -v python3 || true)"
  if [[ -z "$PY" ]]; then
    echo "install-nvrtc.sh: python3 is required (pip installs the NVRTC wheels)" >&2
    exit 1
  fi
  rm -rf "$DEST"
  mkdir -p "$DEST"
  echo "install-nvrtc.sh: installing the NVRTC $NVRTC_VER and CUDA runtime $RT_VER wheels into $DEST (pip, first run only)" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" \
    "nvidia-cuda-nvrtc==$NVRTC_VER" "nvidia-cuda-runtime==$RT_VER" >&2
  touch "$STAMP"
fi

CU="$DEST/nvidia/cu13"
LIB="$CU/lib"
INC="$CU/include"
if [[ ! -f "$INC/cuda_bf16.h" ]]; then
  echo "install-nvrtc.sh: $INC/cuda_bf16.h missing after install" >&2
  exit 1
fi
# cudarc's dynamic loading tries "libnvrtc.so" first, then versioned names
# (libnvrtc.so.13 among them); the wheel ships only the versioned file, so
# add the plain name too. comet-kernels also preloads both libraries by full
# path from COMET_NVRTC_LIB_DIR, so LD_LIBRARY_PATH is optional.
if [[ -e "$LIB/libnvrtc.so.13" && ! -e "$LIB/libnvrtc.so" ]]; then
  ln -s libnvrtc.so.13 "$LIB/libnvrtc.so"
fi

echo "export COMET_NVRTC_LIB_DIR=\"$LIB\""
echo "export COMET_CUDA_INCLUDE=\"$INC\""
echo "export LD_LIBRARY_PATH=\"$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
