// The primary controller: runs the guest, keeps it protected by a standby, and says so loudly when
// it is not. Per epoch: checkpoint (route A), ship the record while the next epoch runs, count the
// ack. Bounded: at most maxInflight unacknowledged checkpoints; when the link cannot keep up the
// next checkpoint waits (back-pressure). On standby loss the guest keeps running unprotected and
// the controller reconnects and re-synchronises.

import { connect } from 'node:net';
import { RubatoError, errorMessage, assert } from '../util/errors.ts';
import { logger } from '../util/log.ts';
import { QemuVm } from '../qemu/vm.ts';
import { ColoCapture } from '../capture/route-a.ts';
import { PauseMeter } from '../capture/pause-meter.ts';
import { Link } from './link.ts';
import { FrameType, type Frame } from './protocol/frame.ts';
import { encodeBaseData, encodeLayout, type Identity } from './protocol/messages.ts';
import { encodeRecord } from './replica-store.ts';
import type { BaseImage, Checkpoint } from '../capture/checkpoint.ts';
import type { NetRelay } from '../io/net/relay.ts';
import type { NbdServer } from '../io/disk/nbd-server.ts';
import { readFile } from 'node:fs/promises';
import type { TraceRecorder } from '../sim/trace.ts';
import { fixed, type EpochRecord, type Policy, type Telemetry } from '../scheduler/index.ts';

const HISTORY_KEPT = 256;

/** The RAM-block name under which the guest's disk travels in checkpoints and lives in the replica. */
export const DISK_BLOCK_ID = 'disk0';

const log = logger('primary');
const BASE_CHUNK_BYTES = 1 << 20;

export type FaultPoint = 'mid-epoch' | 'mid-pause' | 'mid-transfer';

export type PrimaryEvent =
  | { event: 'protecting'; standby: string }
  | { event: 'unprotected'; reason: string; atMs: number }
  | { event: 'sync-progress'; bytes: number; totalBytes: number; percent: number; mbPerSec: number; etaSec: number }
  | { event: 'checkpoint'; epoch: number; pages: number; bytes: number; pauseMs: number; captureMs: number; counter: number }
  | { event: 'acked'; epoch: number; counter: number; lagMs: number }
  | { event: 'status'; epoch: number; ackedEpoch: number; ckptPerSec: number; dirtyPages: number; pauseMs: number; mbPerSec: number; lagMs: number; rttMs: number | null; inflight: number; waitsForLink: number;
      heldFrames: number; heldBytes: number; oldestHeldMs: number | null; diskWrites: number; diskFlushes: number }
  | { event: 'output-released-unprotected'; frames: number }
  | { event: 'decisions'; reasons: Record<string, number>; policy: string }
  | { event: 'guest'; line: string; atMs: number }
  | { event: 'fenced' }
  | { event: 'vm-exited' };

export interface PrimaryOptions {
  vm: QemuVm;
  runDir: string;
  standby: { host: string; port: number };
  psk: Buffer;
  periodMs: number;
  heartbeatMs: number;
  timeoutMs: number;
  retryMs: number;
  maxInflight?: number;
  onEvent?: (e: PrimaryEvent) => void;
  /** Fault injection for tests: called at each point; may kill things. */
  fault?: (point: FaultPoint, epoch: number, ctx: FaultContext) => Promise<void> | void;
  /** A regex whose first group is the guest's progress counter in its console output. */
  counterRe?: RegExp;
  /** The guest's network relay: output is held until its checkpoint commits. */
  relay?: NetRelay;
  /** The guest's disk server: its writes travel with the checkpoints. */
  nbd?: NbdServer | null;
  /** Held output is released unprotected when no standby has taken over protection for this long. */
  holdOnLossMs?: number;
  /** When to checkpoint (default: fixed at periodMs). */
  policy?: Policy;
  /** Records the protected run's events for the simulator (performance.now() clock). */
  trace?: TraceRecorder;
}

export interface FaultContext {
  /** Writes only part of this checkpoint's frame to the link (death mid-transfer). */
  sendPartial(fraction: number): void;
  crash(): Promise<void>;
}

/** A checkpoint shipped and not yet acknowledged; sentAtMs on the performance.now() clock. */
interface Inflight { epoch: number; counter: number; sentAtMs: number; tag: number; record?: EpochRecord; traced?: number }

export class PrimaryController {
  private stopped = false;
  private link: Link | null = null;
  private capture: ColoCapture | null = null;
  private readonly emit: (e: PrimaryEvent) => void;
  private lastCounter = -1;
  ackedEpoch = -1;
  ackedCounter = -1;
  epoch = 0;
  private loop: Promise<void> | null = null;
  private meter: PauseMeter;

  constructor(private readonly o: PrimaryOptions) {
    this.emit = o.onEvent ?? (() => {});
    const re = o.counterRe ?? /work=(\d+)/;
    o.vm.on('serial', (line: string) => {
      const m = line.match(re);
      if (m) this.lastCounter = Number(m[1]);
      this.emit({ event: 'guest', line, atMs: Date.now() });
    });
    o.vm.on('exit', () => {
      this.emit({ event: 'vm-exited' });
      this.link?.close(new RubatoError('RUBATO_QEMU_EXITED', 'the guest QEMU exited'));
    });
    this.meter = new PauseMeter(o.vm.qmp);
  }

  get protected(): boolean { return this.capture !== null && this.link !== null && !this.link.closed; }

  start(): void {
    assert(this.loop === null, 'started once');
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    while (!this.stopped && !this.o.vm.exited) {
      let failure: unknown = null;
      try {
        await this.session();
      } catch (e) {
        failure = e;
      }
      if (this.o.relay) this.o.relay.output.onHeld = null;
      if (this.o.nbd) this.o.nbd.onIo = null;
      // The guest is running again (unprotected) before anyone is told so.
      const c = this.capture;
      this.capture = null;
      await c?.close().catch(() => {});
      this.link?.close();
      this.link = null;
      if (this.stopped || this.o.vm.exited) break;
      this.scheduleGiveUp();
      if (failure) {
        log.error(`GUEST ${this.o.vm.spec.name} IS RUNNING UNPROTECTED: ${errorMessage(failure)}; retrying every ${this.o.retryMs} ms`);
        this.emit({ event: 'unprotected', reason: errorMessage(failure), atMs: Date.now() });
      }
      await sleep(this.o.retryMs);
    }
  }

  private giveUpTimer: NodeJS.Timeout | null = null;
  /** Held output waits a while for a standby to take over protection, then leaves unprotected. */
  private scheduleGiveUp(): void {
    const relay = this.o.relay;
    if (!relay || this.giveUpTimer || this.stopped) return;
    this.giveUpTimer = setTimeout(() => {
      this.giveUpTimer = null;
      if (this.protected || !relay.output.holding) return;
      const n = relay.stats().frames;
      relay.giveUp();
      log.error(`no standby for ${this.o.holdOnLossMs ?? 2000} ms: releasing ${n} held frames UNPROTECTED; output now passes through until protection resumes`);
      this.emit({ event: 'output-released-unprotected', frames: n });
    }, this.o.holdOnLossMs ?? 2000);
  }

  private async connectLink(): Promise<Link> {
    const { host, port } = this.o.standby;
    const sock = connect({ host, port });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => { sock.destroy(); reject(new RubatoError('RUBATO_PEER_LOST', `standby ${host}:${port} did not answer within ${this.o.timeoutMs} ms`)); }, this.o.timeoutMs);
      sock.once('connect', () => { clearTimeout(t); resolve(); });
      sock.once('error', (e) => { clearTimeout(t); reject(new RubatoError('RUBATO_PEER_LOST', `cannot reach standby ${host}:${port}: ${e.message}`)); });
    });
    return new Link(sock, this.o.psk, `standby ${host}:${port}`);
  }

  private async session(): Promise<void> {
    const link = await this.connectLink();
    this.link = link;
    const identity: Identity = { vm: this.o.vm.spec.name, spec: this.o.vm.spec };
    await link.connectHandshake(this.o.psk, identity, this.o.timeoutMs * 5);
    link.startHeartbeats(this.o.heartbeatMs, this.o.timeoutMs);
    const inflight: Inflight[] = [];
    let ackWaiter: (() => void) | null = null;
    let fenceRequested = false;
    link.on('frame', (f: Frame) => {
      if (f.type === FrameType.ACK) {
        const head = inflight[0];
        if (head && f.epoch === head.epoch) {
          inflight.shift();
          const transferMs = performance.now() - head.sentAtMs;
          if (head.record) head.record.transferMs = transferMs;
          if (head.traced !== undefined) this.o.trace?.acked(head.traced, transferMs);
          this.o.relay?.commit(head.tag);
          this.ackedEpoch = f.epoch;
          this.ackedCounter = head.counter;
          this.emit({ event: 'acked', epoch: f.epoch, counter: head.counter, lagMs: Math.round(transferMs) });
        } else if (f.epoch !== 0 || head) {
          link.close(new RubatoError('RUBATO_PROTOCOL', `ack for ${f.epoch}, expected ${head?.epoch ?? 'none'}`));
        }
        ackWaiter?.();
      } else if (f.type === FrameType.FENCE) {
        fenceRequested = true;
        ackWaiter?.();
      }
    });
    link.startEvents();
    const closed = new Promise<Error>((resolve) => link.once('close', resolve));
    closed.then(() => ackWaiter?.());
    const throwIfClosed = () => { if (link.closed) throw link.closed; };

    // Initial synchronisation: a fresh COLO session, its full image shipped with progress.
    let baseTag = 0;
    const { relay, nbd } = this.o;
    const { capture, base } = await ColoCapture.start(this.o.vm, {
      runDir: this.o.runDir,
      beforeReady: async (b) => {
        // Guest paused at the end of the full copy: output so far is covered by this image.
        if (relay) { relay.output.hold(); baseTag = relay.output.advance(); }
        if (nbd) {
          const img = await readFile(nbd.imagePath);
          nbd.cutEpoch();
          b.blocks.push({ id: DISK_BLOCK_ID, lengthBytes: img.length });
          b.ram.set(DISK_BLOCK_ID, img);
        }
      },
    });
    this.capture = capture;
    this.epoch = 0;
    inflight.push({ epoch: 0, counter: this.lastCounter, sentAtMs: performance.now(), tag: baseTag });
    await this.sendBase(link, base);
    while (inflight.length) { throwIfClosed(); await new Promise<void>((r) => { ackWaiter = r; }); ackWaiter = null; }
    this.emit({ event: 'protecting', standby: link.peer });
    log.info(`guest ${this.o.vm.spec.name} protected by ${link.peer}`);
    this.meter.startNow();

    const maxInflight = this.o.maxInflight ?? 4;
    const policy = this.o.policy ?? fixed(this.o.periodMs);
    const history: EpochRecord[] = [];
    const reasons: Record<string, number> = {};
    let waitsForLink = 0;
    let statusAt = performance.now();
    let statusEpoch = 0;
    let statusBytes = link.stats.bytesSent;
    let lastPages = 0;
    let diskWrites = 0;
    let diskFlushes = 0;
    let epochStart = performance.now();
    let wake: (() => void) | null = null;
    const poke = () => { const w = wake; wake = null; w?.(); };
    if (relay) relay.output.onFirstHeld = poke;
    if (nbd) nbd.onFlush = poke;
    const trace = this.o.trace;
    if (trace && relay) relay.output.onHeld = () => trace.output(performance.now());
    if (trace && nbd) nbd.onIo = (kind) => trace.disk(kind, performance.now());
    const blockIndex = new Map(base.blocks.map((b, i) => [b.id, i]));
    for (;;) {
      throwIfClosed();
      if (fenceRequested) { await this.fence(link, capture, base, inflight, () => new Promise<void>((r) => { ackWaiter = r; })); return; }
      await this.o.fault?.('mid-epoch', this.epoch + 1, { sendPartial: () => {}, crash: () => this.crash() });
      const nowMs = performance.now();
      const ds = nbd?.epochStats;
      const tel: Telemetry = {
        nowMs, epochStartMs: epochStart, history,
        output: relay ? relay.output.openStats(Date.now()) : { frames: 0, bytes: 0, oldestMs: null },
        disk: { writes: ds?.writes ?? 0, flushes: ds?.flushes ?? 0 },
        link: { bytesPerSec: null, rttMs: link.stats.rttMs }, backlog: inflight.length,
      };
      const d = policy.decide(tel);
      reasons[d.reason] = (reasons[d.reason] ?? 0) + 1;
      if (!d.checkpoint) {
        const ms = Math.max(0, d.wakeAtMs - nowMs);
        await Promise.race([sleep(ms), closed, new Promise<void>((r) => { wake = r; })]);
        wake = null;
        continue;
      }
      log.debug('checkpoint decision', { policy: policy.name, reason: d.reason, ageMs: (nowMs - epochStart).toFixed(1) });
      if (inflight.length >= maxInflight) {
        waitsForLink++;
        await new Promise<void>((r) => { ackWaiter = r; });
        ackWaiter = null;
        continue;
      }
      const counter = this.lastCounter;
      const fault = this.o.fault;
      let tag = 0;
      let lengthMs = 0;
      let outputFrames = 0;
      const cp = await capture.checkpoint({
        beforeReply: () => {
          lengthMs = performance.now() - epochStart;
          if (relay) { outputFrames = relay.output.openStats(0).frames; tag = relay.output.advance(); }
        },
        onLocal: (c) => {
          if (!nbd) return;
          const d = nbd.cutEpoch();
          diskWrites += d.writes;
          diskFlushes += d.flushes;
          for (const [offset, data] of d.pages) c.pages.push({ block: DISK_BLOCK_ID, offset, data });
        },
        ...(fault ? { hold: async (c: Checkpoint) => { await fault('mid-pause', c.epoch, { sendPartial: () => {}, crash: () => this.crash() }); } } : {}),
      });
      const ranFrom = epochStart;
      epochStart = performance.now();
      this.epoch = cp.epoch;
      lastPages = cp.pages.length;
      const record = encodeRecord(cp, base.blocks);
      let traced: number | undefined;
      if (trace) {
        const ids = new Uint32Array(cp.pages.length);
        cp.pages.forEach((p, i) => { ids[i] = ((blockIndex.get(p.block) ?? 255) << 24 | Math.floor(p.offset / 4096)) >>> 0; });
        traced = trace.epoch(ranFrom, ranFrom + lengthMs, cp.timings.pauseMsLocal, record.length, ids, nowMs);
      }
      const rec: EpochRecord = { lengthMs, dirtyPages: cp.pages.length, pauseMs: cp.timings.pauseMsLocal, bytes: record.length, transferMs: null, outputFrames };
      history.push(rec);
      if (history.length > HISTORY_KEPT) history.shift();
      inflight.push({ epoch: cp.epoch, counter, sentAtMs: performance.now(), tag, record: rec, ...(traced !== undefined ? { traced } : {}) });
      if (this.o.fault) await this.o.fault('mid-transfer', cp.epoch, { sendPartial: (f) => link.sendPartial(FrameType.CKPT, cp.epoch, record, Math.floor(record.length * f)), crash: () => this.crash() });
      if (this.stopped) throw new RubatoError('RUBATO_CAPTURE_FAILED', 'controller crashed');
      void link.send(FrameType.CKPT, cp.epoch, record).catch(() => {});
      this.emit({ event: 'checkpoint', epoch: cp.epoch, pages: cp.pages.length, bytes: record.length, pauseMs: cp.timings.pauseMsLocal, captureMs: cp.timings.captureMs, counter });
      if (performance.now() - statusAt >= 1000) {
        const secs = (performance.now() - statusAt) / 1000;
        const pauses = this.meter.pausesMs().slice(-20);
        this.emit({
          event: 'status', epoch: cp.epoch, ackedEpoch: this.ackedEpoch, ckptPerSec: Math.round(((cp.epoch - statusEpoch) / secs) * 10) / 10,
          dirtyPages: lastPages, pauseMs: pauses.length ? Math.round((pauses.reduce((a, b) => a + b, 0) / pauses.length) * 100) / 100 : cp.timings.pauseMsLocal,
          mbPerSec: Math.round(((link.stats.bytesSent - statusBytes) / secs / 1e6) * 10) / 10, lagMs: inflight[0] ? Math.round(performance.now() - inflight[0].sentAtMs) : 0,
          rttMs: link.stats.rttMs === null ? null : Math.round(link.stats.rttMs * 100) / 100, inflight: inflight.length, waitsForLink,
          ...heldStats(relay), diskWrites, diskFlushes,
        });
        diskWrites = 0;
        diskFlushes = 0;
        this.emit({ event: 'decisions', reasons: { ...reasons }, policy: policy.name });
        statusAt = performance.now();
        statusEpoch = cp.epoch;
        statusBytes = link.stats.bytesSent;
      }
    }
  }

  private async sendBase(link: Link, base: BaseImage): Promise<void> {
    const totalBytes = base.blocks.reduce((s, b) => s + b.lengthBytes, 0);
    await link.send(FrameType.BASE_BEGIN, 0, encodeLayout({ machine: base.machine, blocks: base.blocks, totalBytes }));
    const t0 = performance.now();
    let sent = 0;
    let lastProgress = 0;
    for (const [i, b] of base.blocks.entries()) {
      const ram = base.ram.get(b.id)!;
      for (let off = 0; off < ram.length; off += BASE_CHUNK_BYTES) {
        const data = ram.subarray(off, Math.min(ram.length, off + BASE_CHUNK_BYTES));
        await link.send(FrameType.BASE_DATA, 0, encodeBaseData(i, off, data));
        sent += data.length;
        if (performance.now() - lastProgress > 500) {
          lastProgress = performance.now();
          const rate = sent / Math.max((performance.now() - t0) / 1000, 1e-3);
          this.emit({ event: 'sync-progress', bytes: sent, totalBytes, percent: Math.round((sent / totalBytes) * 1000) / 10, mbPerSec: Math.round(rate / 1e5) / 10, etaSec: Math.round(((totalBytes - sent) / rate) * 10) / 10 });
        }
      }
    }
    await link.send(FrameType.BASE_END, 0, base.deviceState);
  }

  /** Switchover: a last checkpoint, its ack, then the guest stops here before the standby starts it. */
  private async fence(link: Link, capture: ColoCapture, base: BaseImage, inflight: Inflight[], waitAck: () => Promise<void>): Promise<void> {
    log.warn(`standby asked for failover: taking a last checkpoint and stopping guest ${this.o.vm.spec.name}`);
    const cp: Checkpoint = await capture.checkpoint({ hold: async () => { await this.o.vm.qmp.execute('stop').catch(() => {}); } });
    inflight.push({ epoch: cp.epoch, counter: this.lastCounter, sentAtMs: performance.now(), tag: 0 });
    await link.send(FrameType.CKPT, cp.epoch, encodeRecord(cp, base.blocks));
    while (inflight.length && !link.closed) await waitAck();
    await this.o.vm.qmp.execute('stop').catch(() => {});
    this.stopped = true;
    await link.send(FrameType.FENCED, 0).catch(() => {});
    this.emit({ event: 'fenced' });
    await this.o.vm.stop();
  }

  /** Orderly end: the standby keeps its replica and does not fail over. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.giveUpTimer) clearTimeout(this.giveUpTimer);
    if (this.link && !this.link.closed) await this.link.send(FrameType.BYE, 0).catch(() => {});
    this.link?.close();
    await this.capture?.close().catch(() => {});
    await this.loop;
    this.o.relay?.giveUp(); // protection ends by choice: held output leaves, later output passes through
  }

  /** Simulates the controller's death: no goodbye, sockets dropped, QEMU killed by PID. */
  async crash(): Promise<void> {
    this.stopped = true;
    if (this.giveUpTimer) clearTimeout(this.giveUpTimer);
    this.link?.socket.destroy();
    await this.o.vm.kill();
    const c = this.capture;
    this.capture = null;
    await c?.close().catch(() => {});
  }
}

function heldStats(relay: NetRelay | undefined): { heldFrames: number; heldBytes: number; oldestHeldMs: number | null } {
  if (!relay) return { heldFrames: 0, heldBytes: 0, oldestHeldMs: null };
  const s = relay.stats();
  return { heldFrames: s.frames, heldBytes: s.bytes, oldestHeldMs: s.oldestMs };
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
