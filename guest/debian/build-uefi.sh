#!/usr/bin/env bash
# Builds the UEFI variant of the Debian 12 guest from the BIOS image that build.sh made (its path is
# the one argument), once, cached beside it: a GPT disk with an EFI system partition (FAT32, GRUB
# from Debian's grub-efi-amd64-bin as the removable-media loader EFI/BOOT/BOOTX64.EFI) and the same
# ext4 root file system, copied block for block (its UUID, and so its fstab, stay valid).
# Prints the image's path as its last line. Needs root (loop device, mount).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bios="${1:?usage: build-uefi.sh BIOS_IMAGE}"
cache="${RUBATO_CACHE_DIR:-/var/cache/rubato}/debian"
log() { echo "[debian-uefi] $*" >&2; }
[[ -f "$bios" ]] || { echo "no such image: $bios" >&2; exit 1; }

hash="$( (cat "$here/build-uefi.sh"; echo "$bios"; stat -c '%s %Y' "$bios") | sha256sum | cut -c1-12)"
out="$cache/uefi-$hash"
if [[ -f "$out/disk.img" ]]; then echo "$out/disk.img"; exit 0; fi
mkdir -p "$cache"

SECTOR=512
BIOS_ROOT_START=2048 # build.sh's partition
ESP_START=2048
ESP_SECTORS=$((64 * 1024 * 1024 / SECTOR))
ROOT_START=$((ESP_START + ESP_SECTORS))
root_bytes=$(($(stat -c %s "$bios") - BIOS_ROOT_START * SECTOR))
root_sectors=$((root_bytes / SECTOR))
# The GPT's backup header takes the last 33 sectors; 1 MiB spare keeps the image 4 KiB aligned.
total=$(((ROOT_START + root_sectors) * SECTOR + 1024 * 1024))

work="$(mktemp -d "$cache/build-uefi.XXXXXX")"
mnt="$work/mnt"
loops=()
cleanup() {
  set +e
  mountpoint -q "$mnt" && umount "$mnt"
  for l in "${loops[@]}"; do losetup -d "$l"; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$mnt"
t0=$(date +%s)

img="$work/disk.img"
truncate -s "$total" "$img"
sfdisk -q --label gpt "$img" >&2 <<EOF
start=$ESP_START, size=$ESP_SECTORS, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
start=$ROOT_START, size=$root_sectors, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root
EOF
log "copying the root file system ($((root_bytes / 1024 / 1024)) MiB, sparse)"
dd if="$bios" of="$img" bs=4M iflag=skip_bytes,count_bytes oflag=seek_bytes conv=sparse,notrunc \
  skip=$((BIOS_ROOT_START * SECTOR)) seek=$((ROOT_START * SECTOR)) count="$root_bytes" status=none

# What GRUB boots: read from the root file system (read-only, no journal replay).
rootdev="$(losetup --show -f -r -o $((ROOT_START * SECTOR)) --sizelimit "$root_bytes" "$img")"
loops+=("$rootdev")
uuid="$(blkid -s UUID -o value "$rootdev")"
mount -o ro,noload "$rootdev" "$mnt"
kver="$(ls "$mnt/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)"
umount "$mnt"
[[ -n "$uuid" && -n "$kver" ]] || { echo "no root file system or kernel found in $bios" >&2; exit 1; }

cat > "$work/grub.cfg" <<EOF
set timeout=0
search --no-floppy --fs-uuid --set=root $uuid
linux /boot/vmlinuz-$kver root=UUID=$uuid ro console=ttyS0,115200 net.ifnames=0 quiet
initrd /boot/initrd.img-$kver
boot
EOF
grub-mkstandalone -O x86_64-efi -o "$work/BOOTX64.EFI" \
  --modules="part_gpt ext2 search_fs_uuid linux normal configfile echo" \
  "boot/grub/grub.cfg=$work/grub.cfg" >&2

# The EFI system partition is made with mtools (no vfat mount needed) and put in place.
esp="$work/esp.img"
truncate -s $((ESP_SECTORS * SECTOR)) "$esp"
mkfs.vfat -F 32 -n EFI "$esp" >/dev/null
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
dd if="$esp" of="$img" bs=4M oflag=seek_bytes conv=notrunc seek=$((ESP_START * SECTOR)) status=none

mkdir -p "$out"
mv "$img" "$out/disk.img"
log "built $out/disk.img (GPT, EFI system partition, kernel $kver) in $(($(date +%s) - t0)) s"
echo "$out/disk.img"
