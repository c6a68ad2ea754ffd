#!/usr/bin/env bash
# Builds metald's test guest image from Debian packages only:
#   build/guest/vmlinuz     Debian's cloud kernel (apt-get download)
#   build/guest/initrd.img  initramfs: metald-init as /init, busybox-static,
#                           the kernel's virtio/button/evdev modules
# Nothing is downloaded from anywhere but the configured Debian mirrors.
# Idempotent: the build is skipped when the kernel package, busybox,
# metald-init and this script are unchanged (build/guest/stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${GUEST_OUT:-build/guest}
cache=$out/cache
mkdir -p "$cache"

need=()
command -v cpio >/dev/null || need+=(cpio)
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static || dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v modinfo >/dev/null || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
  echo "guest-image: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
busybox=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -1)

# The versioned kernel package the cloud metapackage depends on.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "guest-image: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
kver=${kpkg#linux-image-}
deb=$(ls "$cache"/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
  (cd "$cache" && apt-get download "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  deb=$(ls "$cache"/"${kpkg}"_*.deb | head -1)
fi

# metald-init: static, reproducible.
CGO_ENABLED=0 ${GO:-go} build -trimpath -ldflags='-s -w -buildid=' -o "$cache/metald-init" ./cmd/metald-init

stamp=$( { basename "$deb"; sha256sum "$busybox" "$cache/metald-init" scripts/guest-image.sh | cut -d' ' -f1; } | sha256sum | cut -d' ' -f1)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  echo "guest-image: up to date ($kpkg)" >&2
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/k"
kmods=$work/k/lib/modules/$kver

root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,lib/modules/metald}
install -m 0755 "$cache/metald-init" "$root/init"
install -m 0755 "$busybox" "$root/bin/busybox"
for a in $("$busybox" --list); do
  [ "$a" = busybox ] || [ "$a" = init ] || ln -sf busybox "$root/bin/$a"
done
: > "$root/etc/resolv.conf"
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"

# Modules needed by a metald guest, with their dependencies first.
declare -A done_mod=()
order=()
add_mod() {
  local m=$1 f dep
  [ -n "${done_mod[$m]:-}" ] && return 0
  done_mod[$m]=1
  f=$(find "$kmods" -name "$m.ko" -o -name "${m//_/-}.ko" | head -1)
  if [ -z "$f" ]; then
    # Built into the kernel: nothing to load.
    grep -qE "/$m.ko" "$kmods/modules.builtin" 2>/dev/null || echo "guest-image: module $m not found (assuming built in)" >&2
    return 0
  fi
  for dep in $(modinfo -F depends "$f" | tr ',' ' '); do add_mod "$dep"; done
  cp "$f" "$root/lib/modules/metald/"
  order+=("$(basename "$f")")
}
for m in virtio_pci virtio_mmio virtio_net virtio_blk button evdev; do add_mod "$m"; done
printf '%s\n' "${order[@]}" > "$root/lib/modules/metald/order"

install -m 0644 "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible) | gzip -n -6 > "$out/initrd.img.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$stamp" > "$out/stamp"
echo "guest-image: built $out/vmlinuz and $out/initrd.img from $kpkg (modules: ${order[*]})" >&2
