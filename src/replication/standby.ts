// The standby controller: accepts one authenticated primary, receives the initial image and then
// checkpoints, commits each atomically to the replica store and acks it. When the primary is lost
// it asks the activation gate, then starts the guest from the last committed checkpoint.
// It never applies a partial checkpoint and never runs two guests.

import { createServer, type Server, type Socket } from 'node:net';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RubatoError, errorMessage } from '../util/errors.ts';
import { logger } from '../util/log.ts';
import { ReplicaStore } from './replica-store.ts';
import { Link } from './link.ts';
import { FrameType, frameTypeName, type Frame } from './protocol/frame.ts';
import { decodeBaseData, decodeLayout, IdentitySchema, type Identity, type Layout } from './protocol/messages.ts';
import { allowAlways, type ActivationGate } from './activation.ts';
import { restoreVm } from '../qemu/restore.ts';
import { MAIN_RAM_ID } from '../qemu/spec.ts';
import type { QemuBinary, QemuVm } from '../qemu/vm.ts';
import type { Accel } from '../qemu/spec.ts';

const log = logger('standby');

export type StandbyState = 'waiting' | 'syncing' | 'protecting' | 'activating' | 'active' | 'stopped';

export type StandbyEvent =
  | { event: 'listening'; host: string; port: number; replicaEpoch: number | null }
  | { event: 'session'; peer: string; vm: string }
  | { event: 'sync-progress'; bytes: number; totalBytes: number; percent: number; mbPerSec: number; etaSec: number }
  | { event: 'synced'; ms: number; bytes: number }
  | { event: 'committed'; epoch: number; bytes: number; pages: number }
  | { event: 'primary-lost'; reason: string; epoch: number | null; atMs: number }
  | { event: 'failover'; epoch: number; detectedAtMs: number; runningAtMs: number; restoreMs: number; why: string }
  | { event: 'failover-refused'; why: string }
  | { event: 'guest'; line: string; atMs: number };

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
  onEvent?: (e: StandbyEvent) => void;
  /** Sets up the guest's NIC relay and disk server for a restore (called only at failover). */
  prepareRestore?: (identity: Identity, store: ReplicaStore) => Promise<{ netSocket?: string; nbdSocket?: string }>;
  /** Fault injection for tests: runs after a commit, before its ack is sent. */
  beforeAck?: (epoch: number) => Promise<void>;
}

export class StandbyController {
  private server: Server | null = null;
  private control: Server | null = null;
  private link: Link | null = null;
  private store: ReplicaStore | null = null;
  private identity: Identity | null = null;
  state: StandbyState = 'waiting';
  vm: QemuVm | null = null;
  private binary: QemuBinary | null = null;
  private readonly emit: (e: StandbyEvent) => void;

  constructor(private readonly o: StandbyOptions) {
    this.emit = o.onEvent ?? (() => {});
  }

  /** The TCP port actually bound (port 0 picks a free one). */
  get boundPort(): number {
    const a = this.server?.address();
    return a && typeof a === 'object' ? a.port : this.o.port;
  }

  get replicaDir(): string { return join(this.o.stateDir, 'replica'); }
  get replicaEpoch(): number | null { return this.store?.epoch ?? null; }

  async start(): Promise<void> {
    mkdirSync(join(this.o.stateDir, 'run'), { recursive: true });
    // A crash between the two renames of a base swap leaves replica.old: it is the good one.
    if (!existsSync(this.replicaDir) && existsSync(`${this.replicaDir}.old`)) renameSync(`${this.replicaDir}.old`, this.replicaDir);
    rmSync(`${this.replicaDir}.new`, { recursive: true, force: true });
    if (existsSync(join(this.replicaDir, 'meta.json')) && !existsSync(join(this.o.stateDir, 'activated'))) {
      this.store = await ReplicaStore.open(this.replicaDir, { fsync: this.o.fsync ?? true });
      this.identity = IdentitySchema.parse(JSON.parse(readFileSync(join(this.o.stateDir, 'vm.json'), 'utf8')));
      log.info(`replica of VM ${this.identity.vm} at checkpoint ${this.store.epoch} recovered from ${this.replicaDir}`);
    }
    this.server = createServer((s) => this.onConnection(s));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', (e) => reject(new RubatoError('RUBATO_CONFIG', `cannot listen on ${this.o.host}:${this.o.port}: ${e.message}`)));
      this.server!.listen(this.o.port, this.o.host, () => resolve());
    });
    await this.startControl();
    this.emit({ event: 'listening', host: this.o.host, port: this.o.port, replicaEpoch: this.replicaEpoch });
  }

  /** A unix socket for `rubato failover` and `rubato status`: one line in, one JSON line out. */
  private async startControl(): Promise<void> {
    const path = join(this.o.stateDir, 'control.sock');
    rmSync(path, { force: true });
    this.control = createServer((s) => {
      s.setEncoding('utf8');
      let buf = '';
      s.on('data', (d: string) => {
        buf += d;
        if (!buf.includes('\n')) return;
        const cmd = buf.trim();
        const reply = (v: unknown) => s.end(JSON.stringify(v) + '\n');
        if (cmd === 'status') reply({ state: this.state, replicaEpoch: this.replicaEpoch, vm: this.identity?.vm ?? null });
        else if (cmd === 'failover') this.failover('manual', 'operator asked for failover').then((ok) => reply({ ok, state: this.state }), (e) => reply({ ok: false, error: errorMessage(e) }));
        else reply({ ok: false, error: `unknown command ${cmd}` });
      });
      s.on('error', () => {});
    });
    await new Promise<void>((resolve) => this.control!.listen(path, () => resolve()));
  }

  private onConnection(sock: Socket): void {
    const peer = `${sock.remoteAddress ?? 'unix'}:${sock.remotePort ?? 0}`;
    if (this.state === 'active' || this.state === 'activating' || this.state === 'stopped') {
      log.warn(`refusing a primary from ${peer}: this side is ${this.state}`);
      sock.destroy();
      return;
    }
    const link = new Link(sock, this.o.psk, `primary ${peer}`);
    void this.session(link).catch((e) => log.warn(`session with ${peer} ended: ${errorMessage(e)}`));
  }

  private async session(link: Link): Promise<void> {
    const identity = await link.acceptHandshake(this.o.psk, () => ({ replicaEpoch: this.replicaEpoch, replicaVm: this.identity?.vm ?? null }), this.o.timeoutMs * 5);
    // A new authenticated session replaces an old one (the same primary restarting protection).
    if (this.link && !this.link.closed) this.link.close(new RubatoError('RUBATO_PEER_LOST', 'replaced by a new session'));
    this.link = link;
    this.emit({ event: 'session', peer: link.peer, vm: identity.vm });
    // Resolve the QEMU for a failover now, not when every millisecond counts.
    void this.o.binaryFor(identity.spec.accel).then((b) => { this.binary = b; }, () => {});
    link.startHeartbeats(this.o.heartbeatMs, this.o.timeoutMs);
    let layout: Layout | null = null;
    let base: Map<string, Buffer> | null = null;
    let received = 0;
    let t0 = 0;
    let lastProgress = 0;
    let protecting = false;
    let chain: Promise<void> = Promise.resolve();
    const onFrame = (f: Frame) => {
      chain = chain.then(() => handle(f)).catch((e) => {
        log.warn(`dropping primary ${link.peer}: ${errorMessage(e)}`);
        link.close(e as Error);
      });
    };
    const handle = async (f: Frame) => {
      if (link.closed) return;
      switch (f.type) {
        case FrameType.BASE_BEGIN: {
          layout = decodeLayout(f.payload);
          base = new Map(layout.blocks.map((b) => [b.id, Buffer.alloc(b.lengthBytes)]));
          received = 0;
          t0 = performance.now();
          this.state = 'syncing';
          return;
        }
        case FrameType.BASE_DATA: {
          if (!layout || !base) throw new RubatoError('RUBATO_PROTOCOL', 'BASE_DATA before BASE_BEGIN');
          const d = decodeBaseData(f.payload, layout);
          d.data.copy(base.get(layout.blocks[d.blockIndex]!.id)!, d.offset);
          received += d.data.length;
          if (performance.now() - lastProgress > 500) {
            lastProgress = performance.now();
            const secs = (performance.now() - t0) / 1000;
            const rate = received / Math.max(secs, 1e-3);
            this.emit({ event: 'sync-progress', bytes: received, totalBytes: layout.totalBytes, percent: Math.round((received / layout.totalBytes) * 1000) / 10, mbPerSec: Math.round(rate / 1e5) / 10, etaSec: Math.round(((layout.totalBytes - received) / rate) * 10) / 10 });
          }
          return;
        }
        case FrameType.BASE_END: {
          if (!layout || !base) throw new RubatoError('RUBATO_PROTOCOL', 'BASE_END before BASE_BEGIN');
          await this.installBase(identity, layout, base, f.payload);
          base = null;
          protecting = true;
          this.state = 'protecting';
          this.emit({ event: 'synced', ms: Math.round(performance.now() - t0), bytes: received });
          await link.send(FrameType.ACK, 0);
          return;
        }
        case FrameType.CKPT: {
          if (!this.store || !protecting) throw new RubatoError('RUBATO_PROTOCOL', 'checkpoint before the initial image');
          if (f.epoch !== this.store.epoch + 1) throw new RubatoError('RUBATO_PROTOCOL', `checkpoint ${f.epoch} does not follow ${this.store.epoch}`);
          const epoch = await this.store.commitRecord(f.payload);
          if (epoch !== f.epoch) throw new RubatoError('RUBATO_PROTOCOL', `frame epoch ${f.epoch} carries record epoch ${epoch}`);
          this.emit({ event: 'committed', epoch, bytes: f.payload.length, pages: f.payload.readUInt32BE(16) });
          if (this.o.beforeAck) await this.o.beforeAck(epoch);
          if (!link.closed) await link.send(FrameType.ACK, epoch);
          return;
        }
        case FrameType.FENCED:
          link.emit('fenced');
          return;
        case FrameType.BYE:
          protecting = false;
          log.info(`primary ${link.peer} ended protection in order; keeping the replica at checkpoint ${this.replicaEpoch}`);
          link.close();
          return;
        default:
          throw new RubatoError('RUBATO_PROTOCOL', `unexpected ${frameTypeName(f.type)} from the primary`);
      }
    };
    link.on('frame', onFrame);
    link.startEvents();
    const err = await new Promise<Error>((resolve) => link.once('close', resolve));
    await chain;
    if (this.link !== link) return; // replaced
    this.link = null;
    if (this.state === 'syncing') this.state = this.store ? 'protecting' : 'waiting';
    if (protecting && this.store && this.state === 'protecting') {
      const silentMs = link.silentMs();
      this.emit({ event: 'primary-lost', reason: err.message, epoch: this.replicaEpoch, atMs: Date.now() });
      log.warn(`primary lost (${err.message}); replica at checkpoint ${this.replicaEpoch}`);
      if (this.o.autoFailover ?? true) await this.failover('primary-lost', err.message, silentMs);
    }
  }

  private async installBase(identity: Identity, layout: Layout, ram: Map<string, Buffer>, deviceState: Buffer): Promise<void> {
    const next = `${this.replicaDir}.new`;
    rmSync(next, { recursive: true, force: true });
    const created = await ReplicaStore.create(next, identity.vm, { machine: layout.machine, blocks: layout.blocks, ram, deviceState }, { fsync: this.o.fsync ?? true, adopt: true });
    await this.store?.settled().catch(() => {}); // the replica it replaces is written no more
    if (existsSync(this.replicaDir)) renameSync(this.replicaDir, `${this.replicaDir}.old`);
    renameSync(next, this.replicaDir);
    rmSync(`${this.replicaDir}.old`, { recursive: true, force: true });
    writeFileSync(join(this.o.stateDir, 'vm.json'), JSON.stringify(identity));
    // The store built in replica.new now lives in its final place.
    this.store = created.relocated(this.replicaDir);
    this.identity = identity;
  }

  /** Starts the guest from the last committed checkpoint (once). */
  async failover(reason: 'primary-lost' | 'manual', why: string, silentMs = 0): Promise<boolean> {
    const detectedAtMs = Date.now();
    if (this.state === 'active' || this.state === 'activating') return this.state === 'active';
    if (!this.store || !this.identity) {
      this.emit({ event: 'failover-refused', why: 'no replica to fail over to' });
      return false;
    }
    const verdict = await (this.o.gate ?? allowAlways).mayActivate({ reason, replicaEpoch: this.store.epoch, silentMs });
    if (!verdict.allow) {
      this.emit({ event: 'failover-refused', why: verdict.why });
      return false;
    }
    this.state = 'activating';
    if (reason === 'manual' && this.link && !this.link.closed) await this.fencePrimary(this.link);
    let store = this.store;
    try {
      await store.settled(); // the last acknowledged checkpoint's images are written
    } catch (e) {
      // Its redo record is committed: reopening the replica finishes applying it.
      log.warn(`replica files behind checkpoint ${store.epoch} (${(e as Error).message}); reopening the replica to redo it`);
      store = this.store = await ReplicaStore.open(this.replicaDir, { fsync: this.o.fsync ?? true });
    }
    const spec = { ...this.identity.spec, name: `${this.identity.spec.name}`, ramFile: store.imagePath(MAIN_RAM_ID) };
    writeFileSync(join(this.o.stateDir, 'activated'), JSON.stringify({ epoch: store.epoch, atMs: detectedAtMs }));
    try {
      const binary = this.binary ?? await this.o.binaryFor(spec.accel);
      const io = this.o.prepareRestore ? await this.o.prepareRestore(this.identity, store) : {};
      const r = await restoreVm({ spec, machine: store.machine, deviceState: store.deviceState }, { binary, runDir: join(this.o.stateDir, 'run'), tag: 'active', ...io });
      this.vm = r.vm;
      this.vm.on('serial', (line: string) => this.emit({ event: 'guest', line, atMs: Date.now() }));
      this.state = 'active';
      this.emit({ event: 'failover', epoch: store.epoch, detectedAtMs, runningAtMs: Date.now(), restoreMs: Math.round(r.restoreMs), why: `${why}; ${verdict.why}` });
      log.warn(`FAILOVER: guest ${this.identity.vm} running here from checkpoint ${store.epoch}`);
      return true;
    } catch (e) {
      this.state = 'protecting';
      rmSync(join(this.o.stateDir, 'activated'), { force: true });
      throw e;
    }
  }

  /** Manual failover while the primary still runs: it must stop its guest first (no split brain). */
  private async fencePrimary(link: Link): Promise<void> {
    const fenced = new Promise<boolean>((resolve) => {
      const t = setTimeout(() => resolve(false), this.o.timeoutMs);
      link.once('fenced', () => { clearTimeout(t); resolve(true); });
      link.once('close', () => { clearTimeout(t); resolve(true); });
    });
    await link.send(FrameType.FENCE, 0).catch(() => {});
    if (!(await fenced)) throw new RubatoError('RUBATO_PEER_LOST', 'the primary did not confirm it stopped its guest; not activating (would risk two running copies)');
  }

  async stop(): Promise<void> {
    this.state = 'stopped';
    this.link?.close();
    this.server?.close();
    this.control?.close();
    await this.store?.settled().catch((e: unknown) => log.warn(`replica files behind its last checkpoint at stop (${(e as Error).message}); its redo record finishes them on the next start`));
    await this.vm?.stop();
  }
}
