#!/usr/bin/env bash
# Installs the Debian packages listed in deploy/local/debian-packages.txt
# that are not installed yet. Called by `make test` (target `packages`), so
# a fresh machine gets what the tests need; fails loudly, never skips, when
# a package cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
list=deploy/local/debian-packages.txt
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$' || true)
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "Debian packages present: ${wanted[*]:-(none listed)}"; exit 0; }
echo "==> installing Debian packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-packages: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || { echo "install-packages: apt-get update failed" >&2; exit 1; }
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
  || { echo "install-packages: apt-get install ${missing[*]} failed; the tests that need them cannot run" >&2; exit 1; }
