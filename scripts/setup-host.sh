#!/usr/bin/env bash
# Installs what the sandbox drivers need on this host: runc (container sandboxes) and debootstrap
# (builds the debian image). Needs root and apt; otherwise it names what is missing in one line.
set -euo pipefail

packages=(runc debootstrap)
missing=()
for p in "${packages[@]}"; do
  command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: runc and debootstrap are installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: sandboxes need ${missing[*]}: install them as root (apt-get install ${missing[*]}) and run again" >&2
  exit 1
fi
echo "setup: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: installed ${missing[*]}"
