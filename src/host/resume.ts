// A VM that runs on the host that took it over is an ordinary VM of that host: when its controller
// restarts (by its unit, after a reboot) the VM comes back here, from the newest state here (the
// replica's disk, which the guest has written since), never as a second copy (the witness's
// generation must still be the one this host claimed at the takeover).
//
// The record: STATE/vm/active.json, written at the takeover; STATE/vm/generation beside it. It goes
// (renamed *.stale) once the witness shows the VM moved on.

import { join } from 'node:path';
import { existsSync, readFileSync, renameSync, statSync } from 'node:fs';
import { z } from 'zod';
import { RubatoError, ensurePrivateDir, writePrivateAtomic, logger } from '../util/index.ts';
import { VmSpecSchema, diskBuses, nicsOf, type ResolvedVm, type VmSpec } from '../qemu/index.ts';

const log = logger('resume');
const MAX_RECORD_BYTES = 64 * 1024;

/** The folder of the VM that runs (or ran) on a standby's host after a takeover. */
export const vmDir = (stateDir: string): string => join(stateDir, 'vm');
const activeFile = (stateDir: string) => join(vmDir(stateDir), 'active.json');

const ActiveSchema = z
  .object({
    vm: z.string(),
    spec: z.unknown(),
    /** The images the guest runs on here (the replica's disks), in its order: up to 16, a cloud-init seed, a UEFI store. */
    disks: z.array(z.string()).max(18),
    /** When this host took it over (ms since the epoch). */
    since: z.number(),
  })
  .strict();

export interface ActiveRecord {
  vm: string;
  spec: VmSpec;
  disks: string[];
  since: number;
}

/** Written when this host takes the VM over (the spec without the replica's RAM file). */
export async function recordActive(stateDir: string, spec: VmSpec, disks: string[]): Promise<void> {
  ensurePrivateDir(vmDir(stateDir));
  const { ramFile: _ram, ...plain } = spec;
  const rec: ActiveRecord = { vm: spec.name, spec: plain, disks, since: Date.now() };
  await writePrivateAtomic(activeFile(stateDir), Buffer.from(`${JSON.stringify(rec, null, 2)}\n`), true);
}

/** The VM this host runs since a takeover, or null. A record Rubato did not write is a typed error. */
export function readActive(stateDir: string): ActiveRecord | null {
  const f = activeFile(stateDir);
  if (!existsSync(f)) return null;
  const bad = (why: string) =>
    new RubatoError('RUBATO_CONFIG', `${f}: ${why} (move it away to stand by with an empty replica)`, { file: f });
  if (statSync(f).size > MAX_RECORD_BYTES) throw bad('too large to be a record Rubato wrote');
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(f, 'utf8'));
  } catch (e) {
    throw bad(`not JSON: ${(e as Error).message}`);
  }
  const r = ActiveSchema.safeParse(raw);
  if (!r.success) throw bad(`not a record Rubato wrote: ${r.error.issues[0]?.message ?? 'invalid'}`);
  const spec = VmSpecSchema.safeParse(r.data.spec);
  if (!spec.success || spec.data.name !== r.data.vm)
    throw bad(`its VM description is invalid: ${spec.error?.issues[0]?.message ?? 'name differs'}`);
  for (const d of r.data.disks) if (!existsSync(d)) throw bad(`its disk ${d} is gone`);
  if (r.data.disks.length !== diskBuses(spec.data).length) throw bad('its disks do not match its VM description');
  return { vm: r.data.vm, spec: spec.data, disks: r.data.disks, since: r.data.since };
}

/** The VM moved on (the witness says so): the record is kept aside, this host stands by again. */
export function retireActive(stateDir: string, why: string): void {
  const f = activeFile(stateDir);
  if (!existsSync(f)) return;
  renameSync(f, `${f}.stale`);
  log.warn(`${why}; ${f} kept as ${f}.stale`);
}

/** The definition to boot the VM from its state on this host (a fresh boot from its disk). */
export function definitionOf(rec: ActiveRecord, file: string): ResolvedVm {
  const s = rec.spec;
  const buses = diskBuses(s);
  const disks: ResolvedVm['disks'] = [];
  let uefiVars: string | undefined;
  for (const [i, path] of rec.disks.entries()) {
    const bus = buses[i] ?? 'virtio';
    // A UEFI VM's variable store (the flash its firmware wrote) comes back as its store; a
    // cloud-init seed is an ordinary disk of the guest by now.
    if (bus === 'pflash') uefiVars = path;
    else disks.push({ path, format: 'raw', sizeBytes: statSync(path).size, bus });
  }
  return {
    file,
    name: s.name,
    cpus: s.cpus,
    memoryMiB: s.memMb,
    accelerator: s.accel,
    firmware: s.uefiCode ? 'uefi' : 'bios',
    ...(uefiVars ? { uefiVars } : {}),
    disks,
    nics: nicsOf(s).map((n) => ({ bridge: n.bridge, mac: n.mac, ...(n.vlan ? { vlan: n.vlan } : {}) })),
    ...(s.nicEventIdx === false ? { nicEventIdx: false } : {}),
    boot: s.kernel
      ? { kernel: s.kernel, ...(s.initrd ? { initrd: s.initrd } : {}), append: s.append ?? '' }
      : { from: 'disk' },
  };
}

export { activeFile };
