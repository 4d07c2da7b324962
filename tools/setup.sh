#!/usr/bin/env bash
# Installs everything pyruntime's tests, demo and benchmarks need on a fresh Debian machine
# of this kind, then builds and installs pyruntime itself (editable). Safe to re-run: steps
# whose result is already there are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(dataset-fashion-mnist g++-aarch64-linux-gnu qemu-user-static)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PY=${PYTHON:-python3}
# timm needs torchvision; torch 2.14.1 + torchvision 0.29.1 are the pair this machine's pip
# serves (a CPU-capable build; torchvision 0.28 does not import beside torch 2.13).
if ! $PY -c "import torch, torchvision" 2>/dev/null; then
  $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
$PY -m pip install -q "scikit-build-core>=1.0" "pybind11>=2.12" ninja cmake
$PY -m pip install -q --no-build-isolation -e ".[convert,calibrate,test,bench]"
$PY -c "import pyruntime; print('pyruntime', pyruntime.__version__, 'ISA', pyruntime.isa(), 'of', pyruntime.available_isas())"
