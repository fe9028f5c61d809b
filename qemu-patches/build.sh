#!/usr/bin/env bash
# Builds qemu-system-x86_64 from Debian's QEMU source package with Rubato's patches
# (x86_64-softmmu only) and caches it outside the work tree, keyed by source version + patch hash.
# Prints the path of the binary as its last line. Idempotent: a cached build is reused.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${RUBATO_CACHE_DIR:-/var/cache/rubato}/qemu"
mkdir -p "$cache"
log() { echo "[qemu-build] $*" >&2; }

apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
cat > "$apt_dir/sources.list" <<SRC
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm-updates main
deb-src http://deb.debian.org/debian-security bookworm-security main
SRC
aptopt=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)

# Match the source version to the installed stock QEMU where possible (same firmware, same
# machine types); otherwise take the newest source the archive offers.
installed="$(dpkg-query -W -f '${source:Version}' qemu-system-x86 2>/dev/null || true)"
if [[ ! -s "$apt_dir/lists/lock" && -z "$(ls "$apt_dir/lists" 2>/dev/null | grep -v partial || true)" ]]; then
  log "fetching the Debian source index (private apt configuration)"
  apt-get "${aptopt[@]}" update -q >&2
fi
versions="$(apt-cache "${aptopt[@]}" showsrc qemu 2>/dev/null | awk '/^Version:/{print $2}')"
if [[ -z "$versions" ]]; then
  apt-get "${aptopt[@]}" update -q >&2
  versions="$(apt-cache "${aptopt[@]}" showsrc qemu | awk '/^Version:/{print $2}')"
fi
version=""
if [[ -n "$installed" ]] && grep -qxF "$installed" <<<"$versions"; then version="$installed"; fi
if [[ -z "$version" ]]; then version="$(sort -V <<<"$versions" | tail -n1)"; fi
[[ -n "$version" ]] || { log "no QEMU source package found in Debian's archive"; exit 1; }

patch_hash="$(cat "$here"/*.patch | sha256sum | cut -c1-12)"
key="$(tr ':+~' '___' <<<"$version")-$patch_hash"
out="$cache/$key"
if [[ -x "$out/qemu-system-x86_64" ]]; then echo "$out/qemu-system-x86_64"; exit 0; fi

work="$cache/build-$key.$$"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
log "building patched QEMU $version (patches $patch_hash) in $work — about 4 minutes on 2 cores"
( cd "$work" && apt-get "${aptopt[@]}" source -q "qemu=$version" >&2 )
src="$(find "$work" -maxdepth 1 -type d -name 'qemu-*' | head -n1)"
for p in "$here"/*.patch; do
  log "applying $(basename "$p")"
  patch -d "$src" -p1 --forward --quiet < "$p" >&2
done
mkdir -p "$src/build"
( cd "$src/build" && ../configure --target-list=x86_64-softmmu --disable-docs --disable-werror \
    --disable-tools --disable-guest-agent --disable-sdl --disable-gtk --disable-vnc --disable-spice \
    --disable-opengl --disable-virglrenderer --disable-curses --disable-cocoa --disable-xen \
    --enable-replication --disable-user > "$work/configure.log" 2>&1 ) \
  || { tail -n 30 "$work/configure.log" >&2; exit 1; }
log "compiling (ninja -j$(nproc))"
( cd "$src/build" && ninja -j"$(nproc)" qemu-system-x86_64 2>&1 | awk '/^\[[0-9]+\/[0-9]+\]/{ if (NR % 200 == 0) { print "[qemu-build] " $1 > "/dev/stderr" } next } { print > "/dev/stderr" }' )
[[ -x "$src/build/qemu-system-x86_64" ]] || { log "build produced no binary"; exit 1; }
mkdir -p "$out.tmp"
cp "$src/build/qemu-system-x86_64" "$out.tmp/"
echo "$version" > "$out.tmp/SOURCE_VERSION"
rm -rf "$out"; mv "$out.tmp" "$out"
log "cached at $out"
echo "$out/qemu-system-x86_64"
