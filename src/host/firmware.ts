// What a UEFI VM boots through on this host: OVMF's code from Debian's ovmf package (read-only,
// shared by every VM; a standby finds it at the same path when it takes over) and the VM's own
// variable store, which its firmware writes (boot entries, the guest's variables). The store is a
// disk of the VM as Rubato sees it (flash 1, the last disk): served by Rubato's NBD server,
// replicated with the checkpoints, restored with the replica.

import { copyFileSync, existsSync, renameSync, statSync, chmodSync } from 'node:fs';
import { join } from 'node:path';
import { RubatoError, ensurePrivateDir, logger } from '../util/index.ts';
import type { ResolvedVm } from '../qemu/index.ts';

const log = logger('firmware');
const OVMF_DIR = '/usr/share/OVMF';
/** Debian's builds without Secure Boot (which would need SMM and the q35 machine), 4 MiB first. */
const OVMF_BUILDS = [
  { code: 'OVMF_CODE_4M.fd', vars: 'OVMF_VARS_4M.fd' },
  { code: 'OVMF_CODE.fd', vars: 'OVMF_VARS.fd' },
] as const;

export interface Ovmf {
  code: string;
  /** The empty variable store a new VM starts from. */
  varsTemplate: string;
}

/** OVMF on this host, or a one-line error saying what to install. */
export function findOvmf(dir = OVMF_DIR): Ovmf {
  for (const b of OVMF_BUILDS) {
    const code = join(dir, b.code);
    const varsTemplate = join(dir, b.vars);
    if (existsSync(code) && existsSync(varsTemplate)) return { code, varsTemplate };
  }
  throw new RubatoError(
    'RUBATO_SETUP_FAILED',
    `"firmware": "uefi" needs OVMF, and ${dir} has none: install Debian's ovmf package (rubato setup does)`,
  );
}

/** The variable store the VM runs with: the definition's own, or the one Rubato keeps in STATE/uefi. */
export function uefiVarsFor(def: ResolvedVm, stateDir: string, ovmf: Ovmf): string {
  const size = statSync(ovmf.varsTemplate).size;
  if (def.uefiVars) {
    const own = statSync(def.uefiVars).size;
    if (own !== size)
      throw new RubatoError(
        'RUBATO_CONFIG',
        `${def.file}: uefiVars: ${def.uefiVars} is ${own} bytes, but this host's OVMF (${ovmf.code}) uses a ${size}-byte store`,
        { file: def.file, field: 'uefiVars' },
      );
    return def.uefiVars;
  }
  const dir = join(stateDir, 'uefi');
  ensurePrivateDir(dir);
  const file = join(dir, `${def.name}.vars.fd`);
  if (!existsSync(file)) {
    const tmp = `${file}.partial`;
    copyFileSync(ovmf.varsTemplate, tmp);
    chmodSync(tmp, 0o600);
    renameSync(tmp, file);
    log.info(`VM ${def.name}: a new UEFI variable store ${file} (from ${ovmf.varsTemplate})`);
  }
  return file;
}
