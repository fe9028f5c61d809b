// The standby controller: accepts one authenticated primary (a StandbySession per link), keeps the
// replica store, and when the primary is lost asks the activation gate, then starts the guest from
// the last committed checkpoint. Its state changes only through the table in standby-state.ts.
// It never applies a partial checkpoint and never runs two guests.

import { createServer, type Server, type Socket } from 'node:net';
import { existsSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { ensurePrivateDir, writePrivateAtomic, RubatoError, errorMessage, logger, Wakeup } from '../util/index.ts';
import { join } from 'node:path';
import { ReplicaBuilder, ReplicaStore, type Durability } from './replica-store.ts';
import { Link } from './link.ts';
import { acceptHandshake } from './handshake.ts';
import { Admission, DEFAULT_ADMISSION } from './admission.ts';
import { FrameType } from './protocol/frame.ts';
import { IdentitySchema, type Identity, type Layout } from './protocol/messages.ts';
import { ControlSocket, type ControlHandlers } from './control-socket.ts';
import { StandbySession, type BaseReceiver, type SyncProgress } from './standby-session.ts';
import {
  STANDBY_TRANSITIONS,
  acceptsPrimary,
  nextStandbyState,
  type StandbyInput,
  type StandbyState,
} from './standby-state.ts';
import { allowAlways, type ActivationGate } from './activation.ts';
import {
  restoreVm,
  startRestore,
  loadAndRun,
  MAIN_RAM_ID,
  type QemuBinary,
  type QemuVm,
  type Accel,
  type StartedRestore,
} from '../qemu/index.ts';
import type { NbdServer, NetRelay } from '../io/index.ts';
import { SecondaryRunner, copyImage } from './secondary-runner.ts';
import { DISK_BLOCK_ID } from './primary.ts';

const log = logger('standby');
const HANDSHAKE_TIMEOUT_MAX_MS = 5000;
/** A refused activation is asked for again this often while the primary stays away. */
const GATE_RETRY_MS = 500;
/** While waiting for a lost primary's return, how often the witness is asked whether it gave the VM up. */
const RELEASED_POLL_MS = 30;
/** A failed secondary is started again this long after it failed (doubled per restart since the full image). */
const SECONDARY_RESTART_MS = 3000;
const SECONDARY_RESTART_MAX_MS = 5 * 60_000;

export type { StandbyState } from './standby-state.ts';

export type StandbyEvent =
  | { event: 'listening'; host: string; port: number; replicaEpoch: number | null }
  | { event: 'session'; peer: string; vm: string }
  | SyncProgress
  | { event: 'synced'; ms: number; bytes: number }
  | { event: 'committed'; epoch: number; bytes: number; pages: number }
  /** A restore's QEMU started ahead waits, paused, for a failover (`startMs`: how long it took to start). */
  | { event: 'spare-ready'; startMs: number }
  | { event: 'primary-lost'; reason: string; epoch: number | null; atMs: number }
  | {
      event: 'failover';
      epoch: number;
      detectedAtMs: number;
      runningAtMs: number;
      restoreMs: number;
      /** Where the time from detection to a running guest went (ms, in order): the gate, the replica settling, the guest started. */
      phasesMs: { gate: number; settle: number; qemuReady: number; run: number };
      /** A spare QEMU was ready when the failover began (only the checkpoint's device state was loaded into it). */
      spare: boolean;
      why: string;
      /** Compare mode: the running secondary went on as the guest (no restore). */
      promoted: boolean;
    }
  | { event: 'failover-refused'; why: string }
  /** Compare mode: the secondary VM runs beside the replica (replies can be compared from now on). */
  | { event: 'secondary-running'; epoch: number; startMs: number }
  | { event: 'secondary-restart'; restarts: number; why: string }
  | { event: 'guest'; line: string; atMs: number };

/** A restored guest's I/O as the standby needs it: the sockets QEMU connects to, and how to undo it. */
export interface PreparedIo {
  netSockets: string[];
  nbdSockets: string[];
  close?: () => Promise<void>;
}

export interface StandbyOptions {
  host: string;
  port: number;
  stateDir: string;
  psk: Buffer;
  heartbeatMs: number;
  timeoutMs: number;
  binaryFor: (accel: Accel) => Promise<QemuBinary>;
  gate?: ActivationGate;
  autoFailover?: boolean;
  fsync?: boolean;
  /** When a checkpoint is acknowledged (default memory: complete in memory, written behind). */
  durability?: Durability;
  onEvent?: (e: StandbyEvent) => void;
  /**
   * Sets up the guest's NIC relay and disk server for a restore (called only once a failover
   * begins: while the gate is asked, so that it overlaps the claim). `close` undoes it when no
   * guest came to use it (the primary came back).
   */
  prepareRestore?: (
    identity: Identity,
    store: ReplicaStore,
    existing?: { relay?: NetRelay | undefined; nbds?: readonly NbdServer[] | undefined },
  ) => Promise<PreparedIo>;
  /** Fault injection for tests: runs after a commit, before its ack is sent. */
  beforeAck?: (epoch: number) => Promise<void>;
  /** More for `rubato status` (the controller protecting the guest after a failover adds its view). */
  statusExtra?: () => Record<string, unknown>;
  /** More commands on the control socket (the CLI's `stop`). */
  controlExtra?: ControlHandlers;
}

export class StandbyController {
  /**
   * The restored guest's I/O and its QEMU waiting, paused, for the checkpoint: a spare started once
   * the replica takes checkpoints (its RAM is the replica's file, shared, so it sees every
   * checkpoint applied), or at the latest when the primary's link is lost. A failover only loads the
   * device state into it and runs it: starting QEMU is the longest step of a restore (about 0.3 s
   * under TCG, more on a loaded host). Consumed by a failover; undone when the replica is replaced
   * (a new image), the primary stops in order, or the standby stops.
   */
  private early: Promise<EarlyRestore> | null = null;
  /** The undoing of the last one (a new one waits for it: the same TAP and sockets). */
  private earlyUndone: Promise<void> = Promise.resolve();
  /** The early restore whose QEMU is up (a spare is ready while it is still `early`). */
  private readyEarly: Promise<EarlyRestore> | null = null;
  private get spareReady(): boolean {
    return this.early !== null && this.readyEarly === this.early;
  }
  private server: Server | null = null;
  private control: ControlSocket | null = null;
  private link: Link | null = null;
  private store: ReplicaStore | null = null;
  private identity: Identity | null = null;
  private st: StandbyState = 'waiting';
  vm: QemuVm | null = null;
  private binary: QemuBinary | null = null;
  private readonly emit: (e: StandbyEvent) => void;
  private readonly admission = new Admission(DEFAULT_ADMISSION);
  /** A primary relied on this replica and has not said goodbye: its silence means failover. */
  private guarding = false;
  private lastFailover: { epoch: number; at: string; ms: number; why: string } | null = null;
  /** Input mirrored while the full image arrives, for the secondary that starts from it. */
  private earlyInput: { epoch: number; payload: Buffer }[] = [];
  /** Compare mode: the secondary VM run beside the replica (null in buffer mode). */
  private secondary: SecondaryRunner | null = null;
  /** Secondaries started again since the full image (each waits twice as long as the one before). */
  private secondaryRestarts = 0;
  /** Woken when an authenticated primary connects (a wait to see whether a lost one comes back ends). */
  private readonly primaryReturned = new Wakeup();

  constructor(private readonly o: StandbyOptions) {
    this.emit = o.onEvent ?? (() => {});
  }

  get state(): StandbyState {
    return this.st;
  }

  /**
   * The fencing token: once a primary with witness generation G (or this side's own claim of G)
   * was seen, a primary with an older generation, or with none, is refused — it no longer holds
   * the VM, and a replica acknowledging it could let stale output out.
   */
  private highestGeneration = 0;
  private staleGeneration(id: Identity): string | null {
    if (this.highestGeneration === 0) return null;
    if (id.generation === undefined)
      return `VM ${id.vm} is fenced by the witness at generation ${this.highestGeneration}; a primary without a generation is refused`;
    if (id.generation < this.highestGeneration)
      return `stale generation ${id.generation} for VM ${id.vm}: the witness is at ${this.highestGeneration} (this primary no longer holds the VM)`;
    return null;
  }

  /**
   * A primary of another VM would overwrite the replica this side holds: refused (move the state folder aside to reuse
   * it).
   */
  private otherVm(id: Identity): string | null {
    if (!this.identity || !this.store || this.identity.vm === id.vm) return null;
    return `this standby holds the replica of VM ${this.identity.vm}; a primary of VM ${id.vm} is refused (use another --state-dir for it)`;
  }

  /**
   * The replica was recovered after a restart under memory durability: acks may have run ahead of
   * its files before the restart, so it never goes live (the fault simulator's
   * "live-older-than-acked"); the next full image from the primary clears it.
   */
  private recoveredMayLag = false;

  /** A handshake must complete within this (then its socket is closed). */
  private get handshakeTimeoutMs(): number {
    return Math.min(this.o.timeoutMs * 5, HANDSHAKE_TIMEOUT_MAX_MS);
  }

  private go(input: StandbyInput): void {
    this.st = nextStandbyState(this.st, input, { hasReplica: this.store !== null });
  }

  /** A transition a primary's frame asks for: refused (the session ends), not asserted, when this side moved on. */
  private goFromPeer(input: StandbyInput): void {
    this.refuseUnlessAllowed(input);
    this.go(input);
  }

  private refuseUnlessAllowed(input: StandbyInput): void {
    if (!STANDBY_TRANSITIONS[input].from.includes(this.st))
      throw new RubatoError('RUBATO_PROTOCOL', `the standby is ${this.st}: not accepting ${input} from the primary`);
  }

  /** The TCP port actually bound (port 0 picks a free one). */
  get boundPort(): number {
    const a = this.server?.address();
    return a && typeof a === 'object' ? a.port : this.o.port;
  }

  get replicaDir(): string {
    return join(this.o.stateDir, 'replica');
  }

  /**
   * What `rubato status` shows for this side (after a failover, the controller protecting the guest here adds its
   * view).
   */
  status(): Record<string, unknown> {
    return {
      role: this.st === 'active' ? 'primary' : 'standby',
      state: this.st,
      vm: this.identity?.vm ?? null,
      replicaEpoch: this.replicaEpoch,
      primary: this.link && !this.link.closed ? this.link.peer : null,
      mode: this.secondary ? 'compare' : 'buffer',
      ...(this.secondary ? { secondary: this.secondary.status() } : {}),
      // a restore's QEMU started ahead, waiting paused for a failover's checkpoint
      spare: this.early ? (this.spareReady ? 'ready' : 'starting') : null,
      ...this.o.statusExtra?.(),
      lastFailover: this.lastFailover,
    };
  }
  get replicaEpoch(): number | null {
    return this.store?.epoch ?? null;
  }

  async start(): Promise<void> {
    ensurePrivateDir(this.o.stateDir);
    ensurePrivateDir(join(this.o.stateDir, 'run'));
    // A crash between the two renames of a base swap leaves replica.old: it is the good one.
    if (!existsSync(this.replicaDir) && existsSync(`${this.replicaDir}.old`))
      renameSync(`${this.replicaDir}.old`, this.replicaDir);
    rmSync(`${this.replicaDir}.new`, { recursive: true, force: true });
    if (existsSync(join(this.replicaDir, 'meta.json')) && !existsSync(join(this.o.stateDir, 'activated'))) {
      this.store = await ReplicaStore.open(this.replicaDir, { fsync: this.o.fsync ?? true });
      this.identity = readIdentity(join(this.o.stateDir, 'vm.json'));
      this.highestGeneration = this.identity.generation ?? 0;
      this.go('replica-recovered');
      // Under memory durability it may be older than checkpoints acknowledged before this restart.
      this.recoveredMayLag = (this.o.durability ?? 'memory') === 'memory';
      // A replica recovered at start-up guards nothing until a primary connects (no failover on our own start).
      log.info(`replica of VM ${this.identity.vm} at checkpoint ${this.store.epoch} recovered from ${this.replicaDir}`);
    }
    this.server = createServer((s) => this.onConnection(s));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', (e) =>
        reject(new RubatoError('RUBATO_CONFIG', `cannot listen on ${this.o.host}:${this.o.port}: ${e.message}`)),
      );
      this.server!.listen(this.o.port, this.o.host, () => resolve());
    });
    this.control = new ControlSocket(join(this.o.stateDir, 'control.sock'), {
      status: () => this.status(),
      failover: async () => ({ ok: await this.failover('manual', 'operator asked for failover'), state: this.st }),
      switchover: async () => {
        if (this.st !== 'protecting' || !this.link || this.link.closed) {
          return {
            ok: false,
            state: this.st,
            error: 'a switchover needs a live, protecting primary (use rubato failover when it is gone)',
          };
        }
        return { ok: await this.failover('manual', 'operator asked for a switchover'), state: this.st };
      },
      ...this.o.controlExtra,
    });
    await this.control.start();
    this.emit({ event: 'listening', host: this.o.host, port: this.boundPort, replicaEpoch: this.replicaEpoch });
  }

  private onConnection(sock: Socket): void {
    const address = sock.remoteAddress ?? 'unix';
    const peer = `${address}:${sock.remotePort ?? 0}`;
    if (!acceptsPrimary(this.st)) {
      this.logRefusal(address, `refusing a primary from ${peer}: this side is ${this.st}`);
      sock.destroy();
      return;
    }
    if (!this.admission.admit(address)) {
      this.logRefusal(
        address,
        `refusing ${peer}: too many unauthenticated connections (${this.admission.pendingCount} pending)`,
      );
      sock.destroy();
      return;
    }
    let released = false;
    const release = () => {
      if (!released) {
        released = true;
        this.admission.release(address);
      }
    };
    sock.once('close', release);
    const link = new Link(sock, this.o.psk, `primary ${peer}`, 'standby');
    void this.session(link, release).catch((e: unknown) =>
      this.logRefusal(address, `session with ${peer} ended: ${errorMessage(e)}`),
    );
  }

  /** One line per address per interval, with how many were not logged. */
  private logRefusal(address: string, line: string): void {
    const quiet = this.admission.shouldLog(address, Date.now());
    if (quiet === null) return;
    log.warn(quiet > 0 ? `${line} (and ${quiet} more from ${address} not logged)` : line);
  }

  private async session(link: Link, authenticated: () => void): Promise<void> {
    let identity: Identity;
    try {
      identity = await acceptHandshake(
        link,
        this.o.psk,
        () => ({ replicaEpoch: this.replicaEpoch, replicaVm: this.identity?.vm ?? null }),
        this.handshakeTimeoutMs,
        (id) => this.otherVm(id) ?? this.staleGeneration(id),
      );
    } catch (e) {
      // A failed or slow handshake closes the socket: nothing unauthenticated lingers.
      link.close(e instanceof Error ? e : new Error(String(e)));
      throw e;
    } finally {
      authenticated();
    }
    if (identity.generation !== undefined)
      this.highestGeneration = Math.max(this.highestGeneration, identity.generation);
    this.primaryReturned.wake();
    // A new authenticated session replaces an old one (the same primary restarting protection).
    if (this.link && !this.link.closed)
      this.link.close(new RubatoError('RUBATO_PEER_LOST', 'replaced by a new session'));
    this.link = link;
    this.emit({ event: 'session', peer: link.peer, vm: identity.vm });
    // Resolve the QEMU for a failover now, not when every millisecond counts.
    void this.o.binaryFor(identity.spec.accel).then(
      (b) => {
        this.binary = b;
      },
      (e: unknown) => log.warn(`no QEMU for a failover of ${identity.vm} yet: ${errorMessage(e)}`),
    );
    link.startHeartbeats(this.o.heartbeatMs, this.o.timeoutMs);
    this.o.gate?.observe?.(identity.vm); // (the evidence a takeover waits on, gathered while the primary lives)
    const s = new StandbySession(link, {
      baseBegin: async (layout) => {
        this.goFromPeer('base-begin');
        return this.receiveBase(identity, layout);
      },
      commit: async (record, epoch, staged, resolve) => {
        if (!this.store) throw new RubatoError('RUBATO_PROTOCOL', 'checkpoint before the initial image');
        const rec = await this.store.commitRecord(record, epoch, this.o.durability ?? 'memory', staged, resolve);
        if (this.secondaryDue()) await this.restartSecondary(identity);
        else this.secondary?.committed(rec.epoch, rec.pages, rec.deviceState);
        // the spare (compare mode has its secondary, promoted at failover)
        if (!this.early && identity.mode !== 'compare' && (this.o.autoFailover ?? true)) this.startEarly();
        return rec;
      },
      netIn: (epoch, payload) => {
        if (this.secondary) this.secondary.netIn(epoch, payload);
        else if (identity.mode === 'compare' && this.earlyInput.reduce((n, x) => n + x.payload.length, 0) < 16 << 20)
          this.earlyInput.push({ epoch, payload }); // (the secondary starts once the full image is in)
      },
      ...(this.o.beforeAck ? { beforeAck: this.o.beforeAck } : {}),
      progress: (p) => this.emit(p),
      synced: (ms, bytes) => this.emit({ event: 'synced', ms, bytes }),
      committed: (epoch, bytes, pages) => this.emit({ event: 'committed', epoch, bytes, pages }),
    });
    const end = await s.run();
    if (end.protecting) this.guarding = true;
    if (this.link !== link) return; // replaced
    this.link = null;
    if (this.st === 'syncing') {
      log.warn(`the full synchronisation from ${link.peer} broke off: ${end.error.message}`);
      this.go('sync-abandoned');
    }
    if (end.bye) {
      this.guarding = false;
      await this.dropEarly(); // (no failover follows an orderly stop)
      this.o.gate?.unobserve?.(identity.vm);
      await this.stopSecondary();
      log.info(`keeping the replica at checkpoint ${this.replicaEpoch}; no failover (the primary stopped in order)`);
      return;
    }
    if (!this.guarding || !this.store || this.st !== 'protecting') return;
    const reason = end.guestLost ? `${link.peer}: the guest's QEMU died there` : end.error.message;
    await this.failoverUnlessPrimaryReturns(link, reason, end.guestLost);
  }

  /**
   * A broken link is not a dead primary: a corrupted frame, a reset or a failed capture end the
   * connection, and the primary reconnects at once to re-synchronise. Only silence past the
   * liveness timeout, with no authenticated primary back, means it is gone.
   */
  private async failoverUnlessPrimaryReturns(link: Link, reason: string, now = false): Promise<void> {
    // (the primary's own word that its guest died: no reason to wait for its silence)
    const waitMs = now ? 0 : Math.max(0, this.o.timeoutMs - link.silentMs());
    log.warn(
      `link to the primary lost (${reason}); replica at checkpoint ${this.replicaEpoch}; taking over if it stays silent ${waitMs} ms more`,
    );
    if (this.o.autoFailover ?? true) this.startEarly();
    const back = await this.primaryBackUnlessReleased(waitMs);
    if (back === true) {
      log.info('the primary is back (authenticated); no failover');
      return;
    }
    if (back === 'released') reason = `${reason}; it gave the VM up in the witness`;
    if (this.st !== 'protecting' || this.link) return;
    const silentMs = Math.round(link.silentMs());
    this.emit({ event: 'primary-lost', reason, epoch: this.replicaEpoch, atMs: Date.now() });
    log.warn(`primary lost (${reason}; silent ${silentMs} ms); replica at checkpoint ${this.replicaEpoch}`);
    if (!(this.o.autoFailover ?? true)) return;
    // A gate that refused (the witness says the primary still holds the VM: only the link broke)
    // is asked again while no primary is back: when that primary dies, its lease expires and this
    // side takes over then.
    while (
      !(await this.failover('primary-lost', reason, silentMs)) &&
      this.o.gate &&
      this.st === 'protecting' &&
      !this.link &&
      this.guarding
    ) {
      if (await this.primaryBackWithin(GATE_RETRY_MS)) return;
    }
  }

  /**
   * True if an authenticated primary connects within `ms`; 'released' at once if the witness shows
   * the VM given up meanwhile (its controller died on a live host: lease-sentinel.ts).
   */
  private async primaryBackUnlessReleased(ms: number): Promise<boolean | 'released'> {
    const vm = this.identity?.vm;
    const released = this.o.gate?.released;
    if (!vm || !released || ms <= 0) return this.primaryBackWithin(ms);
    const until = performance.now() + ms;
    for (;;) {
      const left = until - performance.now();
      if (left <= 0) return false;
      if (this.link || (await this.primaryBackWithin(Math.min(left, RELEASED_POLL_MS)))) return true;
      if (this.link) return true;
      if (await released.call(this.o.gate, vm).catch(() => false)) {
        log.warn(`the primary gave VM ${vm} up in the witness: not waiting for its silence`);
        return 'released';
      }
    }
  }

  /** True if an authenticated primary connects within `ms`. */
  private primaryBackWithin(ms: number): Promise<boolean> {
    return this.primaryReturned.sleep(ms);
  }

  /** A full image arrives into replica.new, written in place; complete, it replaces the replica. */
  private async receiveBase(identity: Identity, layout: Layout): Promise<BaseReceiver> {
    const next = `${this.replicaDir}.new`;
    rmSync(next, { recursive: true, force: true });
    const fsync = this.o.fsync ?? true;
    const builder = await ReplicaBuilder.begin(
      next,
      identity.vm,
      { machine: layout.machine, blocks: layout.blocks },
      { fsync },
    );
    return {
      writeRun: (i, off, data) => builder.writeRun(i, off, data),
      fill: (i, off, fill) => builder.fill(i, off, fill),
      abandon: () => builder.abandon(),
      finish: async (deviceState) => {
        this.refuseUnlessAllowed('base-installed'); // before installing a replica this side would not take
        await this.dropEarly(); // (a spare maps the replica being replaced)
        const created = await builder.finish(deviceState);
        // The replica it replaces is written no more; a failure there is moot (it is being replaced).
        await this.store
          ?.settled()
          .catch((e: unknown) => log.warn(`previous replica's last files: ${errorMessage(e)}`));
        await this.store?.close();
        if (existsSync(this.replicaDir)) renameSync(this.replicaDir, `${this.replicaDir}.old`);
        renameSync(next, this.replicaDir);
        rmSync(`${this.replicaDir}.old`, { recursive: true, force: true });
        await writePrivateAtomic(join(this.o.stateDir, 'vm.json'), Buffer.from(JSON.stringify(identity)), fsync);
        // The store built in replica.new now lives in its final place.
        this.store = created.relocated(this.replicaDir);
        this.identity = identity;
        this.recoveredMayLag = false;
        this.goFromPeer('base-installed');
        await this.startSecondary(identity);
      },
    };
  }

  /**
   * Starts the restored guest's I/O and its QEMU (incoming, paused: it runs nothing before the
   * checkpoint is loaded, after the gate allowed it). Not with a secondary (it brings its own).
   */
  private startEarly(): void {
    if (this.early || this.secondary || !this.identity || !this.store || this.st !== 'protecting') return;
    // A UEFI VM's variable store (flash 1) is read into QEMU when it starts: one started ahead would
    // run the firmware with the variables of that moment, not of the checkpoint (found by the UEFI test).
    if (this.identity.spec.uefiCode) return;
    const identity = this.identity;
    const store = this.store;
    const ramFile = store.imagePath(MAIN_RAM_ID);
    const runDir = join(this.o.stateDir, 'run');
    const undone = this.earlyUndone;
    const early = (async (): Promise<EarlyRestore> => {
      await undone;
      const io = this.o.prepareRestore
        ? await this.o.prepareRestore(identity, store)
        : { netSockets: [], nbdSockets: [] };
      try {
        const binary = this.binary ?? (await this.o.binaryFor(identity.spec.accel));
        const started = await startRestore({
          spec: { ...identity.spec, ramFile },
          binary,
          runDir,
          tag: 'active',
          ...io,
        });
        return { io, started, ramFile };
      } catch (e) {
        await io.close?.().catch(() => {});
        throw e;
      }
    })();
    early.then(
      (e) => {
        if (this.early !== early || !e.started) return;
        this.readyEarly = early;
        this.emit({ event: 'spare-ready', startMs: Math.round(e.started.startMs) });
      },
      (e: unknown) => log.warn(`preparing the restore ahead: ${errorMessage(e)}`),
    );
    this.early = early;
  }

  /** What was started for a failover that did not happen is undone. */
  private dropEarly(): Promise<void> {
    const early = this.early;
    this.early = null;
    if (!early) return this.earlyUndone;
    this.earlyUndone = early.then(undoEarly, () => {});
    return this.earlyUndone;
  }

  /** Starts the guest from the last committed checkpoint (once). */
  async failover(reason: 'primary-lost' | 'manual', why: string, silentMs = 0): Promise<boolean> {
    const detectedAtMs = Date.now();
    const t0 = performance.now();
    const spare = this.spareReady;
    if (this.st === 'active' || this.st === 'activating') return this.st === 'active';
    if (!this.store || !this.identity) {
      this.emit({ event: 'failover-refused', why: 'no replica to fail over to' });
      return false;
    }
    if (this.st === 'stopped') {
      this.emit({ event: 'failover-refused', why: 'the standby controller is stopping' });
      return false;
    }
    if (this.recoveredMayLag) {
      const why = `replica of VM ${this.identity.vm} at checkpoint ${this.store.epoch} was recovered after a restart under --durability memory: it may be older than checkpoints acknowledged before the restart; not going live (the primary re-synchronises it when it connects; --durability disk keeps a recovered replica usable)`;
      this.emit({ event: 'failover-refused', why });
      log.error(why);
      return false;
    }
    // A switchover stops the live primary first (it then gives the VM up in the witness); any
    // other failover asks the gate before anything happens.
    const fenceFirst = reason === 'manual' && this.link !== null && !this.link.closed;
    const gate = this.o.gate ?? allowAlways;
    const stillWanted = () => reason === 'manual' || !this.link || this.link.closed !== null;
    if (!fenceFirst) this.startEarly();
    let verdict = fenceFirst
      ? null
      : await gate.mayActivate({ reason, vm: this.identity.vm, replicaEpoch: this.store.epoch, silentMs, stillWanted });
    if (verdict && !verdict.allow) {
      this.emit({ event: 'failover-refused', why: verdict.why });
      log.warn(`failover refused: ${verdict.why}`);
      return false;
    }
    this.go('failover-begin');
    const fencedLink = fenceFirst ? this.link : null;
    try {
      if (fencedLink) await this.fencePrimary(fencedLink);
      verdict ??= await gate.mayActivate({
        reason,
        vm: this.identity.vm,
        replicaEpoch: this.store.epoch,
        silentMs,
        stillWanted,
      });
    } catch (e) {
      this.go('failover-failed');
      // A link that dropped mid-fence is not a fence: the primary may have resumed its guest. It is
      // a lost primary like any other — taken over only through the gate, once it stays away.
      if (fencedLink?.closed && this.guarding)
        void this.failoverUnlessPrimaryReturns(fencedLink, `the link dropped during the fence (${errorMessage(e)})`);
      throw e;
    }
    if (!verdict.allow) {
      this.go('failover-failed');
      this.emit({ event: 'failover-refused', why: verdict.why });
      log.error(
        `the primary stopped its guest, but the gate refused this side: ${verdict.why}; NO COPY RUNS (rubato failover retries)`,
      );
      return false;
    }
    // The generation this side now holds: an older primary is refused from here on.
    if (verdict.generation !== undefined) this.highestGeneration = Math.max(this.highestGeneration, verdict.generation);
    const gateAt = performance.now();
    let store = this.store;
    try {
      store = await this.settledForActivation(store);
    } catch (e) {
      this.go('failover-failed');
      this.emit({ event: 'failover-refused', why: errorMessage(e) });
      throw e;
    }
    const settledAt = performance.now();
    let readyAt = settledAt; // (the restore's QEMU started, waiting for the checkpoint)
    let usedSpare = false;
    // Compare mode: the secondary takes the last committed checkpoint and runs on as the guest.
    const promoted = await this.promoteSecondary();
    await store.close(); // the guest owns the image files from here
    const spec = { ...this.identity.spec, name: `${this.identity.spec.name}`, ramFile: store.imagePath(MAIN_RAM_ID) };
    await writePrivateAtomic(
      join(this.o.stateDir, 'activated'),
      Buffer.from(JSON.stringify({ epoch: store.epoch, atMs: detectedAtMs })),
      this.o.fsync ?? true,
    );
    try {
      const binary = this.binary ?? (await this.o.binaryFor(spec.accel));
      let r: { vm: QemuVm; restoreMs: number };
      if (promoted) {
        await this.o.prepareRestore?.(this.identity, store, {
          relay: promoted.relay,
          nbds: promoted.nbd ? [promoted.nbd] : [],
        });
        r = { vm: promoted.vm, restoreMs: 0 };
      } else {
        const pending = this.early;
        this.early = null;
        let early = pending ? await pending.catch(() => null) : null;
        readyAt = performance.now();
        if (early && (early.ramFile !== spec.ramFile || early.started?.vm.exited)) {
          // (the replica moved under it, or its QEMU died meanwhile: started afresh)
          await undoEarly(early);
          early = null;
        }
        const input = { spec, machine: store.machine, deviceState: store.deviceState };
        if (early?.started) {
          usedSpare = spare;
          r = await loadAndRun(early.started, input);
        } else {
          const io =
            early?.io ??
            (this.o.prepareRestore
              ? await this.o.prepareRestore(this.identity, store)
              : { netSockets: [], nbdSockets: [] });
          r = await restoreVm(input, { binary, runDir: join(this.o.stateDir, 'run'), tag: 'active', ...io });
        }
      }
      this.vm = r.vm;
      this.vm.on('serial', (line: string) => this.emit({ event: 'guest', line, atMs: Date.now() }));
      this.go('failover-done');
      this.lastFailover = { epoch: store.epoch, at: new Date().toISOString(), ms: Date.now() - detectedAtMs, why };
      this.emit({
        event: 'failover',
        epoch: store.epoch,
        detectedAtMs,
        runningAtMs: Date.now(),
        restoreMs: Math.round(r.restoreMs),
        phasesMs: {
          gate: Math.round(gateAt - t0),
          settle: Math.round(settledAt - gateAt),
          qemuReady: Math.round(readyAt - settledAt),
          run: Math.round(performance.now() - readyAt),
        },
        promoted: promoted !== null,
        spare: usedSpare,
        why: `${why}; ${verdict.why}`,
      });
      log.warn(
        `FAILOVER: guest ${this.identity.vm} running here from checkpoint ${store.epoch}${promoted ? ' (the compared secondary, promoted)' : ''}`,
      );
      return true;
    } catch (e) {
      this.go('failover-failed');
      rmSync(join(this.o.stateDir, 'activated'), { force: true });
      throw e;
    }
  }

  /**
   * The replica's files hold every acknowledged checkpoint before a guest starts from them. A
   * committed redo record is finished by reopening the replica. Under memory durability a batch
   * whose write failed is kept in memory and written again here; if that fails too, nothing goes
   * live: the guest would run older than what this side acknowledged.
   */
  private async settledForActivation(store: ReplicaStore): Promise<ReplicaStore> {
    try {
      await store.settled();
      return store;
    } catch (e) {
      const behind = store.unwrittenEpoch;
      if (behind !== null) {
        log.warn(
          `checkpoint ${behind} is acknowledged but not written (${errorMessage(e)}); writing it again before going live`,
        );
        await store.retryBehind().catch((again: unknown) => {
          throw new RubatoError(
            'RUBATO_REPLICA_CORRUPT',
            `checkpoint ${behind} was acknowledged but cannot be written to ${this.replicaDir} (${errorMessage(again)}); not going live older than it: free the disk, then rubato failover`,
          );
        });
        return store;
      }
      // Its redo record is committed: reopening the replica finishes applying it.
      log.warn(`replica files behind checkpoint ${store.epoch} (${errorMessage(e)}); reopening the replica to redo it`);
      return (this.store = await ReplicaStore.open(this.replicaDir, { fsync: this.o.fsync ?? true }));
    }
  }

  /**
   * Manual failover while the primary still runs: it must stop its guest first (no split brain).
   * Only its FENCED frame confirms that; a link that closes first or silence past the timeout does not.
   */
  private async fencePrimary(link: Link): Promise<void> {
    const fenced = new Promise<'fenced' | 'closed' | 'silent'>((resolve) => {
      const t = setTimeout(() => resolve('silent'), this.o.timeoutMs);
      link.once('fenced', () => {
        clearTimeout(t);
        resolve('fenced');
      });
      link.once('close', () => {
        clearTimeout(t);
        resolve('closed');
      });
    });
    await link
      .send(FrameType.FENCE, 0)
      .catch((e: unknown) => log.warn(`asking the primary to stop its guest: ${errorMessage(e)}`));
    const r = await fenced;
    if (r === 'fenced') return;
    throw new RubatoError(
      'RUBATO_PEER_LOST',
      r === 'closed'
        ? 'the link dropped before the primary confirmed it stopped its guest; not activating now (a lost primary is taken over through the witness once it stays silent)'
        : 'the primary did not confirm it stopped its guest; not activating (would risk two running copies)',
    );
  }

  /** Compare mode: a secondary from the replica just installed (any earlier one goes). */
  private async startSecondary(identity: Identity, restart = false): Promise<void> {
    await this.stopSecondary();
    if (!restart) this.secondaryRestarts = 0;
    const early = this.earlyInput;
    this.earlyInput = [];
    if (identity.mode !== 'compare') return;
    if (!this.store) return;
    const binary = this.binary ?? (await this.o.binaryFor(identity.spec.accel));
    const runDir = join(this.o.stateDir, 'run');
    // (before the next checkpoint is taken: the session handles them after this returns)
    const image = await copyImage(this.store, runDir, [DISK_BLOCK_ID]);
    this.secondary = new SecondaryRunner({
      identity,
      image,
      disk: this.store.blocks.some((b) => b.id === DISK_BLOCK_ID) ? this.store.imagePath(DISK_BLOCK_ID) : null,
      binary,
      runDir,
      send: (epoch, payload) => {
        const link = this.link;
        if (link && !link.closed)
          link
            .send(FrameType.SEC_OUT, epoch, payload)
            .catch((e: unknown) => log.debug(`secondary output to the primary: ${errorMessage(e)}`));
      },
      onRunning: (epoch, startMs) => this.emit({ event: 'secondary-running', epoch, startMs }),
    });
    for (const x of early) this.secondary.netIn(x.epoch, x.payload);
  }

  /**
   * A secondary that failed (its QEMU died or left COLO) is started again from the replica, so
   * that compare mode and a failover by promotion come back: SECONDARY_RESTART_MS after it failed,
   * doubling with every restart since the full image, at most SECONDARY_RESTART_MAX_MS.
   */
  private secondaryDue(): boolean {
    const s = this.secondary;
    if (s?.stats.state !== 'failed' || s.failedAtMs === null) return false;
    const wait = Math.min(SECONDARY_RESTART_MS * 2 ** this.secondaryRestarts, SECONDARY_RESTART_MAX_MS);
    return performance.now() - s.failedAtMs >= wait;
  }

  /** Called between commits (nothing is applied to the replica meanwhile: its image is one checkpoint). */
  private async restartSecondary(identity: Identity): Promise<void> {
    const why = this.secondary?.stats.failure ?? '';
    this.secondaryRestarts++;
    const t0 = performance.now();
    log.info(
      `starting the secondary of VM ${identity.vm} again from checkpoint ${this.store?.epoch} (restart ${this.secondaryRestarts}; it failed: ${why})`,
    );
    this.emit({ event: 'secondary-restart', restarts: this.secondaryRestarts, why });
    await this.startSecondary(identity, true);
    log.info(`secondary image of VM ${identity.vm} copied in ${Math.round(performance.now() - t0)} ms`);
  }

  private async stopSecondary(): Promise<void> {
    const s = this.secondary;
    this.secondary = null;
    await s?.stop().catch((e: unknown) => log.warn(`stopping the secondary: ${errorMessage(e)}`));
  }

  /** The promoted secondary, or null (no compare mode, or it cannot go on: the replica is restored). */
  private async promoteSecondary(): Promise<{
    vm: QemuVm;
    relay: NetRelay;
    nbd: NbdServer | null;
    epoch: number;
  } | null> {
    const s = this.secondary;
    if (!s || !this.store) return null;
    const p = await s.promote();
    if (p && p.epoch !== this.store.epoch) {
      // It must run from the last acknowledged checkpoint, never an older one.
      log.error(
        `the secondary runs from checkpoint ${p.epoch}, the replica is at ${this.store.epoch}: restoring instead`,
      );
      await p.vm.stop();
      await p.relay.close();
      await p.nbd?.close();
      this.secondary = null;
      return null;
    }
    if (!p) {
      await this.stopSecondary();
      return null;
    }
    this.secondary = null;
    return p;
  }

  /** Orderly end: the primary is told (it goes on unprotected), the replica is kept. */
  async stop(): Promise<void> {
    if (this.st !== 'stopped') this.go('stop');
    const link = this.link;
    if (link && !link.closed) {
      await link.sendLast(FrameType.BYE).catch((e: unknown) => log.debug(`goodbye to the primary: ${errorMessage(e)}`));
      await link.closeGracefully(new RubatoError('RUBATO_PEER_LOST', 'the standby stopped'));
    }
    this.server?.close();
    this.control?.close();
    await this.dropEarly();
    if (this.identity) this.o.gate?.unobserve?.(this.identity.vm);
    await this.store
      ?.settled()
      .catch((e: unknown) =>
        log.warn(
          `replica files behind its last checkpoint at stop (${(e as Error).message}); its redo record finishes them on the next start`,
        ),
      );
    await this.store?.close();
    await this.stopSecondary();
    await this.vm?.stop();
  }
}

/** The protected VM's identity, as the last full image recorded it. */
function readIdentity(path: string): Identity {
  let v: unknown;
  try {
    v = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new RubatoError(
      'RUBATO_REPLICA_CORRUPT',
      `${path} cannot be read (${(e as Error).message}); the replica cannot be used: move the state folder aside and let the primary re-synchronise`,
    );
  }
  const r = IdentitySchema.safeParse(v);
  if (!r.success)
    throw new RubatoError(
      'RUBATO_REPLICA_CORRUPT',
      `${path} does not describe a VM (${r.error.issues[0]?.message ?? 'invalid'}); move the state folder aside and let the primary re-synchronise`,
    );
  return r.data;
}

/** A restore started ahead of a failover: its I/O, and its QEMU waiting for the checkpoint. */
interface EarlyRestore {
  io: PreparedIo;
  started: StartedRestore | null;
  ramFile: string;
}

async function undoEarly(e: EarlyRestore): Promise<void> {
  await e.started?.vm.stop().catch((err: unknown) => log.debug(`stopping a restore not needed: ${errorMessage(err)}`));
  await e.io.close?.().catch((err: unknown) => log.debug(`undoing a restore's I/O: ${errorMessage(err)}`));
}
