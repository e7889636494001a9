#!/usr/bin/env bash
# Installs what the sandbox drivers need on this host, with apt, only what is missing:
#   runc, debootstrap          container sandboxes and the debian image
#   gcc, libc6-dev             the container sandboxes' init and limits helper (static binaries built on first start)
#   qemu-system-x86, qemu-utils the qemu driver and the VM guest image (qcow2)
#   iptables, iproute2         setup-net: bridge, TAP devices, NAT for microVMs
#   nftables                   the sandboxes' egress firewall (and the VM TAPs' source check)
#   conntrack                  forgetting a freed sandbox address's tracked connections
#   debian-archive-keyring     recipe image builds: the host's private apt verifies DEBIAN_MIRROR with it
# Needs root and apt; otherwise it names what is missing in one line.
#   --if-needed  silent when nothing is missing, and exit 0 when it cannot install (npm start and
#                npm test run it so; the server then answers sandbox requests 503 with that line)
#   --dry-run    say what would be installed, install nothing
set -euo pipefail
if_needed=false
dry_run=false
for arg in "$@"; do
  case "$arg" in
    --if-needed) if_needed=true ;;
    --dry-run) dry_run=true ;;
    *) echo "setup: unknown option $arg (options: --if-needed, --dry-run)" >&2; exit 2 ;;
  esac
done

# command → the Debian package that provides it
declare -A provides=(
  [runc]=runc
  [debootstrap]=debootstrap
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [iptables]=iptables
  [ip]=iproute2
  [nft]=nftables
  [conntrack]=conntrack
  [gcc]=gcc
)
missing=()
# libc.a: the init is linked statically
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/libc.a ] || missing+=(libc6-dev)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${provides[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  $if_needed || echo "setup: runc, debootstrap, qemu, qemu-img, iptables, ip, nft, conntrack, gcc, libc6-dev and debian-archive-keyring are installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: sandboxes need ${missing[*]}: install them as root (apt-get install ${missing[*]}) or run \`npm run setup\` as root" >&2
  $if_needed && exit 0
  exit 1
fi
if $dry_run; then
  echo "setup: would install ${missing[*]} with apt-get"
  exit 0
fi
echo "setup: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: installed ${missing[*]}"
