// `rubato protect VM-FILE`: boot the user's VM (its definition file) on this host and keep it
// protected by a standby, as a long-running daemon. The standby unreachable at start is not an
// error: the VM runs, is said to be unprotected once, and is protected as soon as the standby
// answers. SIGTERM/SIGINT stop it in order (the standby keeps its replica and does not take over).
import { z } from 'zod';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { RubatoError, logger, onShutdown, extendShutdownGrace } from '../../util/index.ts';
import { startObserver } from '../../observe/index.ts';
import { DEFAULT_STOP_TIMEOUT_MS, loadVmDefinition } from '../../qemu/index.ts';
import { loadKeyFile, formatProgress } from '../../replication/index.ts';
import { parsePolicy } from '../../scheduler/index.ts';
import { checkHostFor, checkAdoptable, claimBeforeStart, recordAdopted, releaseVm } from '../../host/index.ts';
import { serveStandby, stopSelf } from './standby.ts';
import { openEndpoints, protectHere } from './protected-here.ts';
import { join } from 'node:path';
import {
  DURABILITY,
  LINK,
  MODE,
  withModeOption,
  NO_WITNESS_WARNING,
  OBSERVE,
  WITNESS,
  fencingOf,
  withDurabilityOption,
  withObserveOptions,
  eventPrinter,
  hostPort,
  num,
  parseOptions,
  statusLine,
  platform,
  policy,
  withLinkOptions,
  withWitnessOptions,
} from '../options.ts';
import { EtcdClient, LeasedKeys, publishStatus, standbyLookup } from '../../coord/index.ts';

const log = logger('rubato');

const Options = z.object({
  standby: z.union([z.literal('auto'), hostPort()]),
  key: z.string(),
  policy: policy(),
  stateDir: z.string().optional(),
  events: z.boolean(),
  acceptStaleDisk: z.boolean(),
  listen: hostPort().optional(),
  fsync: z.boolean(),
  durability: DURABILITY,
  stopTimeout: num(0, 3600),
  adopt: z.string().min(1).optional(),
  ...OBSERVE,
  ...LINK,
  ...MODE,
  ...WITNESS,
});

export function register(program: Command): void {
  withObserveOptions(
    withDurabilityOption(
      withWitnessOptions(withModeOption(withLinkOptions(program.command('protect')))),
      'as the new standby after a failover: ',
    ),
  )
    .description('run your VM (a definition file: see examples/) and keep it protected by a standby')
    .argument('<vm-file>', 'VM definition (JSON)')
    .requiredOption(
      '--standby <host:port>',
      'the standby controller (rubato standby on the other host); auto: the one the witness names (agents)',
    )
    .requiredOption('--key <file>', 'pre-shared key file (rubato keygen; the same file on both hosts)')
    .option(
      '--policy <spec>',
      'checkpoint policy: model (default; pre-sends dirty RAM where it pays, model,presend=off to disable), adaptive, fixed:MS, bounded-latency[:MS], …',
      'model',
    )
    .option('--state-dir <dir>', 'sockets, converted disks and state (default /var/lib/rubato/VM-NAME)')
    .option(
      '--listen <host:port>',
      'after a switchover (rubato switchover on the standby), stay on as the new standby listening here',
    )
    .option('--no-fsync', 'as the new standby: do not fsync the replica (tmpfs, tests)')
    .option('--events', 'print events as JSON lines on stdout', false)
    .option(
      '--stop-timeout <seconds>',
      'on SIGTERM or rubato stop: seconds the guest has to shut down (ACPI) before it is powered off',
      String(DEFAULT_STOP_TIMEOUT_MS / 1000),
    )
    .option(
      '--adopt <qmp-socket>',
      'protect the VM that runs now in its own QEMU (this QMP socket; started as rubato qemu-args prints): moved live into Rubato on this host, no reboot',
    )
    .option(
      '--accept-stale-disk',
      'start even if the witness says the VM ran elsewhere since this host last held it (its disk here is older)',
      false,
    )
    .action(async (file: string, raw: unknown) => runProtect(file, parseOptions(Options, raw)));
}

async function runProtect(file: string, o: z.infer<typeof Options>): Promise<void> {
  const def = loadVmDefinition(file);
  if (o.adopt) checkAdoptable(def);
  const psk = loadKeyFile(o.key);
  extendShutdownGrace(o.stopTimeout * 1000); // (SIGTERM waits for the guest's shutdown)
  // Safe by default: a witness, or the user's explicit --no-witness (said once, shown in status).
  const fencing = fencingOf(o);
  // Compare mode runs BIOS VMs with one disk and one NIC today: asked for, it is refused for others;
  // under --mode auto (also an agent's) such a VM is protected in buffer mode, said once.
  const cannotCompare =
    def.disks.length > 1 || def.nics.length > 1 || def.firmware !== 'bios' || def.cloudInit
      ? `compare mode runs BIOS VMs with one disk and one NIC today (${def.name} has ${def.disks.length} disk${def.disks.length === 1 ? '' : 's'}, ${def.nics.length} NIC${def.nics.length === 1 ? '' : 's'}, ${def.firmware}${def.cloudInit ? ', a cloud-init seed' : ''})`
      : null;
  if (o.mode === 'compare' && cannotCompare)
    throw new RubatoError('RUBATO_CONFIG', `--mode compare: ${cannotCompare}; use --mode buffer or auto`);
  const mode = o.mode === 'auto' && cannotCompare ? 'buffer' : o.mode;
  if (mode !== o.mode) log.info(`--mode auto: ${cannotCompare}; protecting it in buffer mode`);
  await checkHostFor(def); // (before the witness is asked and before any disk is converted)
  const { accel, binary, tapRelay } = await platform(def.accelerator);
  const stateDir = resolve(o.stateDir ?? `/var/lib/rubato/${def.name}`);
  const printEvent = eventPrinter(o.events);
  // Started before the guest, so its whole life is in the metrics; the controller's status joins once it exists.
  let status: () => Record<string, unknown> = () => ({ role: 'primary', vm: def.name, protected: false, fencing });
  const observer = await startObserver({
    metrics: o.metrics,
    http: o.http,
    role: 'primary',
    vm: def.name,
    title: `VM ${def.name} on ${o.host}`,
    status: () => status(),
  });
  const emit = (e: object) => {
    printEvent(e);
    observer.event(e);
  };
  if (observer.urls.metrics || observer.urls.dashboard)
    emit({ event: 'observe', metrics: observer.urls.metrics, dashboard: observer.urls.dashboard });
  if (o.standby === 'auto' && !o.etcd)
    throw new RubatoError('RUBATO_CONFIG', '--standby auto needs --etcd (the witness names the standby)');
  if (o.listen && o.standby === 'auto')
    throw new RubatoError(
      'RUBATO_CONFIG',
      '--listen is for a fixed pair; with --standby auto the agents place the standby',
    );
  if (fencing === 'none') log.warn(NO_WITNESS_WARNING);
  emit({ event: 'fencing', fencing });
  const etcd = o.etcd ? new EtcdClient(o.etcd) : null;
  const standby = o.standby === 'auto' ? standbyLookup(etcd!, def.name, o.host) : o.standby;
  const standbyName = o.standby === 'auto' ? 'the standby the witness names' : `${o.standby.host}:${o.standby.port}`;
  // With a witness: this host must hold the VM, from a disk no older than the VM's newest state,
  // before its guest runs (never a second live copy); a loss from here on is heard by the guard.
  const claimed = etcd
    ? await claimBeforeStart({
        etcd,
        vm: def.name,
        host: o.host,
        leaseTtlSec: o.leaseTtl,
        stateDir,
        acceptStaleDisk: o.acceptStaleDisk,
      })
    : null;
  const ownership = claimed?.ownership ?? null;
  if (claimed) emit({ event: 'owner', host: o.host, generation: claimed.generation });
  // (declared before the controller starts: its events may need them at once)
  let ownershipLost: RubatoError | null = null;
  let authRefused: RubatoError | null = null;
  let everProtected = false;
  let fenced = false;
  const p = await protectHere({
    def,
    accel,
    binary,
    tapRelay,
    stateDir,
    standby,
    psk,
    policy: parsePolicy(o.policy),
    heartbeatMs: o.heartbeatMs,
    timeoutMs: o.timeoutMs,
    ownership,
    primary: { holdOnLossMs: o.holdMs, mode },
    stopTimeoutMs: o.stopTimeout * 1000,
    ...(o.adopt ? { adopt: { qmpPath: resolve(o.adopt) } } : {}),
    emit,
    onOwnershipLost: (why) => {
      ownershipLost = new RubatoError(
        'RUBATO_VM_OWNED',
        `VM ${def.name}: ${why}; its guest was stopped so that no second copy can run`,
      );
    },
    onEvent: (e) => {
      emit(e);
      if (e.event === 'protecting') everProtected = true;
      if (e.event === 'fenced') {
        fenced = true;
        void ownership?.release();
      }
      if (e.event === 'unprotected' && !everProtected && /key|authenticat|proof/i.test(e.reason)) {
        authRefused = new RubatoError('RUBATO_AUTH_FAILED', `${standbyName} refused this key (${o.key}): ${e.reason}`);
        void p.stop(0);
      }
      if (!o.events && e.event === 'status') log.info(statusLine(o.policy, e));
      if (!o.events && e.event === 'sync-progress') log.info(`synchronising the standby: ${formatProgress(e)}`);
    },
  });
  status = () => p.primary.snapshot();
  if (p.adopted) {
    const { source, ...m } = p.adopted;
    await recordAdopted(stateDir, def.name, source);
    emit({ event: 'adopted', vm: def.name, fromPid: source.pid, ...m });
  }
  emit({
    event: 'started',
    vm: def.name,
    qemuPid: p.vm.pid,
    controllerPid: process.pid,
    accel,
    disk: p.disks[0]?.path ?? null,
    disks: p.disks.map((d) => d.path),
  });
  // `rubato release`: the guest goes back to its own QEMU; the controller then ends.
  let releasing: ReturnType<typeof releaseVm> | null = null;
  const endpoints = await openEndpoints(
    stateDir,
    {
      status: () => p.primary.snapshot(),
      stop: stopSelf,
      release: async () => {
        const r = await (releasing = releaseVm(p, def, stateDir));
        emit({ event: 'released', vm: def.name, ...r });
        return { ok: true, vm: def.name, ...r };
      },
    },
    () => p.vm,
  );
  // For `rubato vm list` and drains: this copy's protection state in the witness, on its own lease.
  const published = etcd ? new LeasedKeys(etcd, o.leaseTtl) : null;
  const unpublish = published ? publishStatus(published, def.name, o.host, () => p.primary.snapshot()) : () => {};
  let shuttingDown = false;
  onShutdown(async () => {
    shuttingDown = true;
    endpoints.close();
    await observer.close();
    p.guard?.close();
    unpublish();
    await published?.close();
    await p.stop();
    await ownership?.release();
    log.info(`VM ${def.name} stopped; the standby keeps its replica and does not take over`);
  });
  const exit = await new Promise<{ code: number | null; signal: string | null }>((r) => p.vm.once('exit', r));
  // (a failed release left the guest here: its QEMU's end is handled as any below)
  const releasedTo = releasing
    ? await (releasing as ReturnType<typeof releaseVm>).then(
        (r) => r.pid,
        () => null,
      )
    : null;
  if (releasedTo !== null) {
    endpoints.close();
    await observer.close();
    p.guard?.close();
    unpublish();
    await published?.close();
    await ownership?.release();
    log.info(`VM ${def.name} handed back to its own QEMU (pid ${releasedTo}); the protecting controller stops`);
    return;
  }
  const switchover = fenced && o.listen && o.standby !== 'auto';
  if (!switchover) await observer.close(); // (a host that becomes the standby keeps its endpoints)
  endpoints.close();
  p.guard?.close();
  unpublish();
  await published?.close();
  if (ownershipLost) {
    await p.primary.crash();
    throw ownershipLost;
  }
  if (!shuttingDown && !fenced && !authRefused && (exit.signal !== null || exit.code !== 0)) {
    // QEMU died on a live host (not stopped by Rubato, not shut down by the guest): the controller
    // gives the lease up (primary-side.ts) and tells the standby to take over now.
    const why = `the guest's QEMU died (${exit.signal ?? `exit ${exit.code}`})`;
    await p.guestLost(why); // (the controller may have told the standby already: its capture broke first)
    throw new RubatoError(
      'RUBATO_QEMU_EXITED',
      `VM ${def.name}: ${why}; ${everProtected ? 'its standby takes over' : 'no standby held a replica'}`,
    );
  }
  await p.stop();
  await ownership?.release();
  if (authRefused) throw authRefused;
  if (fenced && o.listen && o.standby !== 'auto') {
    // A switchover: the guest runs on the other host now; this host becomes its standby.
    log.info(`VM ${def.name} moved to ${standbyName} (switchover); standing by on ${o.listen.host}:${o.listen.port}`);
    const sb = await serveStandby({
      listen: o.listen,
      stateDir: join(stateDir, 'standby'),
      psk,
      autoFailover: true,
      events: o.events,
      fsync: o.fsync,
      durability: o.durability,
      peer: o.standby,
      policy: o.policy,
      heartbeatMs: o.heartbeatMs,
      timeoutMs: o.timeoutMs,
      holdMs: o.holdMs,
      emit,
      ...(o.etcd ? { etcd: o.etcd } : {}),
      host: o.host,
      leaseTtl: o.leaseTtl,
    });
    status = () => sb.status();
    emit({ event: 'standing-by', listen: `${o.listen.host}:${o.listen.port}`, state: sb.state });
    await new Promise<void>(() => {
      /* runs until a signal ends the process */
    });
  }
  log.warn(
    `VM ${def.name} ${fenced ? 'moved to its standby (switchover)' : 'exited'}; the protecting controller stops`,
  );
}
