// The standby's replica: exactly one committed checkpoint, in files. A checkpoint is staged,
// verified complete and intact, then committed by one rename (the redo record); applying it writes
// its pages in place into the image files and is idempotent, so a store reopened after a crash at
// any moment holds the last committed one. It never applies a partial or corrupt checkpoint. No
// image is held in memory: a 16 GiB disk replica is a sparse file, and the RAM image is the file a
// restore maps. A record off the wire is acknowledgeable at its commit point: `commitRecord`
// returns there and writes the pages behind it; the next commit, and anything that reads the
// files, waits for that (`settled`).
//
// On-disk format (version 1), in the store's folder:
//   meta.json        { format: 1, vm, machine, epoch, blocks: [{ id, lengthBytes }] }
//   ram/<n>.img      image of block n (n = index in meta.blocks); sparse where never written
//   device.bin       device state of the committed epoch (QEMU sections + EOF)
//   redo.ckpt        a committed checkpoint not yet fully applied (present only mid-apply)
//   stage.tmp        a checkpoint being staged (ignored and removed on open)
// redo.ckpt / stage.tmp hold one checkpoint record as it travels on the wire (protocol/record.ts).
// A full image arrives in pieces (ReplicaBuilder) into a folder of its own and becomes a store
// (epoch 0) only when complete.

import { constants, existsSync, writevSync } from 'node:fs';
import { open, readFile, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import {
  ensurePrivateDir,
  fsyncDir,
  openPrivate,
  writePrivate,
  writePrivateAtomic,
  RubatoError,
  assert,
} from '../util/index.ts';
import { join } from 'node:path';
import { PAGE_SIZE, PageSet, type BaseImage, type DirtyPage, type RamBlockInfo } from '../capture/index.ts';
import {
  decodeRecord,
  encodeRecordParts,
  sealRecord,
  validateRecord,
  type CheckpointRecord,
  type RecordParts,
  type WirePage,
} from './protocol/record.ts';

const FORMAT = 1;

export interface ReplicaMeta {
  format: number;
  vm: string;
  machine: string;
  epoch: number;
  blocks: RamBlockInfo[];
}

export interface ReplicaStoreOptions {
  /** fsync staged records, images and metadata (crash safety on real disks). Default true. */
  fsync?: boolean;
}

/**
 * When the standby acknowledges a checkpoint: `disk` at its commit point in the replica's files
 * (fsynced unless fsync is off), `memory` once it is complete and verified in the standby's memory.
 */
export type Durability = 'memory' | 'disk';
/** Memory durability: the writer behind starts a batch at most this often. */
const WRITE_BEHIND_INTERVAL_MS = 50;
/**
 * Applying a checkpoint writes its runs of pages with synchronous calls, this long at most before
 * the event loop gets a turn. A run is mostly one page (dirty pages are scattered), and each
 * asynchronous write was a round trip through libuv's thread pool: at 25k pages/s (redis under
 * buffer mode) the standby spent about 0.5 cores waking its pool threads. A write into the page
 * cache takes a few µs.
 */
const APPLY_SLICE_MS = 1;
/** Disk durability: records queued for their commit point, at most (then the next waits). */
const MAX_BEHIND = 4;
/** Memory durability: distinct pages acknowledged and not yet written, at most (then the ack waits for the writer). */
const MAX_BEHIND_BYTES = 128 << 20;
/** … and the received records their pages keep in memory, at most. */
const MAX_MERGED_RECORD_BYTES = 256 << 20;

const corrupt = (msg: string, ctx: Record<string, unknown> = {}) => new RubatoError('RUBATO_REPLICA_CORRUPT', msg, ctx);

export class ReplicaStore {
  private constructor(
    readonly dir: string,
    private meta: ReplicaMeta,
    private device: Buffer,
    private readonly fsync: boolean,
  ) {}

  /** The last committed epoch (its files may still be being written: see settled()). */
  get epoch(): number {
    return this.accepted ?? this.meta.epoch;
  }
  /** The last checkpoint accepted (checked, in order); its writes may be behind. */
  private accepted: number | null = null;
  /** Every write of the accepted checkpoints, in order: stage, commit point, apply. */
  private tail: Promise<void> = Promise.resolve();
  private pending = 0;
  private pendingBytes = 0;
  /** Memory durability: checkpoints accepted and not yet being written, merged; and whether the writer runs. */
  private merge: { epoch: number; pages: PageSet; deviceState: Buffer; bytes: number; recordBytes: number } | null =
    null;
  private writingBehind = false;
  private lastBatchMs = Number.NEGATIVE_INFINITY;
  private wakeWriter: (() => void) | null = null;
  private flushWanted = 0;
  private applying: Promise<void> | null = null;
  private applyError: Error | null = null;
  private readonly handles = new Map<number, FileHandle>();

  /** Resolves once the files hold the last committed checkpoint; rejects if writing them failed. */
  async settled(): Promise<void> {
    this.flushWanted++; // the writer behind stops pacing itself while anyone waits for it
    this.wakeWriter?.();
    try {
      await this.tail;
    } finally {
      this.flushWanted--;
    }
    await this.applying;
    if (this.applyError) throw this.applyError;
  }
  get machine(): string {
    return this.meta.machine;
  }
  get blocks(): readonly RamBlockInfo[] {
    return this.meta.blocks;
  }
  get deviceState(): Buffer {
    return this.device;
  }

  imagePath(block: string): string {
    return join(this.dir, 'ram', `${this.indexOf(block)}.img`);
  }

  private indexOf(block: string): number {
    const i = this.meta.blocks.findIndex((b) => b.id === block);
    if (i < 0) throw new RubatoError('RUBATO_CONFIG', `replica has no RAM block ${block}`);
    return i;
  }

  /**
   * Reads (part of) a block's committed image from its file, once the last commit is written.
   * Whole blocks only for small guests (tools and tests): the image is not otherwise in memory.
   */
  async readImage(block: string, offset = 0, length?: number, into?: Buffer): Promise<Buffer> {
    await this.settled();
    const i = this.indexOf(block);
    const len = length ?? this.meta.blocks[i]!.lengthBytes - offset;
    // (`into`: a buffer to reuse, when large enough: repeated reads of a large block allocate nothing)
    const buf = into && into.length >= len ? into.subarray(0, len) : Buffer.alloc(len);
    const fh = await open(this.imagePath(block), 'r');
    try {
      await fh.read(buf, 0, len, offset);
    } finally {
      await fh.close();
    }
    return buf;
  }

  /** Makes a new store holding a full image from memory as epoch 0 (small guests: tools and tests). */
  static async create(dir: string, vm: string, base: BaseImage, opts: ReplicaStoreOptions = {}): Promise<ReplicaStore> {
    const b = await ReplicaBuilder.begin(dir, vm, { machine: base.machine, blocks: base.blocks }, opts);
    try {
      for (const [i, blk] of base.blocks.entries()) {
        const img = base.ram.get(blk.id);
        assert(img && img.length === blk.lengthBytes, `base image block ${blk.id} has its announced length`);
        await b.writeRun(i, 0, img);
      }
      return await b.finish(base.deviceState);
    } catch (e) {
      await b.abandon();
      throw e;
    }
  }

  /** @internal the builder's result. */
  static fromBuilt(dir: string, meta: ReplicaMeta, device: Buffer, fsync: boolean): ReplicaStore {
    return new ReplicaStore(dir, meta, device, fsync);
  }

  /** The same store after its directory was renamed to `dir` by the caller (nothing is reread). */
  relocated(dir: string): ReplicaStore {
    assert(this.applying === null, 'a store is relocated only before its first checkpoint');
    assert(this.handles.size === 0, 'a store is relocated before it opened its images');
    return new ReplicaStore(dir, this.meta, this.device, this.fsync);
  }

  /** Opens a store, finishing a committed-but-unapplied checkpoint if a crash left one. */
  static async open(dir: string, opts: ReplicaStoreOptions = {}): Promise<ReplicaStore> {
    const fsync = opts.fsync ?? true;
    let meta: ReplicaMeta;
    try {
      meta = JSON.parse(await readFile(join(dir, 'meta.json'), 'utf8')) as ReplicaMeta;
    } catch {
      throw corrupt(`replica in ${dir} has no readable meta.json`, { dir });
    }
    if (meta.format !== FORMAT)
      throw corrupt(`replica in ${dir} has format ${meta.format}, this Rubato reads ${FORMAT}`);
    for (const [i, b] of meta.blocks.entries()) {
      const size = await stat(join(dir, 'ram', `${i}.img`)).then(
        (st) => st.size,
        () => -1,
      );
      if (size !== b.lengthBytes)
        throw corrupt(
          `replica image of block ${b.id} has ${size < 0 ? 'no file' : `${size} bytes`}, expected ${b.lengthBytes}`,
        );
    }
    const device = await readFile(join(dir, 'device.bin'));
    await rm(join(dir, 'stage.tmp'), { force: true });
    const store = new ReplicaStore(dir, meta, device, fsync);
    const redoPath = join(dir, 'redo.ckpt');
    if (existsSync(redoPath)) {
      const rec = decodeRecord(await readFile(redoPath), meta.blocks);
      // The record was committed (renamed into place) before any of it was applied. It follows the
      // files' epoch, or (memory durability) merges every checkpoint since it: either way applied whole.
      if (rec.epoch >= meta.epoch) await store.apply(rec.epoch, rec.pages, rec.deviceState);
      await rm(redoPath, { force: true });
    }
    return store;
  }

  /** The one epoch check: the record follows the last accepted checkpoint, under the number it was sent with. */
  private checkFollows(rec: CheckpointRecord, frameEpoch: number = rec.epoch): void {
    if (rec.epoch !== frameEpoch || rec.epoch !== this.epoch + 1) {
      throw corrupt(`checkpoint ${rec.epoch} (sent as ${frameEpoch}) does not follow committed epoch ${this.epoch}`, {
        epoch: rec.epoch,
      });
    }
  }

  /** Stage, verify, commit (one rename), apply. Returns the committed epoch once applied. */
  async commit(rec: CheckpointRecord): Promise<number> {
    await this.settled();
    this.checkFollows(rec);
    validateRecord(rec, this.meta.blocks);
    await this.accept(rec, encodeRecordParts(rec, this.meta.blocks));
    await this.settled();
    return rec.epoch;
  }

  /**
   * The same for a record as it came off the wire in a frame numbered `frameEpoch` (authenticated by
   * that frame; sealed with its checksum here if it is written as it came). `disk`: returns at the commit point, the checkpoint durable in the redo record
   * (its pages are written into the images behind the caller's acknowledgement). `memory`: returns
   * once the record is decoded, verified and next in order — complete in this process's memory —
   * with its commit point written behind it, in order (Remus' choice: what a crash of this host
   * within that window loses is in docs/replication.md). Either way settled() waits for all of it.
   */
  async commitRecord(
    record: Buffer,
    frameEpoch: number,
    durability: Durability = 'disk',
    staged: readonly DirtyPage[] = [],
    resolve?: (pages: WirePage[]) => DirtyPage[],
  ): Promise<CheckpointRecord> {
    if (this.applyError) throw this.applyError;
    // A write-behind backlog past its bound is waited for: memory stays bounded, the ack slows.
    if (
      this.pending >= MAX_BEHIND ||
      this.pendingBytes >= MAX_BEHIND_BYTES ||
      (this.merge?.recordBytes ?? 0) >= MAX_MERGED_RECORD_BYTES
    )
      await this.settled();
    // Checks every page against the layout; page references are resolved to whole pages (or left out: unchanged).
    let referenced = false;
    const sent = decodeRecord(
      record,
      this.meta.blocks,
      'wire',
      resolve &&
        ((pages) => {
          referenced = pages.some((p) => p.ref);
          return resolve(pages);
        }),
    );
    this.checkFollows(sent, frameEpoch);
    // Pages pre-sent for this checkpoint (checked when they arrived) come first: its own copies win.
    const rec: CheckpointRecord = staged.length
      ? { epoch: sent.epoch, pages: staged.concat(sent.pages), deviceState: sent.deviceState }
      : sent;
    const stagedBytes = staged.length * PAGE_SIZE;
    if (durability === 'memory') {
      this.acceptBehind(rec, record.length + stagedBytes);
      return rec;
    }
    // (written as it came unless it had pre-sent pages or references: then as applied, every page whole)
    await this.accept(
      rec,
      staged.length || referenced
        ? encodeRecordParts(rec, this.meta.blocks)
        : { parts: [sealRecord(record)], length: record.length },
    );
    return rec;
  }

  /**
   * Memory durability: the checkpoint joins the ones accepted and not yet written, merged (a page
   * dirtied again replaces its older copy; the device state is the latest). One writer writes what
   * has gathered as one record — staged, committed by rename, applied — then what gathered
   * meanwhile: when the standby's disk cannot keep up with the checkpoint rate, it writes each
   * page once per batch instead of once per checkpoint, and the acks do not wait for it. A merged
   * record carries the last checkpoint's epoch and every page since the files' epoch.
   */
  private acceptBehind(rec: CheckpointRecord, recordBytes: number): void {
    this.accepted = rec.epoch;
    const m = (this.merge ??= {
      epoch: rec.epoch,
      pages: new PageSet(),
      deviceState: rec.deviceState,
      bytes: 0,
      recordBytes: 0,
    });
    m.recordBytes += recordBytes; // the pages reference their records' buffers
    for (const p of rec.pages)
      if (m.pages.set(p)) {
        m.bytes += PAGE_SIZE;
        this.pendingBytes += PAGE_SIZE;
      }
    m.epoch = rec.epoch;
    m.deviceState = rec.deviceState;
    if (!this.writingBehind) this.startWriter();
  }

  /** Starts the writer behind, after the writes queued so far; a failure is kept for the next commit and settled(). */
  private startWriter(): void {
    this.writingBehind = true;
    this.pending++;
    this.tail = this.tail
      .then(() => this.writeBehind())
      .catch((e: unknown) => {
        this.writingBehind = false;
        this.applyError ??= e instanceof Error ? e : new Error(String(e));
      })
      .finally(() => {
        this.pending--;
      });
  }

  private async writeBehind(): Promise<void> {
    for (;;) {
      // One batch per interval at most: at a high checkpoint rate each page is written once per
      // interval, not once per checkpoint (the files lag by about an interval; settled() cuts the wait short).
      const since = performance.now() - this.lastBatchMs;
      if (since < WRITE_BEHIND_INTERVAL_MS && this.flushWanted === 0) {
        await new Promise<void>((r) => {
          const t = setTimeout(r, WRITE_BEHIND_INTERVAL_MS - since);
          this.wakeWriter = () => {
            clearTimeout(t);
            r();
          };
        });
        this.wakeWriter = null;
      }
      const m = this.merge;
      if (!m) {
        this.writingBehind = false;
        return;
      } // (no await between the check and the flag)
      this.merge = null;
      this.lastBatchMs = performance.now();
      await this.applying; // the previous batch is in the images before this one's redo record replaces it
      if (this.applyError) throw this.applyError;
      const pages = m.pages.values();
      try {
        // (the redo record is written from its pieces: the pages are not copied into one buffer first)
        await this.commitVerified(
          m.epoch,
          encodeRecordParts({ epoch: m.epoch, pages, deviceState: m.deviceState }, this.meta.blocks).parts,
          pages,
          m.deviceState,
        );
      } catch (e) {
        // A failed write (ENOSPC, EIO) keeps the batch: it was acknowledged, so it is the replica's
        // state until it is written (retryBehind) — never dropped for the older files.
        this.keepUnwritten(m);
        throw e;
      }
      this.pendingBytes -= m.bytes;
    }
  }

  /** Puts a batch that failed to be written back under what gathered since (the newer copies win). */
  private keepUnwritten(m: NonNullable<ReplicaStore['merge']>): void {
    const newer = this.merge;
    if (newer) {
      for (const p of newer.pages.values()) if (m.pages.set(p)) m.bytes += PAGE_SIZE;
      this.pendingBytes -= newer.bytes;
      m.epoch = newer.epoch;
      m.deviceState = newer.deviceState;
      m.recordBytes += newer.recordBytes;
    }
    this.merge = m;
  }

  /** Memory durability: the acknowledged epoch whose pages are only in memory after a failed write (null: none). */
  get unwrittenEpoch(): number | null {
    return this.applyError && this.merge ? this.merge.epoch : null;
  }

  /**
   * Writes a kept batch again (after a failed write): resolves once the files hold every
   * acknowledged checkpoint, rejects if writing still fails (the batch stays kept).
   */
  async retryBehind(): Promise<void> {
    if (!this.merge || !this.applyError) return this.settled();
    this.applyError = null;
    this.startWriter();
    return this.settled();
  }

  /** Queues a checked record's writes behind the earlier ones; resolves at its commit point. */
  private accept(rec: CheckpointRecord, record: RecordParts): Promise<void> {
    this.accepted = rec.epoch;
    this.pending++;
    this.pendingBytes += record.length;
    let reached!: () => void;
    let failed!: (e: Error) => void;
    const point = new Promise<void>((res, rej) => {
      reached = res;
      failed = rej;
    });
    this.tail = this.tail
      .then(async () => {
        if (this.applyError) throw this.applyError;
        await this.applying; // the previous checkpoint is in the images before this one's redo record replaces it
        if (this.applyError) throw this.applyError;
        await this.commitVerified(rec.epoch, record.parts, rec.pages, rec.deviceState);
      })
      .then(
        () => reached(),
        (e: unknown) => {
          const err = e instanceof Error ? e : new Error(String(e));
          this.applyError ??= err;
          failed(err);
        },
      )
      .finally(() => {
        this.pending--;
        this.pendingBytes -= record.length;
      });
    return point;
  }

  private async commitVerified(
    epoch: number,
    record: readonly Buffer[],
    pages: readonly DirtyPage[],
    deviceState: Buffer,
  ): Promise<number> {
    const stage = join(this.dir, 'stage.tmp');
    await writePrivate(stage, record, this.fsync);
    const redo = join(this.dir, 'redo.ckpt');
    await rename(stage, redo); // the commit point
    if (this.fsync) fsyncDir(this.dir); // … durable before it is acknowledged (disk durability)
    this.applying = this.apply(epoch, pages, deviceState)
      .then(() => rm(redo, { force: true }))
      .catch((e: unknown) => {
        this.applyError = e instanceof Error ? e : new Error(String(e));
      });
    return epoch;
  }

  private async handle(i: number): Promise<FileHandle> {
    let fh = this.handles.get(i);
    if (!fh) {
      fh = await open(join(this.dir, 'ram', `${i}.img`), constants.O_RDWR | constants.O_NOFOLLOW);
      this.handles.set(i, fh);
    }
    return fh;
  }

  /** Writes the pages in place, adjacent pages of a block in one call, then the device state and meta. */
  private async apply(epoch: number, pages: readonly DirtyPage[], deviceState: Buffer): Promise<void> {
    const index = new Map(this.meta.blocks.map((b, i) => [b.id, i]));
    const sorted = [...pages].sort((a, b) => index.get(a.block)! - index.get(b.block)! || a.offset - b.offset);
    const touched = new Set<number>();
    let k = 0;
    let sliceStart = performance.now();
    while (k < sorted.length) {
      const first = sorted[k]!;
      const bi = index.get(first.block)!;
      const bufs: Buffer[] = [];
      let end = first.offset;
      // A run: same block, each page right after the previous (a page twice in a record starts a new run: the later
      // copy wins).
      while (k < sorted.length && sorted[k]!.block === first.block && sorted[k]!.offset === end && bufs.length < 512) {
        const p = sorted[k]!;
        bufs.push(p.data ?? (p.fill ? Buffer.alloc(PAGE_SIZE, p.fill) : ZERO_PAGE));
        end += PAGE_SIZE;
        k++;
      }
      writeAll((await this.handle(bi)).fd, bufs, first.offset);
      touched.add(bi);
      if (performance.now() - sliceStart > APPLY_SLICE_MS) {
        await new Promise<void>((r) => setImmediate(r));
        sliceStart = performance.now();
      }
    }
    if (this.fsync) for (const bi of touched) await (await this.handle(bi)).datasync();
    this.device = Buffer.from(deviceState);
    await writePrivate(join(this.dir, 'device.bin'), this.device, this.fsync);
    this.meta = { ...this.meta, epoch };
    await this.writeMeta();
  }

  private async writeMeta(): Promise<void> {
    await writePrivateAtomic(join(this.dir, 'meta.json'), Buffer.from(JSON.stringify(this.meta, null, 1)), this.fsync);
  }

  /** Closes the image files (after settled()); the store may be used again (they reopen). */
  async close(): Promise<void> {
    await this.applying?.catch(() => {});
    for (const fh of this.handles.values()) await fh.close().catch(() => {});
    this.handles.clear();
  }
}

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/**
 * A full image arriving in pieces (the initial synchronisation): sparse image files of the
 * announced sizes, written in place as runs and filled pages arrive, in a folder of its own; a
 * store (epoch 0) once the device state closes it. A fill of zeroes on a page this image never
 * wrote is skipped (the file reads zero there already), so a mostly empty guest costs no disk.
 */
export class ReplicaBuilder {
  private readonly written: Uint8Array[];
  private constructor(
    readonly dir: string,
    private readonly meta: ReplicaMeta,
    private readonly files: FileHandle[],
    private readonly fsync: boolean,
  ) {
    this.written = meta.blocks.map((b) => new Uint8Array(Math.ceil(b.lengthBytes / PAGE_SIZE / 8)));
  }

  static async begin(
    dir: string,
    vm: string,
    layout: { machine: string; blocks: RamBlockInfo[] },
    opts: ReplicaStoreOptions = {},
  ): Promise<ReplicaBuilder> {
    ensurePrivateDir(dir, 'replica folder');
    ensurePrivateDir(join(dir, 'ram'), 'replica folder');
    const files: FileHandle[] = [];
    try {
      for (const [i, b] of layout.blocks.entries()) {
        assert(b.lengthBytes % PAGE_SIZE === 0, `block ${b.id} is whole pages`);
        const fh = await openPrivate(
          join(dir, 'ram', `${i}.img`),
          constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW,
        );
        files.push(fh);
        await fh.truncate(b.lengthBytes); // sparse: no block is allocated until written
      }
    } catch (e) {
      for (const fh of files) await fh.close().catch(() => {});
      throw e;
    }
    return new ReplicaBuilder(
      dir,
      { format: FORMAT, vm, machine: layout.machine, epoch: 0, blocks: layout.blocks },
      files,
      opts.fsync ?? true,
    );
  }

  private check(blockIndex: number, offset: number, length: number): void {
    const b = this.meta.blocks[blockIndex];
    if (!b) throw corrupt(`full image names block ${blockIndex}`);
    if (offset % PAGE_SIZE !== 0 || length % PAGE_SIZE !== 0 || offset + length > b.lengthBytes)
      throw corrupt(`full image: ${length} bytes at ${offset} do not fit block ${b.id}`);
  }

  private mark(blockIndex: number, offset: number, length: number): void {
    const bits = this.written[blockIndex]!;
    for (let p = offset / PAGE_SIZE; p < (offset + length) / PAGE_SIZE; p++) bits[p >> 3]! |= 1 << (p & 7);
  }

  /** Pages at `offset` of block `blockIndex`, as they stand now (a later copy of a page overwrites it). */
  async writeRun(blockIndex: number, offset: number, data: Buffer): Promise<void> {
    this.check(blockIndex, offset, data.length);
    await this.files[blockIndex]!.write(data, 0, data.length, offset);
    this.mark(blockIndex, offset, data.length);
  }

  /** One page that is all `fill`. */
  async fill(blockIndex: number, offset: number, fill: number): Promise<void> {
    this.check(blockIndex, offset, PAGE_SIZE);
    const p = offset / PAGE_SIZE;
    if (fill === 0 && !(this.written[blockIndex]![p >> 3]! & (1 << (p & 7)))) return;
    await this.files[blockIndex]!.write(fill === 0 ? ZERO_PAGE : Buffer.alloc(PAGE_SIZE, fill), 0, PAGE_SIZE, offset);
    this.mark(blockIndex, offset, PAGE_SIZE);
  }

  /** The image is complete: device state and meta written (durably when asked), a store at epoch 0. */
  async finish(deviceState: Buffer): Promise<ReplicaStore> {
    for (const fh of this.files) {
      if (this.fsync) await fh.sync();
      await fh.close();
    }
    this.files.length = 0;
    await writePrivate(join(this.dir, 'device.bin'), deviceState, this.fsync);
    await writePrivateAtomic(join(this.dir, 'meta.json'), Buffer.from(JSON.stringify(this.meta, null, 1)), this.fsync);
    return ReplicaStore.fromBuilt(this.dir, this.meta, Buffer.from(deviceState), this.fsync);
  }

  /** The image will not be completed: files closed and the folder removed. */
  async abandon(): Promise<void> {
    for (const fh of this.files) await fh.close().catch(() => {});
    this.files.length = 0;
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** `bufs` at `position` of `fd`, all of them (a short write, rare on a regular file, is continued). */
function writeAll(fd: number, bufs: Buffer[], position: number): void {
  let total = 0;
  for (const b of bufs) total += b.length;
  let done = writevSync(fd, bufs, position);
  while (done < total) {
    const n = writevSync(fd, [Buffer.concat(bufs).subarray(done)], position + done);
    if (n <= 0) throw new Error(`replica image: a write at ${position + done} wrote nothing`);
    done += n;
  }
}
