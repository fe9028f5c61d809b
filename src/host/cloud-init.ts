// A cloud-init NoCloud seed for a VM's first boot: a small FAT volume labelled CIDATA holding the
// definition's user-data and meta-data, attached as one more disk (after the VM's own). cloud-init
// in the guest finds it by its label. It is made with dosfstools and mtools (no mount), again at each
// start from the files the definition names, and replicated like every disk of the VM.

import { createHash } from 'node:crypto';
import { chmodSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RubatoError, ensurePrivateDir, makeTempDir, removeTempDir, runCommand } from '../util/index.ts';
import type { ResolvedVm } from '../qemu/index.ts';

/** The seed's size: FAT12 with room for user data up to the definition's 1 MiB bound. */
const SEED_BYTES = 4 * 1024 * 1024;

/** The meta-data cloud-init gets when the definition gives none: the VM's name as instance and host. */
export function defaultMetaData(name: string): string {
  return `instance-id: rubato-${name}\nlocal-hostname: ${name}\n`;
}

/** Builds STATE/cloud-init/NAME-seed.img for `def` (which has cloudInit) and returns its path. */
export async function cloudInitSeed(def: ResolvedVm, stateDir: string): Promise<string> {
  const ci = def.cloudInit;
  if (!ci) throw new Error(`VM ${def.name} has no cloud-init data`);
  const dir = join(stateDir, 'cloud-init');
  ensurePrivateDir(dir);
  const seed = join(dir, `${def.name}-seed.img`);
  const tmp = `${seed}.partial`;
  const files = makeTempDir('rubato-seed-');
  try {
    const userData = join(files, 'user-data');
    const metaData = join(files, 'meta-data');
    writeFileSync(userData, readFileSync(ci.userData));
    writeFileSync(metaData, ci.metaData ? readFileSync(ci.metaData) : defaultMetaData(def.name));
    rmSync(tmp, { force: true });
    const volumeId = createHash('sha256').update(def.name).digest('hex').slice(0, 8);
    const run = async (cmd: string, args: string[]) => {
      const r = await runCommand(cmd, args);
      if (r.code !== 0)
        throw new RubatoError(
          'RUBATO_SETUP_FAILED',
          `building the cloud-init seed for ${def.name}: ${cmd} failed: ${r.stderr.trim().split('\n').at(-1) ?? `exit ${r.code}`}`,
        );
    };
    await run('mkfs.vfat', ['-C', '-n', 'CIDATA', '-i', volumeId, tmp, String(SEED_BYTES / 1024)]);
    chmodSync(tmp, 0o600);
    await run('mcopy', ['-i', tmp, userData, metaData, '::/']);
    renameSync(tmp, seed);
    return seed;
  } finally {
    rmSync(tmp, { force: true });
    removeTempDir(files);
  }
}
