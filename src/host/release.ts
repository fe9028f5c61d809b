// `rubato release VM`: an adopted VM handed back to a QEMU of its owner's, the way it came in. The
// owner's command line (recorded at adoption) is started again waiting for the guest (`-incoming
// defer`, detached: it outlives Rubato), its TAPs put on the VM's bridges if nothing did, then
// protection ends and the guest moves over live. A failed move leaves the guest running under Rubato
// (unprotected, said loudly) and the new QEMU ended.

import { closeSync, existsSync, openSync, readdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { RubatoError, disown, logger, runCommand, spawnTracked } from '../util/index.ts';
import { QmpClient, type ResolvedVm } from '../qemu/index.ts';
import { forgetAdopted, incomingArgv, qmpPathOf, readAdopted, tapsOf } from './own-qemu.ts';
import { migrateLocal, type LocalMigration } from './local-migration.ts';
import type { ProtectedVm } from './protect.ts';

const log = logger('release');

export interface Released extends LocalMigration {
  /** The owner's QEMU that runs the guest now. */
  pid: number;
  qmp: string;
}

/** Puts a TAP the owner's QEMU opened on the VM's bridge, when it is on none (a TAP QEMU made itself). */
async function attachTap(tap: string, bridge: string): Promise<void> {
  if (!existsSync(`/sys/class/net/${tap}`)) return;
  if (readdirSync(`/sys/class/net/${tap}`).includes('master')) return;
  const r = await runCommand('ip', ['link', 'set', tap, 'master', bridge, 'up']);
  if (r.code !== 0) throw new RubatoError('RUBATO_NETNS', `putting ${tap} on bridge ${bridge}: ${r.stderr.trim()}`);
}

export async function releaseVm(p: ProtectedVm, def: ResolvedVm, stateDir: string): Promise<Released> {
  const rec = readAdopted(stateDir, def.name);
  const own = qmpPathOf(rec.argv);
  if (!own)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `VM ${def.name}: its own QEMU had no QMP socket to take the guest back through`,
    );
  const qmpPath = resolve(rec.cwd, own);
  const logFile = join(stateDir, 'released-qemu.log');
  const fd = openSync(logFile, 'a', 0o600);
  const proc = spawnTracked(`qemu:${def.name}:own`, rec.exe, incomingArgv(rec.argv), {
    outlive: true,
    cwd: rec.cwd,
    stdio: ['ignore', fd, fd],
  });
  closeSync(fd);
  const qmp = new QmpClient(qmpPath, `${def.name} (its own QEMU, pid ${proc.pid})`);
  try {
    await Promise.race([
      qmp.connect(15_000),
      proc.exited.then(({ code }) => {
        throw new RubatoError(
          'RUBATO_QEMU_START',
          `VM ${def.name}: its own QEMU ended at start (exit ${code}; see ${logFile})`,
        );
      }),
    ]);
    for (const [i, tap] of tapsOf(rec.argv).entries()) {
      const bridge = def.nics[i]?.bridge;
      if (bridge) await attachTap(tap, bridge);
    }
    log.info(`VM ${def.name}: handing the guest back to its own QEMU (pid ${proc.pid})`);
    const moved = await p.handOver((vm) =>
      migrateLocal(vm.qmp, qmp, join(stateDir, 'run', `${def.name}.release`), `releasing VM ${def.name}`),
    );
    disown(proc);
    forgetAdopted(stateDir);
    log.info(
      `VM ${def.name} runs in its own QEMU again (pid ${proc.pid}): ${moved.downtimeMs} ms without the guest running`,
    );
    return { ...moved, pid: proc.pid, qmp: qmpPath };
  } catch (e) {
    await proc.stop(2000);
    throw e;
  } finally {
    qmp.close();
  }
}
