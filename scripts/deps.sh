#!/usr/bin/env bash
# Installs the Debian packages metald needs at run time and for its tests.
set -euo pipefail
need=()
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/timestamp.proto): protobuf-compiler
# only recommends them, and recommends are not installed below.
[ -f /usr/include/google/protobuf/timestamp.proto ] || need+=(libprotobuf-dev)
command -v ping >/dev/null || need+=(iputils-ping)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
/usr/bin/python3 -c 'import scapy' 2>/dev/null || need+=(python3-scapy)
# The QEMU backend and its test guest image (scripts/guest-image.sh).
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v modinfo >/dev/null || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "metald needs these Debian packages: ${need[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
