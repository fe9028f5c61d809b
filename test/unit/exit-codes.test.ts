// One table of exit codes: the README's, the CLI's EXIT_CODES and the systemd units agree.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { EXIT_CODES, PERMANENT_EXIT_CODES } from '../../src/util/errors.ts';

const ROOT = join(import.meta.dirname, '..', '..');

function readmeTable(): Map<number, string> {
  const text = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const at = text.indexOf('Exit codes of every command');
  assert.ok(at >= 0, 'the README has its table of exit codes');
  const rows = new Map<number, string>();
  for (const line of text.slice(at).split('\n').slice(1, 40)) {
    const m = line.match(/^\| (\d+) \| (.+) \| (yes|no|—) \|$/);
    if (m) rows.set(Number(m[1]), m[3]!);
  }
  return rows;
}

test('every exit code the CLI uses is in the README table, and the table has no other', () => {
  const rows = readmeTable();
  const used = new Set([0, 1, ...Object.values(EXIT_CODES)]);
  assert.deepEqual(
    [...rows.keys()].sort((a, b) => a - b),
    [...used].sort((a, b) => a - b),
  );
  for (const c of PERMANENT_EXIT_CODES) assert.equal(rows.get(c), 'no', `code ${c}: a restart cannot help`);
  for (const [c, helps] of rows) if (helps === 'no') assert.ok(PERMANENT_EXIT_CODES.includes(c), `code ${c}`);
});

test('the protect and standby units do not restart on the codes a restart cannot cure', () => {
  for (const unit of ['rubato-protect@.service', 'rubato-standby.service']) {
    const text = readFileSync(join(ROOT, 'examples', 'systemd', unit), 'utf8');
    const m = text.match(/^RestartPreventExitStatus=(.+)$/m);
    assert.ok(m, unit);
    assert.deepEqual(m[1]!.trim().split(/\s+/).map(Number), [...PERMANENT_EXIT_CODES], unit);
  }
});
