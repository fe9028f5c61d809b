// Temporary folders that Rubato makes: tracked and removed on exit, on error and on test failure.
// RAM files go to /dev/shm (tmpfs) so that the replica check reads them at memory speed.

import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const dirs = new Set<string>();
let hooked = false;

export function makeTempDir(prefix = 'rubato-', base?: string): string {
  if (!hooked) {
    hooked = true;
    process.on('exit', () => {
      for (const d of dirs) rmSync(d, { recursive: true, force: true });
    });
  }
  const root = base ?? (existsSync('/dev/shm') ? '/dev/shm' : tmpdir());
  const dir = mkdtempSync(join(root, prefix));
  dirs.add(dir);
  return dir;
}

export function removeTempDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  dirs.delete(dir);
}

export function liveTempDirs(): string[] {
  return [...dirs];
}
