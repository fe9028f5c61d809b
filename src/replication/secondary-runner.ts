// Compare mode on the standby: the secondary VM (qemu/secondary.ts) run beside the replica. It
// starts from the replica's full image, takes every committed checkpoint (merged, when it falls
// behind), gets the primary's inbound frames of the epoch it runs (mirrored over the link) and
// sends what it outputs back to the primary, tagged with that epoch, for comparison. Its frames
// never leave this host while it is a secondary. At failover it is brought to the last committed
// checkpoint and promoted: the guest goes on from there with the state behind every frame the
// primary released (by acknowledgement or by comparison).

import { join } from 'node:path';
import { copyFile, open, rm } from 'node:fs/promises';
import { errorMessage, logger } from '../util/index.ts';
import { ColoSecondary, type QemuBinary, type QemuVm } from '../qemu/index.ts';
import { NbdServer, NetRelay } from '../io/index.ts';
import { PageSet, type DirtyPage } from '../capture/index.ts';
import type { ReplicaStore } from './replica-store.ts';
import type { Identity } from './protocol/messages.ts';
import { splitNetFrames } from './protocol/messages.ts';
import { SEC_OUT_MAX_BATCH_BYTES } from './handshake.ts';

const log = logger('secondary');
/** Inbound frames kept for epochs the secondary has not reached yet. */
const MAX_QUEUED_INBOUND_BYTES = 16 << 20;
/**
 * A secondary that got no input for this long takes no checkpoints; they are merged until it has
 * input again (then loaded at once, as one). Under `--mode auto` planned as buffer mode the primary
 * mirrors no input: loading 40 checkpoints a second into a secondary that has nothing to answer
 * cost half a core (`npm run bench -- services --modes auto`). Its output does not count: each
 * checkpoint brings back connections whose data the clients never acknowledged to it, so it
 * retransmits after every load, and counted as activity that kept it loading at half a core.
 */
const IDLE_LOADS_AFTER_MS = 500;
/**
 * Checkpoints merged for an idle secondary are loaded all the same once this much was merged (the
 * secondary runs for the load, then stops again). Counted as merged, not as distinct pages: each
 * page points into its record's buffer, which it keeps alive (the replica store counts its own
 * merge so). Without the bound, 40 records a second under auto's buffer plan stayed in memory.
 */
const IDLE_PENDING_MAX_BYTES = 64 << 20;

/**
 * The replica's RAM at one checkpoint, copied aside (private files) while nothing is applied to
 * the replica: the secondary's first image must be one checkpoint, and the replica's files move on
 * as checkpoints commit while it loads.
 */
export interface ImageCopy {
  /** Blocks of the replica that are not guest RAM (the disk's), left out. */
  notRam: readonly string[];
  machine: string;
  blocks: { id: string; lengthBytes: number }[];
  files: Map<string, string>;
  deviceState: Buffer;
  epoch: number;
}

export async function copyImage(store: ReplicaStore, dir: string, notRam: readonly string[]): Promise<ImageCopy> {
  await store.settled();
  const blocks = store.blocks.filter((b) => !notRam.includes(b.id)).map((b) => ({ ...b }));
  const files = new Map<string, string>();
  for (const [i, b] of blocks.entries()) {
    const to = join(dir, `secondary-image-${i}.img`);
    await copyFile(store.imagePath(b.id), to);
    files.set(b.id, to);
  }
  return {
    notRam,
    machine: store.machine,
    blocks,
    files,
    deviceState: Buffer.from(store.deviceState),
    epoch: store.epoch,
  };
}

export interface SecondaryRunnerOptions {
  identity: Identity;
  image: ImageCopy;
  /** The replica's disk image: the secondary sees it with its own writes over it (dropped at each checkpoint). */
  disk: string | null;
  binary: QemuBinary;
  runDir: string;
  /** Frames the secondary sent while running `epoch` (from checkpoint epoch - 1), for the primary. */
  send: (epoch: number, payload: Buffer) => void;
  /** The secondary runs (from checkpoint `epoch`), `startMs` after it was started. */
  onRunning?: (epoch: number, startMs: number) => void;
}

export interface SecondaryStats {
  state: 'starting' | 'running' | 'failed' | 'stopped' | 'promoted';
  runningFrom: number;
  loads: number;
  loadMsTotal: number;
  framesIn: number;
  /** Bytes of input given. */
  bytesIn: number;
  framesOut: number;
  startMs: number | null;
  /** Why it failed (state `failed`). */
  failure?: string;
}

export class SecondaryRunner {
  private sec: ColoSecondary | null = null;
  private base = 0;
  /** Committed checkpoints not loaded yet, merged; `bytes`: the page data merged into it (kept alive). */
  private pending: { epoch: number; pages: PageSet; deviceState: Buffer; bytes: number } | null = null;
  private inbound: { epoch: number; frames: Buffer[] }[] = [];
  private inboundBytes = 0;
  private outBatch: { epoch: number; frames: Buffer[]; bytes: number } | null = null;
  private loading = false;
  /** When the secondary last got input or sent output (performance.now()). */
  private activeAtMs = performance.now();
  private pump: Promise<void> = Promise.resolve();
  private readonly relay: NetRelay;
  private readonly nbd: NbdServer | null;
  private readonly ready: Promise<void>;
  readonly stats: SecondaryStats = {
    state: 'starting',
    runningFrom: 0,
    loads: 0,
    loadMsTotal: 0,
    framesIn: 0,
    bytesIn: 0,
    framesOut: 0,
    startMs: null,
  };
  /** When it failed (performance.now()), or null. */
  failedAtMs: number | null = null;

  /** Starts the secondary from the replica's full image (checkpoint 0, just installed). */
  constructor(private readonly o: SecondaryRunnerOptions) {
    this.relay = new NetRelay(join(o.runDir, `${o.identity.vm}-secondary.net`));
    this.nbd = o.disk
      ? new NbdServer(o.disk, join(o.runDir, `${o.identity.vm}-secondary.nbd`), 'disk', false, true)
      : null;
    this.relay.onGuestFrame = (f) => this.output(f);
    this.ready = this.start().catch((e: unknown) => this.fail(e));
  }

  private async start(): Promise<void> {
    const t0 = performance.now();
    const { image, identity } = this.o;
    this.base = image.epoch;
    await this.relay.start();
    await this.nbd?.start();
    const read = async (id: string, offset: number, length: number): Promise<Buffer> => {
      const fh = await open(image.files.get(id)!, 'r');
      try {
        const buf = Buffer.alloc(length);
        await fh.read(buf, 0, length, offset);
        return buf;
      } finally {
        await fh.close();
      }
    };
    this.sec = await ColoSecondary.start(
      identity.spec,
      { machine: image.machine, blocks: image.blocks, deviceState: image.deviceState, read },
      {
        binary: this.o.binary,
        runDir: this.o.runDir,
        tag: `${identity.vm}-secondary`,
        ...(identity.spec.mac ? { netSocket: this.relay.guestSocketPath } : {}),
        ...(this.nbd ? { nbdSocket: this.nbd.socketPath } : {}),
      },
    ).finally(() => Promise.all([...image.files.values()].map((f) => rm(f, { force: true }))));
    if (this.stats.state !== 'starting') {
      await this.sec.stop();
      return;
    }
    this.stats.state = 'running';
    this.deliverInbound();
    this.stats.startMs = Math.round(performance.now() - t0);
    log.info(`secondary of VM ${identity.vm} running from checkpoint ${this.base} (${this.stats.startMs} ms)`);
    this.o.onRunning?.(this.base, this.stats.startMs);
    this.kick();
  }

  private fail(e: unknown): void {
    if (this.stats.state === 'stopped' || this.stats.state === 'promoted') return;
    this.stats.state = 'failed';
    this.stats.failure = errorMessage(e);
    this.failedAtMs = performance.now();
    log.warn(
      `compare mode off for VM ${this.o.identity.vm}: ${errorMessage(e)} (its output waits for checkpoints until a secondary runs again)`,
    );
    const sec = this.sec;
    this.sec = null;
    if (sec)
      void sec
        .diagnose()
        .then((d) => log.warn(`the secondary of VM ${this.o.identity.vm} as it was stopped: ${d}`))
        .finally(() => sec.stop())
        .catch((err: unknown) => log.debug(`stopping a failed secondary: ${errorMessage(err)}`));
  }

  /** Its counters, and its QEMU's process id while it is there. */
  status(): SecondaryStats & { pid: number | null } {
    return { ...this.stats, pid: this.sec?.vm.pid ?? null };
  }

  /** The checkpoint the secondary runs from (null: it does not run). */
  get runningFrom(): number | null {
    return this.stats.state === 'running' && !this.loading ? this.base : null;
  }

  /** A checkpoint was committed: the secondary takes it (with any others it has not taken yet). */
  committed(epoch: number, pages: readonly DirtyPage[], deviceState: Buffer): void {
    if (this.stats.state !== 'running' && this.stats.state !== 'starting') return;
    const p = (this.pending ??= { epoch, pages: new PageSet(), deviceState, bytes: 0 });
    const notRam = this.o.image.notRam;
    for (const pg of pages)
      if (!notRam.includes(pg.block)) {
        p.pages.set(pg);
        p.bytes += pg.data?.length ?? 0;
      }
    p.epoch = epoch;
    p.deviceState = deviceState;
    this.kick();
  }

  /**
   * Loads what was committed, unless the secondary idles (no input: see IDLE_LOADS_AFTER_MS) and not
   * `now`. An idle secondary is stopped (it costs no CPU) until input comes.
   */
  private kick(now = false): void {
    if (this.loading || !this.sec || this.stats.state !== 'running') return;
    const sec = this.sec;
    const idle = !now && this.idle() && (this.pending?.bytes ?? 0) < IDLE_PENDING_MAX_BYTES;
    // (a pause or resume that did not take — the secondary is closing — kicks no more: no loop)
    if (idle && !sec.isPaused)
      this.step(
        () => sec.pause(),
        () => sec.isPaused,
      );
    else if (!idle && !this.pending && sec.isPaused)
      // input again, and no checkpoint to load (which would run it): it runs on from where it
      // stopped, given what came meanwhile (not the epoch's input again)
      this.step(
        () => sec.resume().then(() => this.deliverInbound()),
        () => !sec.isPaused,
      );
    else if (this.pending && !idle)
      this.step(
        () => this.load(),
        () => true,
      );
  }

  /** One thing at a time on the secondary (a load, a stop, a resume), then look again if `again()`. */
  private step(op: () => Promise<void>, again: () => boolean): void {
    this.loading = true;
    this.pump = op()
      .catch((e: unknown) => this.fail(e))
      .finally(() => {
        this.loading = false;
        if (again()) this.kick();
      });
  }

  /** No input for IDLE_LOADS_AFTER_MS. */
  private idle(): boolean {
    return performance.now() - this.activeAtMs > IDLE_LOADS_AFTER_MS;
  }

  private async load(): Promise<void> {
    const p = this.pending;
    const sec = this.sec;
    if (!p || !sec) return;
    this.pending = null;
    try {
      const nbd = this.nbd;
      const r = await sec.checkpoint(p.pages.values(), p.deviceState, nbd ? () => nbd.discardOverlay() : undefined);
      this.flushOutput(); // what it sent before it stopped belongs to the epoch it left
      this.base = p.epoch;
      this.stats.runningFrom = p.epoch;
      this.stats.loads++;
      this.stats.loadMsTotal += r.pausedMs;
      this.deliverInbound();
    } catch (e) {
      this.fail(e);
    }
  }

  /** Frames the primary's guest received in `epoch`. */
  netIn(epoch: number, payload: Buffer): void {
    if (this.stats.state !== 'running' && this.stats.state !== 'starting') return;
    if (epoch < this.base) return; // the checkpoint the secondary runs from holds them
    const frames = splitNetFrames(payload);
    this.activeAtMs = performance.now();
    if (epoch <= this.base + 1 && !this.loading && this.stats.state === 'running' && !this.sec?.isPaused) {
      this.give(frames);
      return;
    }
    if (this.inboundBytes + payload.length > MAX_QUEUED_INBOUND_BYTES) return; // as a congested network would
    this.inbound.push({ epoch, frames });
    this.inboundBytes += payload.length;
    this.kick(); // an idle secondary catches up first
  }

  private give(frames: Buffer[]): void {
    for (const f of frames) {
      this.relay.toGuest(f);
      this.stats.bytesIn += f.length;
    }
    this.stats.framesIn += frames.length;
  }

  /**
   * Gives the queued input it can take now: the epoch after the checkpoint it runs from (`all`: every epoch, when it
   * is promoted). The input a checkpoint may lack (it had not reached the primary's guest at the stop) comes again
   * from the primary as the next epoch's (CompareSide.cut).
   */
  private deliverInbound(all = false): void {
    const keep: { epoch: number; frames: Buffer[] }[] = [];
    for (const q of this.inbound) {
      if (q.epoch < this.base) continue;
      if (all || q.epoch <= this.base + 1) this.give(q.frames);
      else keep.push(q);
    }
    this.inbound = keep;
    this.inboundBytes = keep.reduce((n, q) => n + q.frames.reduce((m, f) => m + f.length, 0), 0);
  }

  private output(f: Buffer): void {
    if (this.stats.state !== 'running') return;
    const epoch = this.base + 1;
    // one epoch per batch, and a batch within what the primary accepts from its standby
    if (this.outBatch && (this.outBatch.epoch !== epoch || this.outBatch.bytes + f.length > SEC_OUT_MAX_BATCH_BYTES))
      this.flushOutput();
    if (!this.outBatch) {
      this.outBatch = { epoch, frames: [], bytes: 0 };
      setImmediate(() => this.flushOutput());
    }
    this.outBatch.frames.push(f);
    this.outBatch.bytes += f.length;
    this.stats.framesOut++;
  }

  private flushOutput(): void {
    const b = this.outBatch;
    this.outBatch = null;
    if (b?.frames.length) this.o.send(b.epoch, Buffer.concat(b.frames, b.bytes));
  }

  /**
   * Failover: the secondary takes every committed checkpoint it has not taken yet, ends COLO and
   * runs on as the guest, with the input the primary's guest got after that checkpoint. Returns
   * the VM and its NIC's relay (to be wired to this host's TAP), or null when it cannot (the replica
   * is restored instead).
   */
  async promote(): Promise<{ vm: QemuVm; relay: NetRelay; nbd: NbdServer | null; epoch: number } | null> {
    await this.ready;
    await this.pump;
    if (this.pending) {
      this.kick(true);
      await this.pump;
    }
    const sec = this.sec;
    if (!sec || this.stats.state !== 'running') return null;
    try {
      const vm = await sec.promote();
      this.stats.state = 'promoted';
      this.relay.onGuestFrame = null;
      // Its writes since the checkpoint are the guest's now: into the image, and later ones too.
      const kept = await this.nbd?.commitOverlay();
      if (kept) log.info(`secondary of VM ${this.o.identity.vm}: ${kept} disk pages written since the checkpoint kept`);
      this.deliverInbound(true);
      return { vm, relay: this.relay, nbd: this.nbd, epoch: this.base };
    } catch (e) {
      this.fail(e);
      return null;
    }
  }

  /** Not needed any more (a new full image, the primary stopped in order, or the standby stops). */
  async stop(): Promise<void> {
    if (this.stats.state === 'promoted') return;
    this.stats.state = 'stopped';
    await this.ready;
    await this.sec?.stop();
    this.sec = null;
    await this.relay.close();
    await this.nbd?.close();
  }
}
