#!/usr/bin/env bash
# Fetch ONNX Runtime's C API headers into DEST/include: Debian trixie's libonnxruntime-dev (MIT)
# with `apt-get download`, through a private apt configuration in a temp folder, so the system's
# apt sources are not changed and nothing is installed. Needs apt-get, dpkg-deb and access to the
# Debian mirror; run by CMake at configure time when no headers are found (XP_FETCH_ORT_HEADERS).
#   usage: ort_headers.sh DEST [MIRROR]
set -euo pipefail
dest=${1:?usage: ort_headers.sh DEST [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/dl"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root"
          -o "Debug::NoLocking=1" -o "Acquire::Retries=3")
apt-get "${apt_opts[@]}" -qq update
(cd "$work/dl" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)
dpkg-deb -x "$work"/dl/libonnxruntime-dev_*.deb "$work/x"
mkdir -p "$dest/include"
cp -r "$work/x/usr/include/onnxruntime/." "$dest/include/"
cp "$work/x/usr/share/doc/libonnxruntime-dev/copyright" "$dest/COPYRIGHT"
basename "$work"/dl/libonnxruntime-dev_*.deb > "$dest/SOURCE"
echo "ONNX Runtime headers from $(cat "$dest/SOURCE") in $dest/include"
