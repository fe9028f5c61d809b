import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadKeyFile, writeKeyFile } from '../../src/replication/keyfile.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { isRubatoError } from '../../src/util/errors.ts';

test('keygen: 0600, never over an existing key without --force, never through a symlink; wrong lengths refused', (t) => {
  const dir = makeTempDir();
  t.after(() => removeTempDir(dir));
  const k = join(dir, 'psk');
  const old = process.umask(0);
  try {
    writeKeyFile(k);
  } finally {
    process.umask(old);
  }
  assert.equal(statSync(k).mode & 0o777, 0o600);
  assert.equal(loadKeyFile(k).length, 32);
  const before = readFileSync(k, 'utf8');
  assert.throws(
    () => writeKeyFile(k),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG') && /exists/.test(e.message),
  );
  assert.equal(readFileSync(k, 'utf8'), before, 'the key is kept');
  writeKeyFile(k, { force: true });
  assert.notEqual(readFileSync(k, 'utf8'), before);
  const target = join(dir, 'elsewhere');
  symlinkSync(target, join(dir, 'link'));
  assert.throws(
    () => writeKeyFile(join(dir, 'link')),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG'),
  );
  const short = join(dir, 'short');
  writeFileSync(short, `${'a'.repeat(33)}\n`, { mode: 0o600 });
  assert.throws(
    () => loadKeyFile(short),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG') && /exactly 32 bytes/.test(e.message),
  );
  chmodSync(k, 0o644);
  assert.throws(
    () => loadKeyFile(k),
    (e: unknown) => isRubatoError(e, 'RUBATO_CONFIG') && /chmod 600/.test(e.message),
  );
});
