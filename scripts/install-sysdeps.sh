#!/usr/bin/env bash
# Install the Debian packages certgate's tests and demo use, only when missing.
# Usage: install-sysdeps.sh PACKAGE...   (package names; each is checked by its command)
set -euo pipefail

declare -A probe=(
  [openssl]="openssl" [curl]="curl" [haproxy]="haproxy" [stunnel4]="stunnel4"
  [postgresql]="/usr/lib/postgresql/*/bin/initdb"
  [python3-venv]="python3 -c 'import ensurepip'"
  [softhsm2]="softhsm2-util" [scep]="scepclient"
  [rsyslog]="rsyslogd" [rsyslog-openssl]="/usr/lib/*/rsyslog/lmnsd_ossl.so"
  [systemd]="systemd-analyze"
  [dnsmasq-base]="/usr/sbin/dnsmasq" [bind9-dnsutils]="dig"
)
missing=()
for pkg in "$@"; do
  check=${probe[$pkg]:-$pkg}
  if [[ $check == /* ]]; then
    compgen -G "$check" >/dev/null || missing+=("$pkg")
  elif [[ $check == *" "* ]]; then
    eval "$check" >/dev/null 2>&1 || missing+=("$pkg")
  else
    command -v "$check" >/dev/null 2>&1 || missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing Debian packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts a cluster and a haproxy service on install; tests start their own.
if command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now haproxy postgresql rsyslog >/dev/null 2>&1 || true
fi
