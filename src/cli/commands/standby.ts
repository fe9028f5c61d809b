// `rubato standby`: hold the replica of a protected VM and take over when the primary is lost: the
// guest's NIC joins the bridge of the same name here, its disk is the replica's. With --peer, the
// guest running here after a failover is protected in turn by the standby at that address (the old
// primary's host once repaired: `rubato standby` there), syncing while the guest keeps running.
// SIGTERM/SIGINT: the primary is told (it goes on unprotected); the replica is kept.
import { ensureTapRelay } from '../../setup/index.ts';
import { z } from 'zod';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { logger, onShutdown, RubatoError, errorMessage, isRubatoError, extendShutdownGrace } from '../../util/index.ts';
import {
  type PrimaryController,
  type StandbyEvent,
  loadKeyFile,
  formatProgress,
  type Durability,
} from '../../replication/index.ts';
import { parsePolicy } from '../../scheduler/index.ts';
import {
  restoreIo,
  startPrimarySide,
  standbySide,
  type ProtectedVm,
  checkHostFor,
  claimBeforeStart,
  recordGeneration,
  readActive,
  recordActive,
  retireActive,
  definitionOf,
  activeFile,
  vmDir,
  type ActiveRecord,
} from '../../host/index.ts';
import {
  DURABILITY,
  LINK,
  NO_WITNESS_WARNING,
  OBSERVE,
  WITNESS,
  fencingOf,
  binaryFor,
  withDurabilityOption,
  withObserveOptions,
  eventPrinter,
  hostPort,
  num,
  parseOptions,
  policy,
  withLinkOptions,
  withWitnessOptions,
} from '../options.ts';
import {
  EtcdClient,
  witnessGate,
  guardOwnership,
  type OwnershipGuard,
  KEYS,
  LeasedKeys,
  publishStatus,
  standbyLookup,
} from '../../coord/index.ts';
import { ConsoleServer, DEFAULT_STOP_TIMEOUT_MS, VmName } from '../../qemu/index.ts';
import { openEndpoints, protectHere } from './protected-here.ts';
import { startObserver } from '../../observe/index.ts';

const log = logger('rubato');

const Options = z.object({
  listen: hostPort(true),
  stateDir: z.string(),
  key: z.string(),
  autoFailover: z.boolean(),
  events: z.boolean(),
  fsync: z.boolean(),
  durability: DURABILITY,
  ...OBSERVE,
  peer: z.union([z.literal('auto'), hostPort()]).optional(),
  policy: policy(),
  vm: VmName.optional(),
  stopTimeout: num(0, 3600),
  ...LINK,
  ...WITNESS,
});

export function register(program: Command): void {
  withObserveOptions(withDurabilityOption(withWitnessOptions(withLinkOptions(program.command('standby')))))
    .description('hold the replica of a protected VM and take over when the primary is lost')
    .requiredOption('--listen <host:port>', 'address for the primary to connect to')
    .requiredOption('--key <file>', 'pre-shared key file (rubato keygen)')
    .option('--state-dir <dir>', 'replica and sockets', '/var/lib/rubato/standby')
    .option(
      '--peer <host:port>',
      'after a failover, protect the guest with the standby there (re-protection); auto: the one the witness names (agents)',
    )
    .option(
      '--vm <name>',
      "with --etcd: publish this standby's endpoint for VM NAME in the witness (agents; --listen may use port 0)",
    )
    .option('--policy <spec>', 'checkpoint policy once the guest runs here (with --peer)', 'model')
    .option('--no-auto-failover', 'only fail over on `rubato failover`')
    .option('--no-fsync', 'do not fsync the replica (tmpfs, tests)')
    .option('--events', 'print events as JSON lines on stdout', false)
    .option(
      '--stop-timeout <seconds>',
      'once the guest runs here: on SIGTERM or rubato stop, seconds it has to shut down (ACPI) before it is powered off',
      String(DEFAULT_STOP_TIMEOUT_MS / 1000),
    )
    .action(async (raw: unknown) => runStandby(parseOptions(Options, raw)));
}

async function runStandby(o: z.infer<typeof Options>): Promise<void> {
  const printEvent = eventPrinter(o.events);
  let status: () => Record<string, unknown> = () => ({
    role: 'standby',
    vm: o.vm ?? null,
    fencing: o.etcd ? 'witness' : 'none',
  });
  const observer = await startObserver({
    metrics: o.metrics,
    http: o.http,
    role: 'standby',
    vm: o.vm ?? null,
    title: `standby ${o.vm ? `of VM ${o.vm} ` : ''}on ${o.host}`,
    status: () => status(),
  });
  const emit = (e: object) => {
    printEvent(e);
    observer.event(e);
  };
  if (observer.urls.metrics || observer.urls.dashboard)
    emit({ event: 'observe', metrics: observer.urls.metrics, dashboard: observer.urls.dashboard });
  onShutdown(() => observer.close());
  const psk = loadKeyFile(o.key);
  extendShutdownGrace(o.stopTimeout * 1000); // (SIGTERM waits for a guest that runs here to shut down)
  const fencing = fencingOf(o);
  if (fencing === 'none') log.warn(NO_WITNESS_WARNING);
  emit({ event: 'fencing', fencing });
  const sb = await serveStandby({
    ...o,
    psk,
    stateDir: resolve(o.stateDir),
    emit,
    stopTimeoutMs: o.stopTimeout * 1000,
  });
  status = () => sb.status();
  await new Promise<void>(() => {
    /* runs until a signal ends the process */
  });
}

let lastProgressLogMs = 0;
/** The standby's life in its log (without --events): start, each primary, the sync, losses, takeovers. */
function logLife(e: StandbyEvent): void {
  switch (e.event) {
    case 'listening':
      log.info(
        `standing by on ${e.host}:${e.port}; replica ${e.replicaEpoch === null ? 'empty' : `at checkpoint ${e.replicaEpoch}`}`,
      );
      break;
    case 'session':
      log.info(`primary ${e.peer} connected for VM ${e.vm}`);
      break;
    case 'sync-progress':
      if (Date.now() - lastProgressLogMs >= 5000) {
        lastProgressLogMs = Date.now();
        log.info(`receiving the full image: ${formatProgress(e)}`);
      }
      break;
    case 'synced':
      log.info(`replica complete (${Math.round(e.bytes / 1e6)} MB in ${e.ms} ms): the VM is protected by this host`);
      break;
    case 'primary-lost':
      log.warn(`primary lost: ${e.reason} (replica at checkpoint ${e.epoch ?? 'none'})`);
      break;
    case 'failover-refused':
      log.warn(`not taking over: ${e.why}`);
      break;
    case 'secondary-running':
      log.info(`secondary VM running from checkpoint ${e.epoch} (compare mode)`);
      break;
    default:
      break;
  }
}

export interface ServeStandbyOptions {
  listen: { host: string; port: number };
  stateDir: string;
  psk: Buffer;
  autoFailover: boolean;
  events: boolean;
  fsync: boolean;
  durability: Durability;
  peer?: { host: string; port: number } | 'auto' | undefined;
  policy: string;
  holdMs: number;
  /** With etcd: the VM this standby is for; its endpoint (and, once live, its status) are published in the witness. */
  vm?: string | undefined;
  heartbeatMs: number;
  timeoutMs: number;
  emit: (e: object) => void;
  /** The witness: without it a lost primary is always taken over (two copies can run under a partition). */
  etcd?: string[] | undefined;
  host: string;
  leaseTtl: number;
  /** Once the guest runs here: how long an orderly stop waits for its ACPI shutdown (default 30 s). */
  stopTimeoutMs?: number;
}

/** What `serveStandby` runs: a standby (the guest may run here after a takeover), or the VM brought back here. */
export interface ServedStandby {
  status(): Record<string, unknown>;
  readonly state: string;
}

/**
 * A standby controller (and, after a failover with a peer, the controller re-protecting the guest
 * here), stopped in order on SIGTERM. `rubato protect --listen` becomes one after a switchover.
 */
export async function serveStandby(o: ServeStandbyOptions): Promise<ServedStandby> {
  const { psk, emit, stateDir } = o;
  let primary: PrimaryController | null = null;
  const etcd = o.etcd ? new EtcdClient(o.etcd) : null;
  // The VM ran here since a takeover (its controller restarted): it comes back here, or this host stands by.
  const active = readActive(stateDir);
  if (active) {
    const resumed = await resumeHere(o, active, etcd);
    if (resumed) return resumed;
  }
  if ((o.peer === 'auto' || o.vm) && !(etcd && o.vm))
    throw new RubatoError(
      'RUBATO_CONFIG',
      '--peer auto and --vm go together, with --etcd (the witness names the peer)',
    );
  if (o.listen.port === 0 && !o.vm)
    throw new RubatoError('RUBATO_CONFIG', '--listen: port 0 only with --vm (the witness tells the primary the port)');
  const gate = etcd ? witnessGate(etcd, o.host, o.leaseTtl) : null;
  const io = restoreIo(join(stateDir, 'run'), await ensureTapRelay()); // (the helper built now, not at a failover)
  const published = etcd && o.vm ? new LeasedKeys(etcd, o.leaseTtl) : null;
  let unpublish = () => {};
  let guard: OwnershipGuard | null = null;
  // A restored guest's frames leave only under the lease this side claimed for it (standbySide).
  const standby = standbySide({
    gate,
    listen: o.listen,
    stateDir,
    psk,
    heartbeatMs: o.heartbeatMs,
    timeoutMs: o.timeoutMs,
    binaryFor,
    autoFailover: o.autoFailover,
    fsync: o.fsync,
    durability: o.durability,
    restoreIo: io.prepare,
    controlExtra: { stop: stopSelf },
    statusExtra: () => ({
      fencing: gate ? 'witness' : 'none',
      ...(primary ? { ...primary.snapshot(), role: 'primary' } : {}),
    }),
    onEvent: (e) => {
      emit(e);
      if (!o.events) logLife(e);
      if (e.event !== 'failover') return;
      emit({ event: 'active', qemuPid: standby.vm?.pid ?? null, controllerPid: process.pid });
      if (!o.events) log.warn(`guest running here from checkpoint ${e.epoch}: restore ${e.restoreMs} ms (${e.why})`);
      const vm = standby.vm;
      const hostIo = io.current();
      // The VM lives on this host now: a restart of this controller brings it back here (resume.ts).
      if (vm) {
        const generation = gate ? gate.ownership(vm.spec.name).generation : 0;
        void recordActive(stateDir, vm.spec, hostIo?.nbds.map((s) => s.imagePath) ?? [])
          .then(() => (generation ? recordGeneration(vmDir(stateDir), generation) : undefined))
          .catch((err: unknown) => log.error(`recording the VM that runs here: ${errorMessage(err)}`));
      }
      if (published && o.vm) void published.delete(KEYS.endpoint(o.vm)).catch(() => {}); // not a standby any more
      const ownership = gate && vm ? gate.ownership(vm.spec.name) : null;
      if (!o.peer || !vm || !hostIo) {
        // Not re-protected: the guest runs here alone; the witness still guards it (fenced on a lost
        // lease, stopped once another copy took over).
        if (ownership && vm)
          guard = guardOwnership(ownership, {
            protected: () => false,
            emit,
            stopGuest: () => {
              retireActive(stateDir, `VM ${vm.spec.name} runs elsewhere now`);
              void vm.kill();
            },
          });
        return;
      }
      const peer = o.peer === 'auto' ? standbyLookup(etcd!, vm.spec.name, o.host) : o.peer;
      log.info(
        `re-protecting the guest with ${o.peer === 'auto' ? 'the standby the witness names' : `the standby at ${o.peer.host}:${o.peer.port}`} (unprotected until it answers)`,
      );
      const side = startPrimarySide({
        vm,
        runDir: join(stateDir, 'run'),
        standby: peer,
        psk,
        policy: parsePolicy(o.policy),
        heartbeatMs: o.heartbeatMs,
        timeoutMs: o.timeoutMs,
        io: { relay: hostIo.relay ?? null, nbds: hostIo.nbds },
        ownership,
        more: { holdOnLossMs: o.holdMs },
        onGuardEvent: emit,
        stopGuest: (_why, pr) => {
          retireActive(stateDir, `VM ${vm.spec.name} runs elsewhere now`);
          void pr.crash();
        },
        // (the guest's console lines are the standby controller's events already)
        onEvent: (pe) => {
          if (pe.event !== 'guest') emit(pe.event === 'protecting' ? { ...pe, event: 'reprotected' } : pe);
        },
      });
      primary = side.primary;
      guard = side.guard;
      if (published) unpublish = publishStatus(published, vm.spec.name, o.host, () => side.primary.snapshot());
    },
  });
  // The guest's serial console once it runs here (rubato console VM).
  const console_ = new ConsoleServer(join(stateDir, 'console.sock'), () => standby.vm);
  onShutdown(async () => {
    console_.close();
    guard?.close();
    unpublish();
    await published?.close();
    await primary?.stop();
    // A guest that runs here after a takeover shuts down as a host would do it (it comes back here
    // when this controller starts again: resume.ts); a standby's own guests just stop.
    const vm = standby.state === 'active' ? standby.vm : null;
    if (vm && !vm.exited) {
      await vm.shutdown(o.stopTimeoutMs);
      log.info(`VM ${vm.spec.name} runs here again when this controller starts`);
    }
    await standby.stop();
    await io.current()?.close();
    await gate?.releaseAll();
  });
  await standby.start();
  await console_.start();
  if (published && o.vm)
    await published.put(
      KEYS.endpoint(o.vm),
      JSON.stringify({ host: o.host, address: o.listen.host, port: standby.boundPort }),
    );
  emit({ event: 'started', controllerPid: process.pid });
  return standby;
}

/**
 * The VM ran on this host since a takeover and its controller (this process) started again: with
 * the witness still at the generation this host claimed, the VM boots here from its disk (the
 * newest state here; its memory went with the process) and is protected by the peer; if the
 * witness moved on, this host's copy is stale and it stands by (null). Without a witness nothing
 * can tell whether the VM moved since: refused, with what to do.
 */
async function resumeHere(
  o: ServeStandbyOptions,
  active: ActiveRecord,
  etcd: EtcdClient | null,
): Promise<ServedStandby | null> {
  const { stateDir, emit } = o;
  if (!etcd)
    throw new RubatoError(
      'RUBATO_CONFIG',
      `VM ${active.vm} ran on this host since a takeover (${activeFile(stateDir)}); without a witness (--etcd) Rubato cannot tell whether it moved since: start with --etcd, or move that file away to stand by`,
    );
  const def = definitionOf(active, activeFile(stateDir));
  await checkHostFor(def); // (before the witness is asked)
  let claimed: Awaited<ReturnType<typeof claimBeforeStart>>;
  try {
    claimed = await claimBeforeStart({
      etcd,
      vm: active.vm,
      host: o.host,
      leaseTtlSec: o.leaseTtl,
      stateDir: vmDir(stateDir),
    });
  } catch (e) {
    if (!isRubatoError(e, 'RUBATO_VM_OWNED')) throw e;
    retireActive(stateDir, `VM ${active.vm} moved on since it ran here (${e.message}); standing by`);
    return null;
  }
  const ownership = claimed.ownership;
  log.info(
    `VM ${active.vm} ran on this host since its takeover: it boots here again from its disk (witness generation ${claimed.generation})`,
  );
  emit({ event: 'owner', host: o.host, generation: claimed.generation });
  const peer = o.peer === 'auto' ? standbyLookup(etcd, active.vm, o.host) : (o.peer ?? (async () => null));
  let p: ProtectedVm;
  try {
    p = await protectHere({
      def,
      accel: active.spec.accel,
      binary: await binaryFor(active.spec.accel),
      tapRelay: await ensureTapRelay(),
      stateDir: vmDir(stateDir),
      standby: peer,
      psk: o.psk,
      policy: parsePolicy(o.policy),
      heartbeatMs: o.heartbeatMs,
      timeoutMs: o.timeoutMs,
      ownership,
      primary: { holdOnLossMs: o.holdMs },
      ...(o.stopTimeoutMs !== undefined ? { stopTimeoutMs: o.stopTimeoutMs } : {}),
      emit,
      onOwnershipLost: (why) => retireActive(stateDir, `VM ${active.vm}: ${why}`),
      onEvent: (e) => {
        emit(e.event === 'protecting' ? { ...e, event: 'reprotected' } : e);
        if (!o.events && e.event === 'sync-progress') log.info(`synchronising the standby: ${formatProgress(e)}`);
      },
    });
  } catch (e) {
    await ownership.release();
    throw e;
  }
  emit({
    event: 'resumed',
    vm: active.vm,
    qemuPid: p.vm.pid,
    controllerPid: process.pid,
    generation: claimed.generation,
  });
  const status = () => ({ ...p.primary.snapshot(), role: 'primary', resumed: true });
  const endpoints = await openEndpoints(stateDir, { status, stop: stopSelf }, () => p.vm);
  let shuttingDown = false;
  onShutdown(async () => {
    shuttingDown = true;
    endpoints.close();
    p.guard?.close();
    await p.stop();
    await ownership.release();
    log.info(`VM ${active.vm} stopped; it runs here again when this controller starts`);
  });
  p.vm.once('exit', (r: { code: number | null; signal: string | null }) => {
    if (shuttingDown) return;
    // The guest shut itself down (exit 0): an orderly end, as for `rubato protect`.
    if (r.signal === null && r.code === 0) {
      process.kill(process.pid, 'SIGTERM');
      return;
    }
    // QEMU died on a live host: the standby is told to take over now (primary-side.ts gave the lease up).
    const why = `the guest's QEMU died (${r.signal ?? `exit ${r.code}`})`;
    log.error(`VM ${active.vm}: ${why}`);
    void p.guestLost(why).finally(() => process.kill(process.pid, 'SIGTERM'));
  });
  return { status, state: 'active' };
}

/** `rubato stop`: the controller ends in order, as on SIGTERM (its guest shuts down through ACPI). */
export function stopSelf(): { ok: true; stopping: true } {
  setImmediate(() => process.kill(process.pid, 'SIGTERM'));
  return { ok: true, stopping: true };
}
