// Before a guest runs on this host: hold its VM in the witness, and never from a disk older than
// the VM's newest state. The generation this host last held is kept per VM in its state folder;
// if the witness's is newer, the VM failed over (or moved) elsewhere since, and this host's disk
// is stale: no copy starts here (the host may protect it again as its standby).

import { join } from 'node:path';
import { existsSync, readFileSync } from 'node:fs';
import { RubatoError, ensurePrivateDir, writePrivateAtomic } from '../util/index.ts';
import { type EtcdClient, Ownership, currentGeneration, currentOwner } from '../coord/index.ts';

const GENERATION_FILE = 'generation';

/** The witness generation this host last held for the VM whose state folder is `stateDir` (0: never). */
export function heldGeneration(stateDir: string): number {
  const f = join(stateDir, GENERATION_FILE);
  if (!existsSync(f)) return 0;
  const n = Number(readFileSync(f, 'utf8').trim());
  return Number.isInteger(n) && n >= 0 ? n : 0;
}

export async function recordGeneration(stateDir: string, generation: number): Promise<void> {
  await writePrivateAtomic(join(stateDir, GENERATION_FILE), Buffer.from(`${generation}\n`), true);
}

export interface ClaimOptions {
  etcd: EtcdClient;
  vm: string;
  host: string;
  leaseTtlSec: number;
  stateDir: string;
  /** Start even when the witness's generation is newer than this host's (the operator knows the disk is current). */
  acceptStaleDisk?: boolean;
}

/** Claims the VM for this host before its guest starts; refuses (RUBATO_VM_OWNED) a held VM or a stale disk. */
export async function claimBeforeStart(o: ClaimOptions): Promise<{ ownership: Ownership; generation: number }> {
  ensurePrivateDir(o.stateDir);
  const etcd = o.etcd;
  const mine = heldGeneration(o.stateDir);
  const witness = await currentGeneration(etcd, o.vm);
  if (witness > mine && !o.acceptStaleDisk) {
    const cur = await currentOwner(etcd, o.vm).catch(() => null);
    throw new RubatoError(
      'RUBATO_VM_OWNED',
      `VM ${o.vm} is at generation ${witness} in the witness${cur ? ` (on ${cur.host})` : ''}, this host last held ${mine || 'none'}: its disk here is older; not starting a copy (protect it again from here with rubato standby, or --accept-stale-disk)`,
    );
  }
  const ownership = new Ownership(etcd, o.vm, o.host, o.leaseTtlSec);
  const generation = await ownership.claim();
  if (generation === null) {
    const cur = await currentOwner(etcd, o.vm).catch(() => null);
    throw new RubatoError(
      'RUBATO_VM_OWNED',
      `VM ${o.vm} runs on ${cur?.host ?? 'another host'} (generation ${cur?.generation ?? '?'}) according to the witness; not starting a second copy`,
    );
  }
  await recordGeneration(o.stateDir, generation);
  return { ownership, generation };
}
