#!/usr/bin/env bash
# Builds the Rubato test guest: Debian's cloud kernel + a busybox initramfs holding the static C
# workload programs of guest/src. Cached outside the work tree, keyed by the sources and the
# kernel version; prints the folder holding vmlinuz and initrd.img as its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${RUBATO_CACHE_DIR:-/var/cache/rubato}/guest"
log() { echo "[guest-build] $*" >&2; }
mkdir -p "$cache"

resolve_kernel() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
kpkg="$(resolve_kernel)"
if [[ -z "$kpkg" ]]; then
  log "package lists do not know linux-image-cloud-amd64: running apt-get update"
  apt-get update -q >&2 || true
  kpkg="$(resolve_kernel)"
fi
[[ -n "$kpkg" ]] || { log "cannot resolve linux-image-cloud-amd64 from Debian's archive"; exit 1; }
kver="$(apt-cache policy "$kpkg" | awk '/Candidate:/{print $2}')"
src_hash="$( (cd "$here" && cat build.sh src/*; echo "$kpkg $kver") | sha256sum | cut -c1-12)"
out="$cache/$src_hash"
if [[ -f "$out/vmlinuz" && -f "$out/initrd.img" ]]; then echo "$out"; exit 0; fi

work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "downloading $kpkg $kver"
( cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1 ) || { log "apt-get download $kpkg failed"; exit 1; }
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/k"
krel="${kpkg#linux-image-}"
moddir="$work/k/lib/modules/$krel"

root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,data,lib/modules}
cp /bin/busybox "$root/bin/busybox"
log "compiling workload programs"
for c in "$here"/src/*.c; do
  gcc -static -O2 -Wall -Werror -o "$root/bin/$(basename "$c" .c)" "$c"
done
install -m 0755 "$here/src/init" "$root/init"

# Modules the guest needs (virtio NIC and disk, ext2 via ext4, efivarfs under UEFI), with their dependencies, in load order.
wanted=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk crc16 mbcache jbd2 ext4 efivarfs)
: > "$root/etc/modules"
for m in "${wanted[@]}"; do
  f="$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)"
  [[ -n "$f" ]] || continue
  case "$f" in *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;; *) cp "$f" "$root/lib/modules/$m.ko" ;; esac
  echo "$m" >> "$root/etc/modules"
done

log "packing initramfs"
( cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 ) > "$work/initrd.img"
mkdir -p "$out.tmp"
cp "$work/k/boot/vmlinuz-$krel" "$out.tmp/vmlinuz"
cp "$work/initrd.img" "$out.tmp/initrd.img"
echo "$kpkg $kver" > "$out.tmp/KERNEL"
rm -rf "$out"; mv "$out.tmp" "$out"
log "cached at $out"
echo "$out"
