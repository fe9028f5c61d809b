#!/usr/bin/env bash
# Builds the Debian 12 guest disk image from Debian packages, once, cached outside the work tree:
# an 8 GiB sparse raw disk with an MBR partition table and extlinux, so that it boots through the
# firmware like any user's image; systemd, a serial console, a static address on the test LAN
# (10.231.0.10/24, eth0; eth1 10.231.1.10/24 when there), redis-server, nginx-light and postgresql installed and enabled.
# Prints the image's path as its last line. Needs root (loop device, mount).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${RUBATO_CACHE_DIR:-/var/cache/rubato}/debian"
log() { echo "[debian-guest] $*" >&2; }
mkdir -p "$cache"

SIZE_GIB=8
PACKAGES=systemd-sysv,udev,linux-image-cloud-amd64,iproute2,ifupdown,procps,extlinux,redis-server,nginx-light,postgresql,netbase
hash="$( (cd "$here" && cat build.sh && find files -type f | sort | xargs cat; echo "$PACKAGES $SIZE_GIB") | sha256sum | cut -c1-12)"
out="$cache/$hash"
if [[ -f "$out/disk.img" ]]; then echo "$out/disk.img"; exit 0; fi

mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
work="$(mktemp -d "$cache/build.XXXXXX")"
mnt="$work/mnt"
loopdev=""
cleanup() {
  set +e
  mountpoint -q "$mnt" && umount "$mnt"
  [[ -n "$loopdev" ]] && losetup -d "$loopdev"
  rm -rf "$work"
}
trap cleanup EXIT

t0=$(date +%s)
log "mmdebstrap bookworm from $mirror (minbase + $PACKAGES)"
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
  --customize-hook='chroot "$1" systemctl enable redis-server nginx postgresql >/dev/null 2>&1 || true' \
  bookworm "$work/root.tar" "$mirror" >&2
log "root file system: $(du -h "$work/root.tar" | cut -f1) in $(( $(date +%s) - t0 )) s"

img="$work/disk.img"
truncate -s "${SIZE_GIB}G" "$img"
echo 'start=2048, type=83, bootable' | sfdisk -q "$img" >&2
loopdev="$(losetup --show -f -o $((2048 * 512)) "$img")"
mkfs.ext4 -q -L rubato-root "$loopdev"
uuid="$(blkid -s UUID -o value "$loopdev")"
mkdir -p "$mnt"
mount "$loopdev" "$mnt"
tar -C "$mnt" -xf "$work/root.tar"

# Configuration: files/ holds what is installed as is; the rest is written here.
cp -a "$here/files/." "$mnt/"
echo "UUID=$uuid / ext4 defaults,errors=remount-ro 0 1" > "$mnt/etc/fstab"
echo rubato-debian > "$mnt/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 rubato-debian\n' > "$mnt/etc/hosts"
kver="$(ls "$mnt/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)"
mkdir -p "$mnt/boot/extlinux"
cat > "$mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 1
PROMPT 0
LABEL debian
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=UUID=$uuid ro console=ttyS0,115200 net.ifnames=0 quiet
EOF
extlinux --install "$mnt/boot/extlinux" >&2 2>/dev/null
chroot "$mnt" systemctl enable rubato-ready.service rubato-disk2.service serial-getty@ttyS0.service >/dev/null 2>&1
chroot "$mnt" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service >/dev/null 2>&1 || true
# Services listen on the LAN; the test LAN is private to the host.
sed -i 's/^bind .*/bind 0.0.0.0/; s/^protected-mode yes/protected-mode no/' "$mnt/etc/redis/redis.conf"
pgconf="$(ls -d "$mnt"/etc/postgresql/*/main | head -1)"
echo "listen_addresses = '*'" >> "$pgconf/postgresql.conf"
echo "host all all 10.231.0.0/24 trust" >> "$pgconf/pg_hba.conf"
text() { ( set +o pipefail; head -c "$1" /dev/urandom | base64 -w 76 | head -c "$1" ); }
text 4096 > "$mnt/var/www/html/4k.html"
text 102400 > "$mnt/var/www/html/100k.html"
echo '<html><body>rubato debian guest</body></html>' > "$mnt/var/www/html/index.html"
passwd_hash="$(openssl passwd -6 rubato 2>/dev/null || echo '*')"
chroot "$mnt" usermod -p "$passwd_hash" root
umount "$mnt"
losetup -d "$loopdev"
loopdev=""
dd if=/usr/lib/EXTLINUX/mbr.bin of="$img" bs=440 count=1 conv=notrunc status=none

mkdir -p "$out"
mv "$img" "$out/disk.img"
log "built $out/disk.img: ${SIZE_GIB} GiB, $(du -h "$out/disk.img" | cut -f1) allocated, in $(( $(date +%s) - t0 )) s"
echo "$out/disk.img"
