// Pre-shared key files: exactly 32 random bytes as 64 hex digits, in a file only its owner may
// read. Written without following symlinks and never over an existing key unless asked to;
// loaded with checks an operator can act on.

import { randomBytes } from 'node:crypto';
import { closeSync, constants, openSync, readFileSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { RubatoError } from '../util/index.ts';

export const KEY_BYTES = 32;

export function writeKeyFile(path: string, opts: { force?: boolean } = {}): void {
  if (opts.force) {
    try {
      unlinkSync(path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }
  let fd: number;
  try {
    fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST')
      throw new RubatoError(
        'RUBATO_CONFIG',
        `${path} exists; not replacing a key (rubato keygen --force --out ${path} replaces it, and both hosts need the new one)`,
      );
    throw new RubatoError('RUBATO_CONFIG', `cannot create key file ${path}: ${(e as Error).message}`);
  }
  try {
    writeSync(fd, `${randomBytes(KEY_BYTES).toString('hex')}\n`);
  } finally {
    closeSync(fd);
  }
}

export function loadKeyFile(path: string): Buffer {
  let text: string;
  try {
    text = readFileSync(path, 'utf8').trim();
  } catch (e) {
    throw new RubatoError(
      'RUBATO_CONFIG',
      `cannot read key file ${path}: ${(e as Error).message} (make one with: rubato keygen --out ${path})`,
    );
  }
  if (!new RegExp(`^[0-9a-fA-F]{${KEY_BYTES * 2}}$`).test(text)) {
    throw new RubatoError(
      'RUBATO_CONFIG',
      `key file ${path} must hold exactly ${KEY_BYTES} bytes as ${KEY_BYTES * 2} hex digits (make one with: rubato keygen --out ${path})`,
    );
  }
  const mode = statSync(path).mode & 0o777;
  if ((mode & 0o077) !== 0)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `key file ${path} is open to other users (mode ${mode.toString(8)}); chmod 600 it`,
    );
  return Buffer.from(text, 'hex');
}
