// Pre-shared key files: 32 random bytes as hex. Loaded with checks an operator can act on.

import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { RubatoError } from '../util/errors.ts';
import { logger } from '../util/log.ts';

const log = logger('key');

export function writeKeyFile(path: string): void {
  writeFileSync(path, randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
}

export function loadKeyFile(path: string): Buffer {
  let text: string;
  try { text = readFileSync(path, 'utf8').trim(); } catch (e) {
    throw new RubatoError('RUBATO_CONFIG', `cannot read key file ${path}: ${(e as Error).message} (make one with: rubato keygen --out ${path})`);
  }
  if (!/^[0-9a-fA-F]{32,}$/.test(text)) throw new RubatoError('RUBATO_CONFIG', `key file ${path} must hold at least 16 bytes as hex (make one with: rubato keygen --out ${path})`);
  if ((statSync(path).mode & 0o077) !== 0) log.warn(`key file ${path} is readable by other users; chmod 600 it`);
  return Buffer.from(text, 'hex');
}
