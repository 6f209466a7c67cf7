#!/usr/bin/env bash
# Debian packages LIBERO needs for headless rendering with EGL on a CPU (Mesa llvmpipe):
# libegl1, libgl1 and libgl1-mesa-dri (swrast_dri.so). Installs them only when missing.
set -euo pipefail
missing=()
ldconfig -p | grep -q 'libEGL.so.1' || missing+=(libegl1)
ldconfig -p | grep -q 'libGL.so.1' || missing+=(libgl1)
compgen -G '/usr/lib/*/dri/swrast_dri.so' > /dev/null || missing+=(libgl1-mesa-dri)
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  sudo_cmd=""; [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
else
  echo "bootstrap: EGL packages present"
fi
