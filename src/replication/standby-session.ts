// One authenticated primary's session on the standby: the full image (BASE_BEGIN, BASE_DATA…,
// BASE_END) and then one CKPT frame per checkpoint, handled strictly in order, each acknowledged
// only once committed; PRESEND frames before a checkpoint's CKPT stage pages of it
// (present-stage.ts) that commit only with it. Frames waiting to be handled are bounded: above a
// high-water mark the link stops reading its socket (TCP pushes back on the primary) until the
// backlog drains.

import { RubatoError, errorMessage, logger } from '../util/index.ts';
import type { Link } from './link.ts';
import {
  FrameType,
  GCM_TAG_BYTES,
  HEADER_BYTES,
  MAX_FRAME_BYTES,
  frameTypeName,
  type Frame,
} from './protocol/frame.ts';
import { decodeBaseData, decodeBaseFill, decodeLayout, encodeAckTimings, type Layout } from './protocol/messages.ts';
import { decodePresend, recordMaxBytes, type CheckpointRecord, type WirePage } from './protocol/record.ts';
import { PageMirror } from './sent-pages.ts';
import { PresentStage } from './present-stage.ts';
import { syncProgress, type SyncProgress } from './progress.ts';
import type { DirtyPage } from '../capture/index.ts';

const log = logger('standby');
const HIGH_WATER_BYTES = 64 << 20;
const LOW_WATER_BYTES = 16 << 20;

export type { SyncProgress };

/** Where a full image's pieces go while it arrives (the controller's replica builder). */
export interface BaseReceiver {
  writeRun(blockIndex: number, offset: number, data: Buffer): Promise<void>;
  fill(blockIndex: number, offset: number, fill: number): Promise<void>;
  /** The image is complete: install it as the replica (epoch 0). */
  finish(deviceState: Buffer): Promise<void>;
  /** The image will not be completed. */
  abandon(): Promise<void>;
}

/** What the session needs from its controller. */
export interface SessionHost {
  baseBegin(layout: Layout): Promise<BaseReceiver>;
  /**
   * Commits a checkpoint: its pre-sent pages `staged`, then its record's (a later copy wins), the record's page
   * references resolved by `resolve` (in order, once).
   */
  commit(
    record: Buffer,
    frameEpoch: number,
    staged: DirtyPage[],
    resolve: (pages: WirePage[]) => DirtyPage[],
  ): Promise<CheckpointRecord>;
  /** Fault injection for tests: runs after a commit, before its ack is sent. */
  beforeAck?: (epoch: number) => Promise<void>;
  progress(p: SyncProgress): void;
  synced(ms: number, bytes: number): void;
  committed(epoch: number, bytes: number, pages: number): void;
  /** Compare mode: frames the primary's guest received in `epoch`, for the secondary. */
  netIn?(epoch: number, payload: Buffer): void;
}

export interface SessionEnd {
  /** Why the link closed. */
  error: Error;
  /** A full image was installed in this session (the primary was protected by us). */
  protecting: boolean;
  /** The primary said goodbye (an orderly stop): no failover. */
  bye: boolean;
  /** The primary said its guest's QEMU died: take over now (no liveness wait). */
  guestLost: boolean;
}

export class StandbySession {
  private layout: Layout | null = null;
  private base: BaseReceiver | null = null;
  private received = 0;
  private t0 = 0;
  private lastProgressMs = 0;
  private protecting = false;
  private bye = false;
  private guestLost = false;
  private chain: Promise<void> = Promise.resolve();
  private pendingBytes = 0;
  /** The checkpoint the next CKPT (and any PRESEND before it) must carry. */
  private nextEpoch = 0;
  private stage: PresentStage | null = null;
  /** The copies of recently sent pages this session's page references point at (kept in step with the primary). */
  private mirror: PageMirror | null = null;

  constructor(
    private readonly link: Link,
    private readonly host: SessionHost,
  ) {}

  /** Handles frames until the link closes; resolves once every frame already taken is handled. */
  async run(): Promise<SessionEnd> {
    this.link.on('frame', (f: Frame) => this.enqueue(f));
    this.link.startEvents();
    const error = await new Promise<Error>((resolve) =>
      this.link.closed ? resolve(this.link.closed) : this.link.once('close', resolve),
    );
    await this.chain;
    await this.base?.abandon().catch((e: unknown) => log.warn(`removing an incomplete full image: ${errorMessage(e)}`));
    this.base = null;
    return { error, protecting: this.protecting, bye: this.bye, guestLost: this.guestLost };
  }

  private enqueue(f: Frame): void {
    // A goodbye counts the moment it arrives: the link may close before the frames ahead of it
    // are handled, and an orderly stop must never read as a lost primary.
    if (f.type === FrameType.BYE) this.bye = true;
    if (f.type === FrameType.GUEST_LOST) this.guestLost = true;
    // Mirrored input is for the secondary now, not behind the checkpoints queued before it.
    if (f.type === FrameType.NET_IN) {
      // (from the full image on: the secondary starts from it and runs on this input)
      if (!this.layout || !this.host.netIn)
        this.link.close(new RubatoError('RUBATO_PROTOCOL', 'mirrored input with no secondary to take it'));
      else
        try {
          this.host.netIn(f.epoch, f.payload);
        } catch (e) {
          this.link.close(e instanceof Error ? e : new Error(String(e)));
        }
      return;
    }
    const n = f.payload.length;
    const arrivedMs = performance.now();
    const receiveMs = arrivedMs - (f.startedMs ?? arrivedMs);
    this.pendingBytes += n;
    if (this.pendingBytes > HIGH_WATER_BYTES) this.link.pauseReading();
    this.chain = this.chain
      .then(() => this.handle(f, arrivedMs, receiveMs))
      .catch((e: unknown) => {
        log.warn(`dropping ${this.link.peer}: ${errorMessage(e)}`);
        this.link.close(e instanceof Error ? e : new Error(String(e)));
      })
      .finally(() => {
        this.pendingBytes -= n;
        if (this.pendingBytes < LOW_WATER_BYTES) this.link.resumeReading();
      });
  }

  private async handle(f: Frame, arrivedMs: number, receiveMs: number): Promise<void> {
    if (this.link.closed) return;
    switch (f.type) {
      case FrameType.BASE_BEGIN: {
        const layout = decodeLayout(f.payload);
        // From now on a frame may carry a whole checkpoint of this layout, and no more.
        this.link.setMaxFrameBytes(
          Math.min(MAX_FRAME_BYTES, HEADER_BYTES + recordMaxBytes(layout.blocks) + GCM_TAG_BYTES),
        );
        await this.base?.abandon();
        this.base = null;
        this.received = 0;
        this.t0 = performance.now();
        this.protecting = false;
        this.layout = layout;
        this.mirror = new PageMirror(layout.blocks);
        // Staged pages are bounded by the RAM they copy (and the frames that bring them by their own limit).
        this.stage = new PresentStage(
          Math.max(
            64 << 20,
            layout.blocks.reduce((n, b) => n + b.lengthBytes, 0),
          ),
        );
        this.base = await this.host.baseBegin(layout);
        return;
      }
      case FrameType.BASE_DATA: {
        if (!this.layout || !this.base) throw new RubatoError('RUBATO_PROTOCOL', 'BASE_DATA before BASE_BEGIN');
        const d = decodeBaseData(f.payload, this.layout);
        await this.base.writeRun(d.blockIndex, d.offset, d.data);
        this.received += d.data.length;
        this.reportProgress(this.layout.totalBytes);
        return;
      }
      case FrameType.BASE_FILL: {
        if (!this.layout || !this.base) throw new RubatoError('RUBATO_PROTOCOL', 'BASE_FILL before BASE_BEGIN');
        const d = decodeBaseFill(f.payload, this.layout);
        for (const p of d.pages) await this.base.fill(d.blockIndex, p.offset, p.fill);
        this.received += d.pages.length * 4096;
        this.reportProgress(this.layout.totalBytes);
        return;
      }
      case FrameType.BASE_END: {
        if (!this.layout || !this.base) throw new RubatoError('RUBATO_PROTOCOL', 'BASE_END before BASE_BEGIN');
        const base = this.base;
        this.base = null;
        await base.finish(f.payload);
        this.protecting = true;
        this.nextEpoch = 1;
        this.host.synced(Math.round(performance.now() - this.t0), this.received);
        await this.link.send(FrameType.ACK, 0);
        return;
      }
      case FrameType.CKPT: {
        if (!this.protecting) throw new RubatoError('RUBATO_PROTOCOL', 'checkpoint before the initial image');
        const startMs = performance.now();
        const mirror = this.mirror!;
        const rec = await this.host.commit(f.payload, f.epoch, this.stage!.take(f.epoch), (pages) =>
          mirror.resolve(pages, `checkpoint ${f.epoch}`),
        );
        this.nextEpoch = rec.epoch + 1;
        // Said before the ack goes: nothing covered by this checkpoint can be out before it is committed here.
        this.host.committed(rec.epoch, f.payload.length, rec.pages.length);
        if (this.host.beforeAck) await this.host.beforeAck(rec.epoch);
        // The ack carries what this side spent on the checkpoint (the primary's latency breakdown).
        const timings = encodeAckTimings({
          queuedMs: startMs - arrivedMs,
          commitMs: performance.now() - startMs,
          receiveMs,
        });
        if (!this.link.closed) await this.link.send(FrameType.ACK, rec.epoch, timings);
        return;
      }
      case FrameType.PRESEND: {
        if (!this.protecting || !this.layout || !this.stage)
          throw new RubatoError('RUBATO_PROTOCOL', 'pre-sent pages before the initial image');
        const { epoch, pages } = decodePresend(f.payload, this.layout.blocks);
        if (epoch !== f.epoch || epoch !== this.nextEpoch) {
          throw new RubatoError(
            'RUBATO_PROTOCOL',
            `pre-sent pages of checkpoint ${epoch} (sent as ${f.epoch}) when checkpoint ${this.nextEpoch} is next`,
          );
        }
        this.stage.add(epoch, this.mirror!.resolve(pages, `pre-sent pages of checkpoint ${epoch}`), f.payload.length);
        return;
      }
      case FrameType.FENCED:
        this.link.emit('fenced');
        return;
      case FrameType.BYE:
        this.bye = true;
        log.info(`${this.link.peer} ended protection in order`);
        this.link.close(new RubatoError('RUBATO_PEER_LOST', `${this.link.peer} ended protection in order`));
        return;
      case FrameType.GUEST_LOST:
        this.guestLost = true;
        log.warn(`${this.link.peer}: the guest's QEMU died there; taking over now`);
        this.link.close(new RubatoError('RUBATO_PEER_LOST', `${this.link.peer}: the guest's QEMU died there`));
        return;
      default:
        throw new RubatoError('RUBATO_PROTOCOL', `unexpected ${frameTypeName(f.type)} from the primary`);
    }
  }

  private reportProgress(totalBytes: number): void {
    const now = performance.now();
    if (now - this.lastProgressMs <= 500) return;
    this.lastProgressMs = now;
    this.host.progress(syncProgress(this.received, totalBytes, now - this.t0));
  }
}
