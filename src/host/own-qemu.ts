// The VM as its owner runs it without Rubato: the QEMU command line Rubato can adopt later, what a
// recorded command line names (its QMP socket, its TAPs), and the record that hands an adopted VM
// back the way it came (`rubato release`).

import { createHash } from 'node:crypto';
import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { RubatoError, writePrivateAtomic } from '../util/index.ts';
import { qemuArgs, type VmSpec } from '../qemu/index.ts';
import type { AdoptSource } from './adopt.ts';

/** Where a QEMU command line puts its QMP socket (-qmp unix:PATH,…, or -chardev socket + -mon control). */
export function qmpPathOf(argv: readonly string[]): string | null {
  const chardevs = new Map<string, string>();
  for (let i = 0; i < argv.length - 1; i++) {
    if (argv[i] === '-chardev') {
      const o = argv[i + 1]!;
      const id = /(?:^|,)id=([^,]+)/.exec(o)?.[1];
      const path = /(?:^|,)path=([^,]+)/.exec(o)?.[1];
      if (o.startsWith('socket') && id && path) chardevs.set(id, path);
    }
  }
  for (let i = 0; i < argv.length - 1; i++) {
    const a = argv[i];
    const o = argv[i + 1]!;
    if ((a === '-qmp' || a === '-qmp-pretty') && o.startsWith('unix:')) return o.slice(5).split(',')[0]!;
    if (a === '-mon' && /(?:^|,)mode=control/.test(o)) {
      const id = /(?:^|,)chardev=([^,]+)/.exec(o)?.[1];
      if (id && chardevs.has(id)) return chardevs.get(id)!;
    }
  }
  return null;
}

/** The TAP devices a QEMU command line names (-netdev tap,ifname=…). */
export function tapsOf(argv: readonly string[]): string[] {
  const taps: string[] = [];
  for (let i = 0; i < argv.length - 1; i++)
    if (argv[i] === '-netdev' && argv[i + 1]!.startsWith('tap,')) {
      const name = /(?:^|,)ifname=([^,]+)/.exec(argv[i + 1]!)?.[1];
      if (name) taps.push(name);
    }
  return taps;
}

/** The TAP name the owner's QEMU uses for NIC `i` of VM `name` (printed with its command line). */
export const ownTapName = (name: string, i: number): string =>
  `rbo${createHash('sha256').update(name).digest('hex').slice(0, 8)}n${i}`;

/**
 * The QEMU command line (after the binary) that runs the VM as its owner would, without Rubato, in
 * a way Rubato can adopt: the same machine and devices as Rubato's QEMU, its disks' image files,
 * TAPs by name (made and put on their bridges by the owner), QMP and serial on unix sockets.
 */
export function ownQemuArgs(
  spec: VmSpec,
  o: { qmpSocket: string; serialSocket: string; diskFiles: readonly string[]; taps: readonly string[] },
): string[] {
  return qemuArgs(
    spec,
    {
      qmpSocket: o.qmpSocket,
      serialSocket: o.serialSocket,
      firmwareDirs: [],
      own: { diskFiles: o.diskFiles, taps: o.taps },
    },
    { paused: false, incoming: false },
  );
}

const AdoptedSchema = z
  .object({
    vm: z.string(),
    /** The owner's QEMU: its binary, command line and working folder, to hand the VM back the same way. */
    exe: z.string(),
    argv: z.array(z.string().max(64 * 1024)).max(4096),
    cwd: z.string(),
    at: z.number(),
  })
  .strict();
export type AdoptedRecord = z.infer<typeof AdoptedSchema>;
const adoptedFile = (stateDir: string) => join(stateDir, 'adopted.json');

/** Written once Rubato runs the adopted VM: how to hand it back (`rubato release`). */
export async function recordAdopted(stateDir: string, vm: string, source: AdoptSource): Promise<void> {
  const rec: AdoptedRecord = { vm, exe: source.exe, argv: source.argv, cwd: source.cwd, at: Date.now() };
  await writePrivateAtomic(adoptedFile(stateDir), Buffer.from(`${JSON.stringify(rec, null, 2)}\n`), true);
}

export function readAdopted(stateDir: string, vm: string): AdoptedRecord {
  const f = adoptedFile(stateDir);
  if (!existsSync(f))
    throw new RubatoError('RUBATO_CONFIG', `VM ${vm} was not adopted from a QEMU of its own: rubato stop ends it`);
  if (statSync(f).size > 1 << 20) throw new RubatoError('RUBATO_CONFIG', `${f}: too large to be a record Rubato wrote`);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(f, 'utf8'));
  } catch (e) {
    throw new RubatoError('RUBATO_CONFIG', `${f}: not JSON (${(e as Error).message})`);
  }
  const r = AdoptedSchema.safeParse(raw);
  if (!r.success || r.data.vm !== vm)
    throw new RubatoError('RUBATO_CONFIG', `${f}: not a record Rubato wrote for VM ${vm}`);
  return r.data;
}

export function forgetAdopted(stateDir: string): void {
  rmSync(adoptedFile(stateDir), { force: true });
}

/** The owner's command line to start the VM again, waiting for it (`-incoming defer`). */
export function incomingArgv(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-daemonize' || a === '-S') continue;
    if (a === '-incoming') {
      i++;
      continue;
    }
    out.push(a);
  }
  return [...out, '-incoming', 'defer'];
}
