// Restore: a fresh QEMU with the same machine description, its RAM the replica image
// (memory-backend-file, share=on, ignored by migration through x-ignore-shared), loads the
// checkpoint's device state from a stream Rubato writes, then runs. The replica image file
// becomes the guest's RAM: pass a copy to keep the replica.

import { connect } from 'node:net';
import { join } from 'node:path';
import { RubatoError, errorMessage, logger } from '../util/index.ts';
import { encodeDeviceOnlyStream } from './stream-format.ts';
import { QemuVm, type QemuBinary } from './vm.ts';
import type { VmSpec } from './spec.ts';

const log = logger('restore');

export interface RestoreInput {
  /** The VM description; its ramFile is the RAM image to run from. */
  spec: VmSpec & { ramFile: string };
  machine: string;
  deviceState: Buffer;
}

export interface RestoreResult {
  vm: QemuVm;
  /** Spawn → guest running. */
  restoreMs: number;
  /** Of it: spawn → QMP ready (the process and its machine), and the device state loaded. */
  startMs: number;
  loadMs: number;
}

export interface RestoreStart {
  /** The VM description; its ramFile is the RAM image to run from. */
  spec: VmSpec & { ramFile: string };
  binary: QemuBinary;
  runDir: string;
  tag?: string;
  netSocket?: string;
  /** The NICs' relay sockets, in the guest's order. */
  netSockets?: readonly string[];
  /** The disks' NBD sockets, in the guest's order. */
  nbdSockets?: readonly string[];
}

/**
 * A QEMU waiting for its checkpoint (incoming mode, paused, its RAM the replica's file): it runs no
 * guest code, so it may be started before this host may run the guest (while a claim is asked).
 */
export interface StartedRestore {
  vm: QemuVm;
  startMs: number;
  tag: string;
  runDir: string;
}

/** Starts the QEMU of a restore (spawn → QMP ready); `loadAndRun` ends it. */
export async function startRestore(o: RestoreStart): Promise<StartedRestore> {
  const t0 = performance.now();
  const tag = o.tag ?? `${o.spec.name}-restored`;
  const vm = await QemuVm.start(o.spec, {
    binary: o.binary,
    runDir: o.runDir,
    incoming: true,
    tag,
    ...(o.netSocket ? { netSocket: o.netSocket } : {}),
    ...(o.nbdSockets ? { nbdSockets: o.nbdSockets } : {}),
    ...(o.netSockets ? { netSockets: o.netSockets } : {}),
  });
  return { vm, startMs: performance.now() - t0, tag, runDir: o.runDir };
}

export async function restoreVm(input: RestoreInput, opts: Omit<RestoreStart, 'spec'>): Promise<RestoreResult> {
  return loadAndRun(await startRestore({ ...opts, spec: input.spec }), input);
}

/** Loads the checkpoint's device state into a started restore and runs the guest (a failure stops its QEMU). */
export async function loadAndRun(
  started: StartedRestore,
  input: { spec: { name: string }; machine: string; deviceState: Buffer },
): Promise<RestoreResult> {
  const t0 = performance.now();
  const { vm, startMs, tag } = started;
  try {
    await vm.qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'x-ignore-shared', state: true },
        { capability: 'events', state: true },
      ],
    });
    const sock = join(started.runDir, `${tag}.in`);
    await vm.qmp.execute('migrate-incoming', { uri: `unix:${sock}` });
    const stream = encodeDeviceOnlyStream(input.machine, input.deviceState);
    await new Promise<void>((resolve, reject) => {
      const s = connect(sock);
      s.once('error', reject);
      s.end(stream, () => resolve());
    });
    const until = Date.now() + 15_000;
    for (;;) {
      const m = await vm.qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
      if (m.status === 'completed') break;
      if (m.status === 'failed')
        throw new RubatoError(
          'RUBATO_RESTORE_FAILED',
          `VM ${input.spec.name}: loading the checkpoint failed: ${m['error-desc'] ?? vm.stderrTail.trim().split('\n').slice(-2).join(' | ')}`,
        );
      if (Date.now() > until)
        throw new RubatoError(
          'RUBATO_RESTORE_FAILED',
          `VM ${input.spec.name}: loading the checkpoint did not finish within 15 s`,
        );
      if (vm.exited)
        throw new RubatoError(
          'RUBATO_RESTORE_FAILED',
          `VM ${input.spec.name}: QEMU exited while loading the checkpoint: ${vm.stderrTail.trim().split('\n').slice(-2).join(' | ')}`,
        );
      await new Promise((r) => setTimeout(r, 5));
    }
    const loadMs = performance.now() - t0;
    await vm.qmp.execute('cont');
    const restoreMs = startMs + performance.now() - t0;
    log.info(`VM ${input.spec.name} restored and running`, {
      restoreMs: restoreMs.toFixed(1),
      startMs: startMs.toFixed(1),
      loadMs: loadMs.toFixed(1),
    });
    return { vm, restoreMs, startMs, loadMs };
  } catch (e) {
    await vm.stop();
    if (e instanceof RubatoError) throw e;
    throw new RubatoError(
      'RUBATO_RESTORE_FAILED',
      `VM ${input.spec.name}: restore failed: ${errorMessage(e)}`,
      {},
      { cause: e },
    );
  }
}
