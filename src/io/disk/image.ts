// A user's disk image made ready for protection. Raw images are served in place by Rubato's NBD
// server (writes land in the user's file, as with their own QEMU). A qcow2 image is converted once
// to a sparse raw file in the state folder (`qemu-img convert`): Rubato replicates the guest's
// writes block by block, which qcow2's metadata would only get in the way of, and the user's
// qcow2 is never written (it stays bootable by their own QEMU, as it was at protection time).
// An image some other process holds (QEMU locks its images) or another Rubato protects is refused.

import { existsSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { ensurePrivateDir, RubatoError, runCommand, logger } from '../../util/index.ts';

const log = logger('disk');
const LOCK_DIR = process.env['RUBATO_LOCK_DIR'] ?? '/run/rubato/locks';

export interface PreparedDisk {
  /** The raw image the guest runs on. */
  path: string;
  sizeBytes: number;
  /** The user's image, when a conversion made `path`. */
  convertedFrom?: string;
  /** Releases Rubato's claim on the image. */
  release(): void;
}

/** Locks on the image's inode held by other processes (QEMU takes OFD locks on its images). */
export function foreignLocks(path: string): string[] {
  const st = statSync(path);
  let text = '';
  try {
    text = readFileSync('/proc/locks', 'utf8');
  } catch {
    return [];
  }
  const dev = `${(Math.floor(st.dev / 256) & 0xfff).toString(16).padStart(2, '0')}:${((st.dev & 0xff) | ((st.dev >> 12) & 0xfff00)).toString(16).padStart(2, '0')}:${st.ino}`;
  return text.split('\n').filter((l) => l.split(/\s+/).includes(dev));
}

function claim(path: string): () => void {
  ensurePrivateDir(LOCK_DIR, 'lock folder');
  const st = statSync(path);
  const lock = join(LOCK_DIR, `${st.dev}-${st.ino}.pid`);
  if (existsSync(lock)) {
    const pid = Number(readFileSync(lock, 'utf8').trim());
    let alive = false;
    try {
      if (pid > 0) {
        process.kill(pid, 0);
        alive = true;
      }
    } catch {
      alive = false;
    }
    if (alive && pid !== process.pid)
      throw new RubatoError(
        'RUBATO_IMAGE_IN_USE',
        `disk image ${path} is already protected by Rubato (process ${pid})`,
        { path, pid },
      );
  }
  writeFileSync(lock, `${process.pid}\n`, { mode: 0o600 });
  return () => rmSync(lock, { force: true });
}

/** Raw images as they are, qcow2 converted once into `stateDir`; refused when in use elsewhere. */
export async function prepareDisk(
  disk: { path: string; format: 'raw' | 'qcow2' },
  stateDir: string,
  vmName: string,
  /** The disk's place in the VM (its converted file's name carries it from the second disk on). */
  index = 0,
  /** The VM runs now in its own QEMU, which holds the image's lock until it hands the guest over. */
  adopting = false,
): Promise<PreparedDisk> {
  if (adopting && disk.format !== 'raw')
    throw new RubatoError(
      'RUBATO_CONFIG',
      `disk image ${disk.path} is ${disk.format}: a running VM is adopted from raw images only (its QEMU writes the ${disk.format} until the handover)`,
      { path: disk.path },
    );
  const locks = adopting ? [] : foreignLocks(disk.path);
  if (locks.length)
    throw new RubatoError(
      'RUBATO_IMAGE_IN_USE',
      `disk image ${disk.path} is in use (locked by another process: is a QEMU running it?)`,
      { path: disk.path },
    );
  if (disk.format === 'raw') {
    const release = claim(disk.path);
    return { path: disk.path, sizeBytes: statSync(disk.path).size, release };
  }
  const dir = join(stateDir, 'disks');
  ensurePrivateDir(dir);
  const raw = join(dir, `${vmName}-${index ? `${index}-` : ''}${basename(disk.path).replace(/\.qcow2$/, '')}.raw`);
  if (existsSync(raw)) {
    log.warn(
      `using ${raw}, converted earlier from ${disk.path}: the VM runs on it (the qcow2 is not written; delete the raw file to convert it again)`,
    );
  } else {
    log.info(`converting ${disk.path} (qcow2) once to the sparse raw image ${raw}; the qcow2 itself is left as it is`);
    const tmp = `${raw}.partial`;
    for (const f of readdirSync(dir)) if (f.endsWith('.partial')) rmSync(join(dir, f), { force: true });
    const r = await runCommand(
      'qemu-img',
      ['convert', '-p', '-U', '-f', 'qcow2', '-O', 'raw', '-S', '4k', disk.path, tmp],
      {
        onLine: (l) => {
          const m = l.match(/\(([\d.]+)\/100%\)/);
          if (m) log.debug(`converting: ${m[1]} %`);
        },
      },
    );
    if (r.code !== 0) {
      rmSync(tmp, { force: true });
      throw new RubatoError(
        'RUBATO_CONFIG',
        `converting ${disk.path} to raw failed: ${r.stderr.trim().split('\n').at(-1) ?? `exit ${r.code}`}`,
      );
    }
    renameSync(tmp, raw);
  }
  const size = statSync(raw).size;
  if (size % 4096 !== 0)
    throw new RubatoError('RUBATO_CONFIG', `${disk.path}: virtual size ${size} is not a multiple of 4096`);
  const release = claim(raw);
  return { path: raw, sizeBytes: size, convertedFrom: disk.path, release };
}
