// The primary controller: the epoch pipeline (pipeline.ts) plus its I/O adapters — the link to the
// standby, the COLO capture, the guest's network relay and disk server. It runs the guest, keeps
// it protected, and says so loudly (once) when it is not. It decides nothing about epochs itself:
// when to checkpoint, what may be released and when protection is lost are the pipeline's calls.

import { connect } from 'node:net';
import {
  RubatoError,
  errorMessage,
  assert,
  logger,
  onceWithin,
  sleep,
  collectNow,
  HostIdleMeter,
  Wakeup,
} from '../util/index.ts';
import type { QemuVm } from '../qemu/index.ts';
import { ColoCapture, PauseMeter, type Checkpoint, type DirtyPage, type RamBlockInfo } from '../capture/index.ts';
import { OutputCommit, type DiskEpochCut, type DiskEpochWrites } from '../commit/index.ts';
import { type GuestNet, type DiskSet, allocatedExtents, extentBytes } from '../io/index.ts';
import { comparing, fixed, type Policy } from '../scheduler/index.ts';
import { Link } from './link.ts';
import { connectHandshake } from './handshake.ts';
import { EpochPipeline, type Command } from './pipeline.ts';
import { dispatch, type OutsideHandlers } from './driver.ts';
import { FrameType, type Frame } from './protocol/frame.ts';
import { decodeAckTimings, type Identity } from './protocol/messages.ts';
import { CompareSide } from './compare-side.ts';
import { BaseSender, sendDiskExtents } from './base-sender.ts';
import type { RecordParts } from './protocol/record.ts';
import { SentPages, SENT_PAGES_BYTES } from './sent-pages.ts';
import { checkpointFrames, presendFrames, FRAME_PAGES, type WireCheckpoint } from './wire-frames.ts';
import { StatusMeter, type PrimaryStatus } from './status.ts';
import type { SyncProgress } from './progress.ts';
import type { CheckpointObserver } from './observer.ts';

/** The RAM-block name under which the guest's disk travels in checkpoints and lives in the replica. */
/** The first disk's replica block (diskBlockId(0)). */
export const DISK_BLOCK_ID = 'disk0';

const log = logger('primary');
const DEFAULT_MAX_HELD_BYTES = 64 << 20;
/** A checkpoint record this large is worth a garbage collection before it is shipped. */
const LARGE_RECORD_BYTES = 16 << 20;
const EMPTY: WireCheckpoint = {
  lead: [],
  record: { parts: [], length: 0 },
  counts: { same: 0, delta: 0, whole: 0, savedBytes: 0 },
  length: 0,
};
const noRefs = () => ({ same: 0, delta: 0, savedBytes: 0, bytes: 0 });
/** Reconnections without a pause after an authenticated session broke. */
const IMMEDIATE_RETRIES = 3;
/** After a failed session: how long to wait for QEMU's exit to be reported (a dead QEMU breaks the capture first). */
const QEMU_EXIT_WAIT_MS = 150;

export type FaultPoint = 'mid-epoch' | 'mid-pause' | 'mid-transfer';

/** How held output leaves: after its checkpoint's ack, when a secondary sent the same, or auto (compare where it pays). */
export type ReleaseMode = 'buffer' | 'compare' | 'auto';

export type PrimaryEvent =
  | { event: 'protecting'; standby: string }
  | { event: 'unprotected'; reason: string; atMs: number }
  | SyncProgress
  /** `presentPages`: pages pre-sent to the standby's staging in the epoch, besides the `pages` its record carried. */
  | {
      event: 'checkpoint';
      epoch: number;
      pages: number;
      bytes: number;
      pauseMs: number;
      captureMs: number;
      counter: number;
      presentPages?: number;
      /** PRESEND frames that carried the checkpoint's leading pages (it had more than a frame holds). */
      leadFrames?: number;
      /** What the epoch's pre-sends put on the link (their pages as sent, references included). */
      presentBytes?: number;
      /**
       * Of the pages of the record and the pre-sends: those sent as a reference to the standby's copy with the same
       * bytes, or with the runs that changed (`sent-pages.ts`), and the page bytes that saved on the link.
       */
      samePages?: number;
      deltaPages?: number;
      savedBytes?: number;
    }
  /** `atMs`: when the acknowledgement was taken (wall clock), before its frames were let out. */
  | { event: 'acked'; epoch: number; counter: number; lagMs: number; frames: number; atMs: number }
  | PrimaryStatus
  | { event: 'output-released-unprotected'; frames: number; reason: string }
  | { event: 'decisions'; reasons: Record<string, number>; policy: string }
  /** --mode auto: the scheduler now plans as compare or as buffer mode (the secondary compares in both). */
  | { event: 'planning'; to: 'compare' | 'buffer'; comparedShare: number | null; reason: string }
  | { event: 'guest'; line: string; atMs: number }
  | { event: 'fenced' }
  | { event: 'guest-lost'; why: string; protected: boolean }
  | { event: 'vm-exited' };

export interface HostPort {
  host: string;
  port: number;
}

export interface PrimaryOptions {
  vm: QemuVm;
  runDir: string;
  /** Before the standby is told to take over because QEMU died here: give the lease up (it may claim at once). */
  beforeGuestLost?: () => Promise<void>;
  /**
   * The standby's address, or where to find it before each connection (agents: the witness names it; null: none placed
   * yet).
   */
  standby: HostPort | (() => Promise<HostPort | null>);
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
  /** The guest's network (one relay, or a set of one per NIC): output is held until its checkpoint commits. */
  relay?: GuestNet;
  /** The guest's disk servers (one per disk): their writes travel with the checkpoints. */
  disks?: DiskSet | null;
  /** Held output is released unprotected when no standby has taken over protection for this long. */
  holdOnLossMs?: number;
  /** Bound on held output; frames past it are dropped (TCP retransmits them). */
  maxHeldBytes?: number;
  /** When to checkpoint (default: fixed at periodMs). */
  policy?: Policy;
  /** Sees every checkpoint, ack, output frame and disk operation (the benchmarks' trace recorder). */
  observer?: CheckpointObserver;
  /** This host's witness generation for the VM (its fencing token), sent with every session. */
  generation?: () => number | null;
  /** How the VM is fenced (status and metrics show it; default none). */
  fencing?: 'witness' | 'none';
  /**
   * compare: the standby runs a secondary VM on the same input; a held frame leaves as soon as the
   * secondary sent the same one (COLO's idea), else with its checkpoint's acknowledgement. Default buffer.
   */
  mode?: ReleaseMode;
  /** Compare mode: a held frame whose secondary copy has not come within this is waited for by a checkpoint. */
  compareLagMs?: number;
  /**
   * A RAM page dirtied again goes as a reference to the copy both sides keep of its last bytes: unchanged, or
   * its changed runs (`sent-pages.ts`). false: every dirty page goes whole. Default true.
   */
  pageRefs?: boolean;
  /**
   * The most pages one frame carries (default FRAME_PAGES, 4 MiB): a larger checkpoint goes as PRESEND frames of
   * its leading pages first, then its CKPT (`wire-frames.ts`), and so does a larger pre-send.
   */
  framePages?: number;
}

export interface FaultContext {
  /** Writes only part of this checkpoint's frame to the link (death mid-transfer). */
  sendPartial(fraction: number): void;
  crash(): Promise<void>;
}

export class PrimaryController {
  private stopped = false;
  private link: Link | null = null;
  private capture: ColoCapture | null = null;
  private blocks: RamBlockInfo[] = [];
  /** Block id → its index in the layout (page ids in traces). */
  private blockIndex = new Map<string, number>();
  /** This session's copies of the RAM pages sent last (null: before the first synchronisation). */
  private sent: SentPages | null = null;
  /** What the pre-sends of the current epoch sent as references, and their bytes. */
  private presendRefs = noRefs();
  private readonly emit: (e: PrimaryEvent) => void;
  private lastCounter = -1;
  /** The guest's progress counter at each unacknowledged checkpoint's pause (for ackedCounter). */
  private readonly counterAt = new Map<number, number>();
  private readonly tracedAt = new Map<number, number>();
  ackedCounter = -1;
  private loop: Promise<void> | null = null;
  private readonly meter: PauseMeter;
  private readonly commit: OutputCommit;
  readonly pipeline: EpochPipeline;
  /** The decision loop's one wait (output appeared, a flush, an ack, a fence, the link closed). */
  private readonly wakeup = new Wakeup();
  private holdTimer: NodeJS.Timeout | null = null;
  private readonly ended = new AbortController();
  /** The current session got past the handshake (the standby may be guarding our replica). */
  private authenticatedSession = false;
  private immediateRetries = 0;
  /** The host's idle cores (presend=auto passes during an epoch only with some). */
  private readonly hostIdle = new HostIdleMeter();

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
    this.commit = new OutputCommit(o.maxHeldBytes ?? DEFAULT_MAX_HELD_BYTES, o.disks?.size ? o.disks : null);
    this.pipeline = new EpochPipeline({
      // compare and auto modes: matched output needs no checkpoint; only late or differing output
      // does (auto: while it plans as compare mode)
      policy:
        o.mode && o.mode !== 'buffer' && o.relay
          ? comparing(o.policy ?? fixed(o.periodMs), () => this.planningCompare)
          : (o.policy ?? fixed(o.periodMs)),
      commit: this.commit,
      maxInflight: o.maxInflight ?? 4,
    });
    const { relay, observer } = o;
    const disks = o.disks?.size ? o.disks : null;
    if (relay && o.mode && o.mode !== 'buffer')
      this.compare = new CompareSide({
        mode: o.mode,
        commit: this.commit,
        relay,
        ...(o.compareLagMs !== undefined ? { lagMs: o.compareLagMs } : {}),
        link: () => this.link,
        protecting: () => this.protected,
        onMismatch: () => this.poke(),
        onPlanning: (ch) => this.emit({ event: 'planning', ...ch }),
      });
    if (relay) {
      relay.onGuestFrame = (f) => {
        const seq = this.commit.nextHeldSeq;
        const out = this.commit.push(f, performance.now());
        if (out) relay.sendOutside(out);
        else if (this.commit.nextHeldSeq !== seq) this.compare?.held(seq, f);
      };
    }
    this.commit.onFirstHeld = () => this.poke();
    if (disks) {
      disks.onFlush = () => this.poke();
      disks.onPressure = () => {
        // An epoch's dirty set reached its bound: decide now. Unprotected, nobody cuts epochs:
        // the writes logged are dropped (the next synchronisation copies the image whole).
        const phase = this.pipeline.phase;
        if (phase === 'unprotected' || phase === 'stopped') disks.cutEpoch(true);
        else this.poke();
      };
    }
    if (observer?.output) {
      const output = observer.output.bind(observer);
      this.commit.onHeld = (f, atMs) => output(atMs, f.length);
    }
    if (observer?.disk && disks) {
      const disk = observer.disk.bind(observer);
      disks.onIo = (kind) => disk(kind, performance.now());
    }
  }

  /** Compare mode's half on this side (null: buffer mode). */
  private readonly compare: CompareSide | null = null;
  /** The scheduler plans as compare mode: matched output calls for no checkpoint. */
  private get planningCompare(): boolean {
    return this.compare?.plansCompare ?? false;
  }

  /** The latest status event, and why the guest is unprotected (null while protected). */
  private lastStatus: PrimaryStatus | null = null;

  /**
   * What `rubato status` shows for this side: role, protection and why not, epochs, lag, rates, pauses, held output.
   */
  snapshot(): Record<string, unknown> {
    const now = performance.now();
    const pauses = this.pipeline.history.map((h) => h.pauseMs).sort((a, b) => a - b);
    const q = (f: number) =>
      pauses.length
        ? Math.round(pauses[Math.min(pauses.length - 1, Math.floor(f * pauses.length))]! * 100) / 100
        : null;
    const out = this.commit.stats(now);
    const oldest = this.pipeline.oldestInflightSentMs;
    return {
      role: 'primary',
      vm: this.o.vm.spec.name,
      fencing: this.o.fencing ?? 'none',
      protected: this.protected,
      unprotectedReason: this.protected ? null : (this.pipeline.lossReason ?? 'the link to the standby is down'),
      standby: this.standbyAt ? `${this.standbyAt.host}:${this.standbyAt.port}` : null,
      phase: this.pipeline.phase,
      /** The witness's generation this copy holds (the fencing token; null without a witness). */
      generation: this.o.generation?.() ?? null,
      /** Full synchronisations of the standby by this controller (1 after the first). */
      syncs: this.pipeline.generation,
      epoch: this.epoch,
      ackedEpoch: this.ackedEpoch,
      lagMs: oldest === null ? 0 : Math.round(now - oldest),
      ckptPerSec: this.lastStatus?.ckptPerSec ?? 0,
      pauseMsP50: q(0.5),
      pauseMsP99: q(0.99),
      dirtyPages: this.pipeline.history.at(-1)?.dirtyPages ?? 0,
      heldFrames: out.frames,
      heldBytes: out.bytes,
      oldestHeldMs: out.oldestMs === null ? null : Math.round(out.oldestMs),
      outputBlockedNoLease: this.o.relay?.gate?.blocked.frames ?? 0,
      output: out.counts,
      outputWaitMsP50: out.waitMsP50,
      mode: this.o.mode ?? 'buffer',
      ...this.compare?.snapshot(),
      rttMs: this.link && !this.link.closed ? this.link.stats.rttMs : null,
    };
  }

  get protected(): boolean {
    return this.pipeline.phase === 'protecting' && this.link !== null && !this.link.closed;
  }
  get ackedEpoch(): number {
    return this.pipeline.ackedEpoch;
  }
  get epoch(): number {
    return Math.max(0, this.pipeline.capturedEpoch);
  }

  start(): void {
    assert(this.loop === null, 'started once');
    this.loop = this.run();
  }

  /** Wakes the decision loop. */
  private poke(): void {
    this.wakeup.wake();
  }

  /** Sleeps until `ms` passed or poke() is called. */
  private async idle(ms: number): Promise<void> {
    await this.wakeup.sleep(ms);
  }

  private async run(): Promise<void> {
    while (!this.stopped && !this.o.vm.exited && !this.o.vm.qmp.isClosed) {
      let failure: unknown = null;
      try {
        await this.session();
      } catch (e) {
        failure = e;
      }
      // The guest is running again (unprotected) before anyone is told so.
      const c = this.capture;
      this.capture = null;
      await c?.close();
      // QEMU died under the session (its QMP socket closes before the exit is reported): the
      // standby is told on this link to take over now, and nothing reconnects (a new session
      // would tell a guarding standby its primary is back).
      if (!this.stopped && (await this.qemuGone(failure !== null))) {
        const how = this.o.vm.exitedHow ?? errorMessage(failure ?? 'its session ended');
        this.lostGuest ??= this.tellGuestLost(`the guest's QEMU died on this host (${how})`);
        await this.lostGuest;
        break;
      }
      if (this.stopped) {
        // stop(), a fence or a lost guest said its last word on this link (BYE, FENCED, GUEST_LOST) the moment it
        // set `stopped`; the link ends after it, in order. A destroy here could drop that word still queued
        // behind a checkpoint (seen once under load: the standby took an orderly stop for a lost primary).
        await this.link?.closeGracefully(new RubatoError('RUBATO_PEER_LOST', 'protection ended'));
        this.link = null;
        break;
      }
      this.link?.close();
      this.link = null;
      if (this.o.vm.exited || this.o.vm.qmp.isClosed) break;
      // A session that broke after the standby had authenticated us (a corrupted frame, a reset, a
      // failed capture — during protection or a re-sync) reconnects at once: a standby that guards
      // a replica of ours waits out its liveness timeout before it takes over, and a new
      // authenticated session within it means no failover. Up to IMMEDIATE_RETRIES in a row, so a
      // standby that keeps failing us cannot make this a busy loop; otherwise wait retryMs.
      const authenticated = this.authenticatedSession;
      this.authenticatedSession = false;
      this.perform(this.pipeline.linkLost(failure ? errorMessage(failure) : 'the session ended'));
      this.immediateRetries =
        authenticated && this.immediateRetries < IMMEDIATE_RETRIES ? this.immediateRetries + 1 : 0;
      if (this.immediateRetries === 0) await sleep(this.o.retryMs, this.ended.signal);
    }
  }

  /**
   * Carries out the pipeline's commands that act outside the checkpoint loop (shared driver: unexpected commands fail).
   */
  private perform(cmds: Command[]): void {
    dispatch(cmds, this.outside, 'primary');
  }

  private readonly outside: OutsideHandlers = {
    release: (c) => {
      const atMs = Date.now();
      for (const f of c.frames) this.o.relay?.sendOutside(f.frame);
      if (c.frames.length && this.o.observer?.released)
        this.o.observer.released(
          c.timeline,
          c.frames.map((f) => f.atMs),
          performance.now(),
        );
      const counter = this.counterAt.get(c.epoch) ?? this.ackedCounter;
      this.counterAt.delete(c.epoch);
      this.ackedCounter = counter;
      const handle = this.tracedAt.get(c.epoch);
      if (handle !== undefined) {
        this.tracedAt.delete(c.epoch);
        this.o.observer?.acked?.(handle, c.transferMs);
      }
      this.emit({
        event: 'acked',
        epoch: c.epoch,
        counter,
        lagMs: Math.round(c.transferMs),
        frames: c.frames.length,
        atMs,
      });
      this.compare?.acknowledged(c.epoch);
    },
    protected: (c) => {
      this.cancelHoldTimer();
      this.immediateRetries = 0;
      this.emit({ event: 'protecting', standby: this.link?.peer ?? '' });
      // ("generation" to an operator is the witness's, the fencing token; the pipeline's count of full
      // synchronisations is called that here)
      const witness = this.o.generation?.() ?? null;
      log.info(
        `guest ${this.o.vm.spec.name} protected by ${this.link?.peer ?? 'the standby'} (full synchronisation ${c.generation} of this controller${witness ? `; witness generation ${witness}` : ''})`,
      );
      this.meter.startNow();
    },
    unprotected: (c) => {
      this.compare?.reset();
      if (c.first) {
        log.error(
          `GUEST ${this.o.vm.spec.name} IS RUNNING UNPROTECTED: ${c.reason}; retrying every ${this.o.retryMs} ms`,
        );
        this.emit({ event: 'unprotected', reason: c.reason, atMs: Date.now() });
      } else {
        log.debug(`still unprotected: ${c.reason}`);
      }
      this.startHoldTimer();
    },
    'release-unprotected': (c) => {
      for (const f of c.frames) this.o.relay?.sendOutside(f);
      log.error(
        `${c.reason}: released ${c.frames.length} held frames UNPROTECTED; output passes through until protection resumes`,
      );
      this.emit({ event: 'output-released-unprotected', frames: c.frames.length, reason: c.reason });
    },
    'stop-guest': () => this.poke(),
  };

  /** Held output waits a while for a standby to take over protection, then leaves unprotected. */
  private startHoldTimer(): void {
    if (!this.o.relay || this.holdTimer || this.stopped) return;
    const ms = this.o.holdOnLossMs ?? 2000;
    this.holdTimer = setTimeout(() => {
      this.holdTimer = null;
      this.perform(this.pipeline.holdExpired(`no standby for ${ms} ms`));
    }, ms);
  }

  private cancelHoldTimer(): void {
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = null;
  }

  /** The last checkpoint or pre-send handed to the link, resolved once the socket took it (never rejects). */
  private shipping: Promise<void> = Promise.resolve();

  /** The standby last connected to (or tried). */
  private standbyAt: HostPort | null = null;

  private async connectLink(): Promise<Link> {
    const at = typeof this.o.standby === 'function' ? await this.o.standby().catch(() => null) : this.o.standby;
    if (!at) throw new RubatoError('RUBATO_PEER_LOST', 'no standby placed for this VM yet');
    this.standbyAt = at;
    const { host, port } = at;
    const sock = connect({ host, port });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => {
        sock.destroy();
        reject(
          new RubatoError('RUBATO_PEER_LOST', `standby ${host}:${port} did not answer within ${this.o.timeoutMs} ms`),
        );
      }, this.o.timeoutMs);
      sock.once('connect', () => {
        clearTimeout(t);
        resolve();
      });
      sock.once('error', (e) => {
        clearTimeout(t);
        reject(new RubatoError('RUBATO_PEER_LOST', `cannot reach standby ${host}:${port}: ${e.message}`));
      });
    });
    return new Link(sock, this.o.psk, `standby ${host}:${port}`, 'primary');
  }

  /** Frames from the standby: acks (checked against the pipeline before it sees them), fence, bye. */
  private onFrame(link: Link, f: Frame): void {
    if (f.type === FrameType.ACK) {
      if (!this.pipeline.expectsAck(f.epoch)) {
        link.close(
          new RubatoError(
            'RUBATO_PROTOCOL',
            `ack for ${f.epoch} from ${link.peer}, which is not the next checkpoint waiting for one`,
          ),
        );
        return;
      }
      const atMs = performance.now();
      let timings: ReturnType<typeof decodeAckTimings>;
      try {
        timings = decodeAckTimings(f.payload);
      } catch (e) {
        link.close(e as Error);
        return;
      }
      this.perform(this.pipeline.ack(f.epoch, atMs, timings));
      this.poke();
    } else if (f.type === FrameType.SEC_OUT) {
      try {
        this.compare?.secondarySent(f.epoch, f.payload);
      } catch (e) {
        link.close(e as Error);
      }
    } else if (f.type === FrameType.FENCE) {
      this.pipeline.fenceRequested();
      this.poke();
    } else if (f.type === FrameType.BYE) {
      link.close(new RubatoError('RUBATO_PEER_LOST', `${link.peer} stopped in order`));
    }
  }

  /** Who this side is to its standby: the VM, its spec and (with a witness) the generation it holds. */
  private identity(): Identity {
    const generation = this.o.generation?.() ?? null;
    return {
      vm: this.o.vm.spec.name,
      spec: this.o.vm.spec,
      ...(generation ? { generation } : {}),
      ...(this.compare ? { mode: 'compare' as const } : {}),
    };
  }

  private async session(): Promise<void> {
    const link = await this.connectLink();
    this.link = link;
    await connectHandshake(link, this.o.psk, this.identity(), this.o.timeoutMs * 5);
    this.authenticatedSession = true;
    link.startHeartbeats(this.o.heartbeatMs, this.o.timeoutMs);
    link.on('frame', (f: Frame) => this.onFrame(link, f));
    link.startEvents();
    link.once('close', () => this.poke());
    const throwIfClosed = () => {
      if (link.closed) throw link.closed;
    };
    const pipe = this.pipeline;

    // A new replica generation: a fresh COLO session whose full image streams to the standby as
    // QEMU sends it, the disk's allocated extents copied first (its writes from then on are logged
    // and go with the image), nothing of either collected here.
    this.compare?.reset();
    pipe.startSync();
    const disks = this.o.disks?.size ? this.o.disks : null;
    const diskBlocks = (disks?.blocks ?? []).map((b) => ({ id: b.id, lengthBytes: b.server.sizeBytes }));
    const extents = await Promise.all((disks?.blocks ?? []).map((b) => allocatedExtents(b.server.imagePath)));
    const diskBytes = extents.reduce((n, e) => n + extentBytes(e), 0);
    const sinceCopy: { disk: DiskEpochCut | null } = { disk: null };
    const sender = new BaseSender(link, {
      extraBlocks: diskBlocks,
      extraBytes: diskBytes,
      progress: (p) => this.emit(p),
      afterLayout: async (s) => {
        if (!disks) return;
        // writes before the copy starts are in what it reads (dropped here); later ones are logged
        disks.cutEpoch(true);
        for (const [i, b] of disks.blocks.entries()) await sendDiskExtents(s, b.id, b.server.imagePath, extents[i]!);
      },
    });
    const { capture, base } = await ColoCapture.start(this.o.vm, {
      runDir: this.o.runDir,
      baseSink: sender,
      // The disk copy runs inside the precopy (QEMU waits meanwhile): its time is not a stuck stream.
      precopyTimeoutMs: 300_000 + Math.ceil(diskBytes / (10 << 20)) * 1000,
      beforeReady: (b) => {
        // Guest paused at the end of the full copy: output so far is in this image, and so are the
        // disk writes logged since its copy began (taken now, sent once the guest runs again).
        const closed = pipe.paused(0, performance.now());
        if (diskBlocks.length) {
          b.blocks.push(...diskBlocks);
          sinceCopy.disk = closed.disk;
        }
      },
    });
    for (const d of (await sinceCopy.disk?.collect())?.disks ?? [])
      for (const [offset, data] of d.pages) sender.page(d.block, offset, data);
    this.capture = capture;
    this.blocks = base.blocks;
    assert(sender.layoutBlocks.length === base.blocks.length, "the layout sent is the capture's");
    this.blockIndex = new Map(base.blocks.map((b, i) => [b.id, i]));
    this.sent = new SentPages(base.blocks, (this.o.pageRefs ?? true) ? SENT_PAGES_BYTES : 0);
    this.presendRefs = noRefs();
    this.counterAt.set(0, this.lastCounter);
    // The full image streams as QEMU sends it: 'send' marks it handed to the link.
    dispatch(
      pipe.capturedCheckpoint(0, { dirtyPages: 0, pauseMs: 0, bytes: 0, resumedMs: performance.now() }),
      { send: (c) => pipe.sent(c.epoch, performance.now()) },
      'primary sync',
    );
    await sender.flush();
    await link.send(FrameType.BASE_END, 0, base.deviceState);
    while (pipe.phase === 'syncing') {
      throwIfClosed();
      await this.idle(Infinity);
    }

    const status = new StatusMeter(performance.now(), 0, link.stats.bytesSent);
    for (;;) {
      throwIfClosed();
      if (pipe.phase !== 'protecting') return; // fenced or stopped
      await this.o.fault?.('mid-epoch', pipe.capturedEpoch + 1, { sendPartial: () => {}, crash: () => this.crash() });
      throwIfClosed();
      const decidedMs = performance.now();
      this.compare?.choose(decidedMs);
      const ds = disks?.epochStats;
      const hostIdleCores = this.hostIdle.idleCores(decidedMs);
      const c = pipe.decide(decidedMs, {
        // (compare mode: a flush is not a reply on its way — the reply is compared when it comes)
        disk: {
          writes: ds?.writes ?? 0,
          flushes: this.planningCompare ? 0 : (ds?.flushes ?? 0),
          pressure: disks?.underPressure ?? false,
        },
        link: { bytesPerSec: null, rttMs: link.stats.rttMs },
        hostIdleCores,
        canPresend: capture.canPresend,
      });
      if (c.cmd === 'presend') {
        await this.presend(link, capture, c.epoch);
        continue;
      }
      if (c.cmd === 'wait') {
        // (compare mode: held frames whose copy may still come are looked at again once late)
        const lateAt = this.planningCompare ? this.commit.nextLateAtMs() : Number.POSITIVE_INFINITY;
        await this.idle((lateAt > decidedMs ? Math.min(c.untilMs, lateAt + 0.5) : c.untilMs) - decidedMs);
        continue;
      }
      if (c.cmd === 'wait-ack') {
        await this.idle(Infinity);
        continue;
      }
      if (c.cmd === 'fence') {
        await this.fence(link, capture, c.epoch);
        return;
      }
      if (c.cmd !== 'capture') continue;
      log.debug('checkpoint decision', {
        policy: pipe.policy.name,
        reason: c.reason,
        ageMs: (decidedMs - pipe.epochStartedMs).toFixed(1),
      });
      await this.checkpoint(link, capture, c.epoch, decidedMs, status);
      if (status.due(performance.now())) this.emitStatus(link, status);
    }
  }

  /**
   * One pre-send of the dirty RAM (the guest runs meanwhile): its pages go to the standby at once,
   * which stages them for the coming checkpoint `epoch` (committed only with it; a later copy of a
   * page, from another pass or the pause, replaces them). The pipeline planned it.
   */
  private async presend(link: Link, capture: ColoCapture, epoch: number): Promise<void> {
    // Back-pressure: no new pass while what was handed to the link last still waits for the socket
    // to drain — a slow standby slows the pre-sends, not the primary's memory.
    await this.shipping;
    const r = link.closed ? { pages: 0 } : await capture.presend((pages) => this.shipPresent(link, epoch, pages));
    this.pipeline.presented(r.pages, performance.now());
  }

  /**
   * Pre-sent pages of the coming checkpoint `epoch`, to the standby's staging (in order with the checkpoints: same
   * link).
   */
  private shipPresent(link: Link, epoch: number, pages: DirtyPage[]): void {
    if (!pages.length) return;
    const { frames, counts } = presendFrames(epoch, pages, this.sentPages(), this.blocks, this.framePages);
    const r = this.presendRefs;
    r.same += counts.same;
    r.delta += counts.delta;
    r.savedBytes += counts.savedBytes;
    for (const parts of frames) {
      r.bytes += parts.length;
      this.shipping = this.send(link, FrameType.PRESEND, epoch, parts);
    }
  }

  /** One frame to the link; a failed send ends the session (never silently). Resolves once the socket drained. */
  private send(link: Link, type: number, epoch: number, parts: RecordParts): Promise<void> {
    return link
      .sendParts(type, epoch, parts)
      .catch((e: unknown) => link.close(e instanceof Error ? e : new Error(String(e))));
  }

  private get framePages(): number {
    return this.o.framePages ?? FRAME_PAGES;
  }

  /** Takes checkpoint `epoch`, ships it; the guest runs again as soon as it is local. */
  private async checkpoint(
    link: Link,
    capture: ColoCapture,
    epoch: number,
    decidedMs: number,
    status: StatusMeter,
  ): Promise<void> {
    const fault = this.o.fault;
    const ranFromMs = this.pipeline.epochStartedMs;
    const t = await this.take(
      capture,
      epoch,
      status,
      fault
        ? async (c) => {
            await fault('mid-pause', c.epoch, { sendPartial: () => {}, crash: () => this.crash() });
          }
        : undefined,
    );
    const { cp, pauseBeganMs, presented, refs } = t;
    const bytes = t.wire.length;
    const leadFrames = t.wire.lead.length;
    if (fault) {
      const { record } = t.wire;
      await fault('mid-transfer', epoch, {
        sendPartial: (f) =>
          link.sendPartial(
            FrameType.CKPT,
            epoch,
            Buffer.concat(record.parts as Buffer[]),
            Math.floor(record.length * f),
          ),
        crash: () => this.crash(),
      });
    }
    if (this.stopped) throw new RubatoError('RUBATO_CAPTURE_FAILED', 'controller crashed');
    dispatch(t.commands, { send: (c) => this.ship(link, c.epoch, t.wire) }, 'primary checkpoint');
    t.wire = EMPTY;
    this.observe(cp, ranFromMs, pauseBeganMs, bytes, decidedMs); // after the send: not on the ack's path
    // The record has the pages: drop the parsed ones (they pin the stream's buffers).
    const pages = cp.pages.length;
    cp.pages.length = 0;
    // A large one: its plaintext and the stream's buffers are garbage now (the link holds the
    // ciphertext): collected at once, the peak is about twice the record, not three or four times.
    if (bytes > LARGE_RECORD_BYTES) collectNow();
    this.emit({
      event: 'checkpoint',
      epoch,
      pages,
      bytes,
      pauseMs: cp.timings.pauseMsLocal,
      captureMs: cp.timings.captureMs,
      counter: this.counterAt.get(epoch) ?? -1,
      ...(presented ? { presentPages: presented } : {}),
      ...(presented ? { presentBytes: refs.presentBytes } : {}),
      ...(leadFrames ? { leadFrames } : {}),
      ...(refs.same || refs.delta ? { samePages: refs.same, deltaPages: refs.delta, savedBytes: refs.savedBytes } : {}),
    });
  }

  /**
   * Captures checkpoint `epoch` (its output and disk epoch close during the pause), encodes its
   * record once the guest runs again, and hands it to the pipeline. `hold` keeps the guest paused
   * after the capture (fault injection; a fence stops it there).
   */
  private async take(
    capture: ColoCapture,
    epoch: number,
    status: StatusMeter | null,
    hold?: (c: Checkpoint) => Promise<void>,
  ): Promise<{
    cp: Checkpoint;
    wire: WireCheckpoint;
    pauseBeganMs: number;
    presented: number;
    refs: { same: number; delta: number; savedBytes: number; presentBytes: number };
    commands: Command[];
  }> {
    const counter = this.lastCounter;
    let pauseBeganMs = 0;
    // The epoch's disk writes (null: no disks), asked for once the guest has stopped; null until it has.
    let diskWrites: Promise<DiskEpochWrites | null> | null = null;
    const cp = await capture.checkpoint({
      onRequest: () => {
        pauseBeganMs = performance.now();
      },
      // The guest is stopped: its output and disk writes so far are this checkpoint's.
      onStopped: () => {
        const closed = this.pipeline.paused(epoch, pauseBeganMs);
        // The disk servers hand the epoch's writes over while the rest of the stream is read: the cut is the mark
        // just made, whenever they answer, so the encoding after the resume does not wait for a round trip to them.
        diskWrites = closed.disk ? closed.disk.collect() : Promise.resolve(null);
        diskWrites.catch(() => {}); // (a checkpoint that fails first never awaits it)
        // Input the guest had not taken yet goes to the secondary again, as the next epoch's: after QEMU is told to
        // resume (the capture does that right after this, in the same turn), not inside the guest's pause; before
        // any new input, which arrives in a later turn.
        const compare = this.compare;
        if (compare) queueMicrotask(() => compare.cut(epoch));
      },
      onLocal: (c) => this.joinDisk(c, epoch, diskWrites, status),
      ...(hold ? { hold } : {}),
    });
    const resumedMs = performance.now(); // the guest runs again from here: the next epoch starts now
    // Its pre-sent pages are staged on the standby already: the record carries the pause's.
    const presented = this.pipeline.presentedPages;
    // Pages the standby holds a copy of go as references to it; the rest are referenced here, not copied.
    const wire = checkpointFrames(cp, this.sentPages(), this.blocks, this.framePages);
    const present = this.presendRefs;
    this.presendRefs = noRefs();
    const refs = {
      same: wire.counts.same + present.same,
      delta: wire.counts.delta + present.delta,
      savedBytes: wire.counts.savedBytes + present.savedBytes,
      presentBytes: present.bytes,
    };
    const commands = this.pipeline.capturedCheckpoint(epoch, {
      dirtyPages: cp.pages.length + presented,
      pausePages: cp.pages.length,
      pauseMs: cp.timings.pauseMsLocal,
      // As if every page went whole: the scheduler's link estimates are bytes per page sent, and a reference counts as
      // the page it stands for (its bytes per ms are what the link delivers of the replica). The in-flight bound
      // counts the same way: no more records in flight than before references.
      bytes: wire.length + wire.counts.savedBytes,
      resumedMs,
      encodedMs: performance.now(),
    });
    this.counterAt.set(epoch, counter);
    return { cp, wire, pauseBeganMs, presented, refs, commands };
  }

  /**
   * The epoch's disk writes (cut with its output while the guest was stopped, and asked for then) join its
   * checkpoint.
   */
  private async joinDisk(
    c: Checkpoint,
    epoch: number,
    diskWrites: Promise<DiskEpochWrites | null> | null,
    status: StatusMeter | null,
  ): Promise<void> {
    assert(c.epoch === epoch, `capture numbered checkpoint ${c.epoch}, the pipeline expects ${epoch}`);
    assert(diskWrites !== null, `checkpoint ${epoch} arrived without its stop`);
    const w = await diskWrites;
    if (!w) return;
    status?.addDisk(w.writes, w.flushes);
    for (const d of w.disks) for (const [offset, data] of d.pages) c.pages.push({ block: d.block, offset, data });
  }

  private sentPages(): SentPages {
    assert(this.sent !== null, 'pages are sent only after a synchronisation');
    return this.sent;
  }

  /** Hands checkpoint `epoch` to the link: its leading pages' frames, then its CKPT. */
  private ship(link: Link, epoch: number, wire: WireCheckpoint): void {
    // Once the link took the ciphertext, the record and its copies are garbage. V8 collects them
    // by its own measure: a full collection forced every few tens of MB cost the controller more
    // than encrypting them (docs/evaluation.md, "What protection costs").
    for (const parts of wire.lead) this.send(link, FrameType.PRESEND, epoch, parts);
    this.shipping = this.send(link, FrameType.CKPT, epoch, wire.record);
    this.pipeline.sent(epoch, performance.now());
  }

  private observe(cp: Checkpoint, ranFromMs: number, pauseBeganMs: number, bytes: number, decidedMs: number): void {
    const obs = this.o.observer;
    if (!obs?.epoch) return;
    const ids = new Uint32Array(cp.pages.length);
    cp.pages.forEach((p, i) => {
      ids[i] = (((this.blockIndex.get(p.block) ?? 255) << 24) | Math.floor(p.offset / 4096)) >>> 0;
    });
    const handle = obs.epoch(ranFromMs, pauseBeganMs, cp.timings.pauseMsLocal, bytes, ids, decidedMs);
    if (handle >= 0) this.tracedAt.set(cp.epoch, handle);
  }

  private emitStatus(link: Link, status: StatusMeter): void {
    const pauses = this.meter.pausesMs().slice(-20);
    const last = this.pipeline.history.at(-1);
    const oldest = this.pipeline.oldestInflightSentMs;
    const now = performance.now();
    const stats = this.pipeline.stats();
    this.emit(
      (this.lastStatus = status.take(now, {
        pipeline: stats,
        output: this.commit.stats(now),
        bytesSent: link.stats.bytesSent,
        rttMs: link.stats.rttMs,
        lagMs: oldest === null ? 0 : now - oldest,
        lastDirtyPages: last?.dirtyPages ?? 0,
        pauseMs: pauses.length ? pauses.reduce((a, b) => a + b, 0) / pauses.length : (last?.pauseMs ?? 0),
      })),
    );
    this.emit({ event: 'decisions', reasons: stats.reasons, policy: this.pipeline.policy.name });
  }

  /** Switchover: a last checkpoint with the guest stopped, its ack, then the guest stops here for good. */
  private async fence(link: Link, capture: ColoCapture, epoch: number): Promise<void> {
    log.warn(`standby asked for failover: taking a last checkpoint and stopping guest ${this.o.vm.spec.name}`);
    const { wire, commands } = await this.take(capture, epoch, null, async () => {
      await this.o.vm.qmp.execute('stop');
    });
    dispatch(commands, { send: (c) => this.ship(link, c.epoch, wire) }, 'primary fence');
    while (this.pipeline.phase === 'fencing' && !link.closed) await this.idle(Infinity);
    if (this.pipeline.phase !== 'fenced')
      throw link.closed ?? new RubatoError('RUBATO_PEER_LOST', 'fence not acknowledged');
    await this.o.vm.qmp
      .execute('stop')
      .catch((e: unknown) => log.warn(`stopping the fenced guest: ${errorMessage(e)}`));
    this.stopped = true;
    await link
      .sendLast(FrameType.FENCED)
      .catch((e: unknown) => log.warn(`telling the standby the guest stopped: ${errorMessage(e)}`));
    this.emit({ event: 'fenced' });
    await this.o.vm.stop();
  }

  /** Orderly end: the standby is told (BYE), keeps its replica and does not fail over. */
  async stop(): Promise<void> {
    if (this.lostGuest) return this.guestLost(''); // (its held output is dropped, never released)
    this.stopped = true;
    this.cancelHoldTimer();
    this.ended.abort();
    const link = this.link;
    if (link && !link.closed) {
      await link
        .sendLast(FrameType.BYE)
        .catch((e: unknown) => log.warn(`telling the standby goodbye: ${errorMessage(e)}`));
      await link.closeGracefully(new RubatoError('RUBATO_PEER_LOST', 'protection stopped by the operator'));
    }
    this.poke();
    await this.capture?.close();
    await this.loop;
    // Protection ends by choice: held output leaves, later output passes through.
    for (const f of this.pipeline.stop()) this.o.relay?.sendOutside(f);
  }

  /**
   * The guest's QEMU died on this host (not stopped by Rubato, not shut down by the guest): its
   * standby is told to take over now, without waiting out the liveness timeout. Held output is
   * dropped, never released: its checkpoints were not acknowledged, and the standby's replica
   * (their acknowledged predecessor) is what runs next. The caller gives up the lease first.
   */
  async guestLost(why: string): Promise<void> {
    this.lostGuest ??= this.tellGuestLost(why);
    await this.lostGuest;
    await this.loop;
  }

  private lostGuest: Promise<void> | null = null;

  /** QEMU is gone, or (after a failed session, whose cause it may be) ends within a moment. */
  private async qemuGone(afterFailure: boolean): Promise<boolean> {
    const vm = this.o.vm;
    if (vm.exited || vm.qmp.isClosed || !afterFailure) return vm.exited || vm.qmp.isClosed;
    await onceWithin(vm, 'exit', QEMU_EXIT_WAIT_MS); // (each failed session waits here: nothing may stay behind)
    return vm.exited || vm.qmp.isClosed;
  }

  private async tellGuestLost(why: string): Promise<void> {
    const wasProtected = this.protected;
    this.stopped = true;
    this.cancelHoldTimer();
    this.ended.abort();
    this.emit({ event: 'guest-lost', why, protected: wasProtected });
    await this.o.beforeGuestLost?.().catch((e: unknown) => log.warn(`giving the lease up: ${errorMessage(e)}`));
    // The dying QEMU often broke the session first (its capture, then the link): a new
    // authenticated link carries the word instead of leaving the standby to wait for silence.
    let link = this.link && !this.link.closed ? this.link : null;
    if (!link && this.standbyAt) {
      const fresh = await this.connectLink().catch(() => null);
      link =
        fresh &&
        (await connectHandshake(fresh, this.o.psk, this.identity(), this.o.timeoutMs).then(
          () => fresh,
          () => null,
        ));
      if (!link) fresh?.close();
    }
    if (link && !link.closed) {
      await link
        .sendLast(FrameType.GUEST_LOST)
        .catch((e: unknown) => log.warn(`telling the standby to take over: ${errorMessage(e)}`));
      await link.closeGracefully(new RubatoError('RUBATO_QEMU_EXITED', why));
    }
    this.poke();
    await this.capture?.close();
  }

  /** Simulates the controller's death: no goodbye, sockets dropped, QEMU killed by PID. */
  async crash(): Promise<void> {
    this.stopped = true;
    this.cancelHoldTimer();
    this.ended.abort();
    this.link?.socket.destroy();
    await this.o.vm.kill();
    const c = this.capture;
    this.capture = null;
    await c?.close();
    this.poke();
  }
}
