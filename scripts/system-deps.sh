#!/usr/bin/env bash
# Debian packages the tests need: a virtual display for the window test, Chromium for the browser
# test, a C++ toolchain for the host. Installs only what is missing; needs root (CI runs as root).
# Nothing here downloads a browser build or a model: these are Debian's own packages.
set -euo pipefail
pkgs=(xvfb x11-apps xdotool chromium cmake ninja-build g++ dpkg-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run as root: apt-get install -y ${missing[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
