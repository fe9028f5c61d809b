// The one idempotent setup step: Debian packages, the patched QEMU for TCG, the guest image.
// Prints what it does (long steps show progress); a no-op when everything is in place.

import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runCommand, RubatoError, logger } from '../util/index.ts';
import type { QemuBinary } from '../qemu/index.ts';

const log = logger('setup');
export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const RUBATO_COMMAND = join(REPO_ROOT, 'bin', 'rubato');

/** Debian packages Rubato needs at run time and to build its QEMU and guest. */
export const DEBIAN_PACKAGES = [
  'qemu-system-x86',
  'qemu-utils',
  'busybox-static',
  'cpio',
  'gzip',
  'xz-utils',
  'iproute2',
  'util-linux',
  // build dependencies of the patched QEMU
  'dpkg-dev',
  'libglib2.0-dev',
  'libpixman-1-dev',
  'libfdt-dev',
  'zlib1g-dev',
  'meson',
  'ninja-build',
  'python3-venv',
  'flex',
  'bison',
  'gcc',
  'libc6-dev',
  'make',
  'patch',
  // guest disks and the network topology
  'e2fsprogs',
  // UEFI guests: OVMF, and the cloud-init seed (a FAT volume made without a mount)
  'ovmf',
  'dosfstools',
  'mtools',
  // the witness (a local single-member etcd is the embedded default)
  'etcd-server',
  // the chaos harness's split-brain detector (frames from the guest's MAC on each host's LAN port)
  'tcpdump',
] as const;

let packagesChecked = false;
export async function ensurePackages(): Promise<void> {
  if (packagesChecked) return;
  await installPackages(DEBIAN_PACKAGES);
  packagesChecked = true;
}

/** Installs the Debian packages of `names` that are missing. */
/** dpkg-query's output format (its own ${...} fields, not a template). */
const DPKG_FORMAT = '$' + '{Package} $' + '{db:Status-Abbrev}\n';

async function installPackages(names: readonly string[]): Promise<void> {
  const r = await runCommand('dpkg-query', ['-W', '-f', DPKG_FORMAT, ...names]);
  const ok = new Set(
    r.stdout
      .split('\n')
      .filter((l) => /\sii\s*$/.test(l))
      .map((l) => l.split(' ')[0]),
  );
  const missing = names.filter((p) => !ok.has(p));
  if (!missing.length) return;
  log.info(`installing Debian packages: ${missing.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const up = await runCommand('apt-get', ['update', '-q'], { env });
  if (up.code !== 0)
    throw new RubatoError(
      'RUBATO_SETUP_FAILED',
      `apt-get update failed: ${up.stderr.trim().split('\n').slice(-2).join(' | ')}`,
    );
  const inst = await runCommand('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...missing], { env });
  if (inst.code !== 0)
    throw new RubatoError(
      'RUBATO_SETUP_FAILED',
      `apt-get install failed: ${inst.stderr.trim().split('\n').slice(-3).join(' | ')}`,
    );
}

async function runBuildScript(script: string, what: string, args: string[] = []): Promise<string> {
  const r = await runCommand('bash', [join(REPO_ROOT, script), ...args], {
    onLine: (l) => {
      if (l.trim()) log.info(`${what}: ${l.replace(/^\[[a-z-]+\] /, '')}`);
    },
  });
  const last = r.stdout.trim().split('\n').at(-1) ?? '';
  if (r.code !== 0 || !last) {
    throw new RubatoError(
      'RUBATO_SETUP_FAILED',
      `${what} build failed (exit ${r.code}): ${r.stderr.trim().split('\n').slice(-4).join(' | ')}`,
    );
  }
  return last;
}

let patched: QemuBinary | null = null;
/** The QEMU with Rubato's TCG fixes (built once, cached outside the work tree). */
export async function ensurePatchedQemu(): Promise<QemuBinary> {
  if (patched) return patched;
  await ensurePackages();
  const path = await runBuildScript('qemu-patches/build.sh', 'patched QEMU');
  patched = { path, firmwareDirs: ['/usr/share/qemu', '/usr/share/seabios'], presend: true, trigger: true };
  return patched;
}

export function stockQemu(): QemuBinary {
  return { path: '/usr/bin/qemu-system-x86_64', firmwareDirs: [] };
}

export interface GuestImage {
  kernel: string;
  initrd: string;
}
let guest: GuestImage | null = null;
export async function ensureGuestImage(): Promise<GuestImage> {
  if (guest) return guest;
  await ensurePackages();
  const dir = await runBuildScript('guest/build.sh', 'guest image');
  const g = { kernel: join(dir, 'vmlinuz'), initrd: join(dir, 'initrd.img') };
  if (!existsSync(g.kernel) || !existsSync(g.initrd))
    throw new RubatoError('RUBATO_SETUP_FAILED', `guest image incomplete in ${dir}`);
  guest = g;
  return g;
}

/** Packages the Debian guest image is built with. */
const DEBIAN_GUEST_PACKAGES = [
  'mmdebstrap',
  'extlinux',
  'syslinux-common',
  'fdisk',
  'e2fsprogs',
  'openssl',
  // its UEFI variant
  'grub-efi-amd64-bin',
  'dosfstools',
  'mtools',
] as const;

let debianImage: string | null = null;
/** The Debian 12 guest disk (guest/debian/build.sh): built once from Debian packages, cached. */
export async function ensureDebianImage(): Promise<string> {
  if (debianImage) return debianImage;
  await ensurePackages();
  await installPackages(DEBIAN_GUEST_PACKAGES);
  const path = await runBuildScript('guest/debian/build.sh', 'Debian guest');
  if (!existsSync(path)) throw new RubatoError('RUBATO_SETUP_FAILED', `Debian guest image missing: ${path}`);
  debianImage = path;
  return path;
}

let debianUefiImage: string | null = null;
/**
 * The Debian 12 guest's UEFI variant (guest/debian/build-uefi.sh): the same root file system on a
 * GPT disk with an EFI system partition (GRUB), made from the BIOS image once, cached.
 */
export async function ensureDebianUefiImage(): Promise<string> {
  if (debianUefiImage) return debianUefiImage;
  const bios = await ensureDebianImage();
  const path = await runBuildScript('guest/debian/build-uefi.sh', 'Debian UEFI guest', [bios]);
  if (!existsSync(path)) throw new RubatoError('RUBATO_SETUP_FAILED', `Debian UEFI guest image missing: ${path}`);
  debianUefiImage = path;
  return path;
}

/** The stock clients of the services benchmark (pgbench ships with the server package on Debian 12). */
export const SERVICE_CLIENT_PACKAGES = ['redis-tools', 'wrk', 'postgresql-client-15', 'postgresql-15'] as const;

let serviceClients = false;
/** redis-benchmark, wrk and pgbench on this host; the PostgreSQL server that comes with pgbench is not started. */
export async function ensureServiceClients(): Promise<void> {
  if (serviceClients) return;
  await ensurePackages();
  const policy = '/usr/sbin/policy-rc.d';
  const ours = !existsSync(policy);
  // Debian's way to keep a package's service from starting on install (exit 101: not allowed).
  if (ours) writeFileSync(policy, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
  try {
    await installPackages(SERVICE_CLIENT_PACKAGES);
  } finally {
    if (ours) rmSync(policy, { force: true });
  }
  serviceClients = true;
}

/** What the tests drive an operator's terminal with (`rubato console` through tmux). */
export const TEST_TOOL_PACKAGES = ['tmux'] as const;
export async function ensureTestTools(): Promise<void> {
  await installPackages(TEST_TOOL_PACKAGES);
}

/** libvirt, for `rubato import --libvirt`'s test (a domain made by `virsh define`). */
export const LIBVIRT_PACKAGES = ['libvirt-daemon-system', 'libvirt-clients'] as const;
export async function ensureLibvirt(): Promise<void> {
  await installPackages(LIBVIRT_PACKAGES);
}

/** Headless Chromium from Debian: the dashboard's browser test drives it with playwright-core. */
export const BROWSER_PACKAGES = ['chromium'] as const;
let browser: string | null = null;
export async function ensureBrowser(): Promise<string> {
  if (browser) return browser;
  await installPackages(BROWSER_PACKAGES);
  const path = ['/usr/bin/chromium', '/usr/lib/chromium/chromium'].find((p) => existsSync(p));
  if (!path)
    throw new RubatoError(
      'RUBATO_SETUP_FAILED',
      "Debian's chromium package is installed but no chromium binary was found",
    );
  browser = path;
  return path;
}

let tapRelay: string | null = null;
/** The small C TAP relay (Node cannot open TAP devices), built once into the cache. */
export async function ensureTapRelay(): Promise<string> {
  if (tapRelay) return tapRelay;
  await ensurePackages();
  const src = join(REPO_ROOT, 'src', 'io', 'net', 'taprelay.c');
  const hash = createHash('sha256').update(readFileSync(src)).digest('hex').slice(0, 12);
  const dir = join(process.env['RUBATO_CACHE_DIR'] ?? '/var/cache/rubato', 'tools');
  const out = join(dir, `taprelay-${hash}`);
  if (!existsSync(out)) {
    mkdirSync(dir, { recursive: true });
    log.info('building the TAP relay helper');
    const r = await runCommand('gcc', ['-O2', '-Wall', '-Werror', '-o', `${out}.tmp`, src]);
    if (r.code !== 0) throw new RubatoError('RUBATO_SETUP_FAILED', `building taprelay failed: ${r.stderr.trim()}`);
    renameSync(`${out}.tmp`, out);
  }
  tapRelay = out;
  return out;
}

/** Everything: used by `rubato setup`, the tests and the demo. */
export async function ensureAll(): Promise<{ qemu: QemuBinary; guest: GuestImage }> {
  await ensurePackages();
  const [qemu, g] = [await ensurePatchedQemu(), await ensureGuestImage()];
  await ensureTapRelay();
  return { qemu, guest: g };
}
