// Files that hold guest memory, keys or control sockets: private to their owner (folders 0700,
// files 0600, whatever the umask), created without following symlinks, and written atomically
// where a torn write would be read back (temp file, fsync, rename, fsync of the folder).

import { constants, lstatSync, mkdirSync, chmodSync, openSync, closeSync, fsyncSync } from 'node:fs';
import { open, rename } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { RubatoError } from './errors.ts';

const CREATE = constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW;

/**
 * Makes `dir` (and its parents) if missing and checks it is a real folder owned by this user that
 * no one else may write; a folder of ours is made 0700. Refuses anything else with a clear error.
 */
export function ensurePrivateDir(dir: string, what = 'state folder'): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (st.isSymbolicLink() || !st.isDirectory())
    throw new RubatoError('RUBATO_CONFIG', `${what} ${dir} is not a folder (a symlink or a file); give a real folder`);
  const uid = process.getuid?.() ?? st.uid;
  if (st.uid !== uid)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `${what} ${dir} belongs to user ${st.uid}, not to this user (${uid}); use a folder of your own`,
    );
  if ((st.mode & 0o022) !== 0) {
    throw new RubatoError(
      'RUBATO_CONFIG',
      `${what} ${dir} is writable by other users (mode ${(st.mode & 0o777).toString(8)}); chmod 700 it`,
    );
  }
  if ((st.mode & 0o077) !== 0) chmodSync(dir, 0o700);
}

/** Opens `path` for writing, created 0600 and never through a symlink. */
export async function openPrivate(path: string, flags: number = CREATE) {
  try {
    return await open(path, flags, 0o600);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ELOOP')
      throw new RubatoError('RUBATO_CONFIG', `${path} is a symlink; Rubato does not write through symlinks`);
    throw e;
  }
}

/** Writes `data` to a private file (0600), fsynced when `durable`. */
export async function writePrivate(path: string, data: Buffer | readonly Buffer[], durable: boolean): Promise<void> {
  const fh = await openPrivate(path);
  try {
    // A list is written as it is (one gathered write, no joined copy).
    if (Buffer.isBuffer(data)) await fh.write(data, 0, data.length, 0);
    else await fh.writev(data as Buffer[], 0);
    if (durable) await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Replaces `path` atomically: a private temp file, fsync, rename, fsync of the folder (when durable). */
export async function writePrivateAtomic(path: string, data: Buffer, durable: boolean): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.tmp`);
  await writePrivate(tmp, data, durable);
  await rename(tmp, path);
  if (durable) fsyncDir(dirname(path));
}

/** Makes a rename (or a new file) in `dir` durable. */
export function fsyncDir(dir: string): void {
  const fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
