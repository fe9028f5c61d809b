// The primary's side of a full synchronisation: the guest's RAM pages go from QEMU's precopy
// stream straight onto the link as they are parsed (a PageSink), the disk's allocated extents are
// copied from the image file, and nothing is collected in memory: a 2 GiB guest with a 16 GiB disk
// costs the controller a few MiB of buffers. Link back-pressure reaches QEMU (the parser waits,
// the migration socket stops being read) and the disk reader alike.
//
// Frames: BASE_BEGIN (the layout: QEMU's RAM blocks, then the disk), BASE_DATA runs of adjacent
// pages of one block (≤ 1 MiB), BASE_FILL batches of one-byte pages, in the order they are seen: a
// page sent twice (an earlier precopy pass, then a later one) arrives at the standby in that order.

import { open } from 'node:fs/promises';
import { type PageSink, PAGE_SIZE, type RamBlockInfo } from '../capture/index.ts';
import { assert, GarbageMeter } from '../util/index.ts';
import type { Extent } from '../io/index.ts';
import type { Link } from './link.ts';
import { syncProgress, type SyncProgress } from './progress.ts';
import { FrameType } from './protocol/frame.ts';
import { BASE_DATA_HEADER_BYTES as HDR, encodeBaseFill, encodeLayout, setBaseDataHeader } from './protocol/messages.ts';

const RUN_BYTES = 1 << 20;
const FILL_BATCH = 8192;
const PROGRESS_EVERY_MS = 500;

export type SyncProgressEvent = SyncProgress;

export interface BaseSenderOptions {
  /** Blocks QEMU does not send (the disk), after its RAM blocks in the layout. */
  extraBlocks: RamBlockInfo[];
  /** Bytes those blocks will send (allocated extents), for progress. */
  extraBytes: number;
  /** Runs once the layout is sent, before any RAM page (copies the disk); the precopy waits for it. */
  afterLayout?: (s: BaseSender) => Promise<void>;
  progress?: (p: SyncProgressEvent) => void;
}

export class BaseSender implements PageSink {
  private blocks: RamBlockInfo[] = [];
  private index = new Map<string, number>();
  /** The BASE_DATA payload being filled: header, then the run's pages in place. */
  private run = Buffer.allocUnsafe(HDR + RUN_BYTES);
  private runBlock = -1;
  private runStart = 0;
  private runLen = 0;
  private fillBlock = -1;
  private fills: Array<{ offset: number; fill: number }> = [];
  private fillSet = new Set<number>();
  /** The last frame handed to the link: awaiting it is the back-pressure. */
  private lastSend: Promise<void> = Promise.resolve();
  private sentSinceDrain = 0;
  private bytes = 0;
  private totalBytes = 0;
  private readonly t0 = performance.now();
  private lastProgressMs = 0;
  private readonly garbage = new GarbageMeter(64 << 20);

  constructor(
    private readonly link: Link,
    private readonly o: BaseSenderOptions,
  ) {}

  /** The layout as sent (QEMU's blocks, then the extra ones); empty before the stream announced it. */
  get layoutBlocks(): readonly RamBlockInfo[] {
    return this.blocks;
  }
  get sentBytes(): number {
    return this.bytes;
  }

  async layout(sizes: ReadonlyMap<string, number>, order: readonly string[], machine: string): Promise<void> {
    if (this.blocks.length) return; // announced once per stream
    this.blocks = [...order.map((id) => ({ id, lengthBytes: sizes.get(id)! })), ...this.o.extraBlocks];
    this.index = new Map(this.blocks.map((b, i) => [b.id, i]));
    const ramBytes = order.reduce((s, id) => s + sizes.get(id)!, 0);
    this.totalBytes = ramBytes + this.o.extraBytes;
    this.frame(FrameType.BASE_BEGIN, encodeLayout({ machine, blocks: this.blocks, totalBytes: this.totalBytes }));
    await this.lastSend;
    await this.o.afterLayout?.(this);
  }

  private blockIndex(id: string): number {
    const i = this.index.get(id);
    assert(i !== undefined, `block ${id} is in the layout`);
    return i;
  }

  page(block: string, offset: number, data: Buffer): void {
    const bi = this.blockIndex(block);
    if (this.fillBlock === bi && this.fillSet.has(offset)) this.flushFills();
    if (this.runBlock !== bi || offset !== this.runStart + this.runLen || this.runLen + data.length > RUN_BYTES)
      this.flushRun();
    if (this.runLen === 0) {
      this.runBlock = bi;
      this.runStart = offset;
    }
    data.copy(this.run, HDR + this.runLen);
    this.runLen += data.length;
  }

  zero(block: string, offset: number, fill: number): void {
    const bi = this.blockIndex(block);
    if (this.runBlock === bi && offset >= this.runStart && offset < this.runStart + this.runLen) this.flushRun();
    if (this.fillBlock !== bi || this.fills.length >= FILL_BATCH) this.flushFills();
    this.fillBlock = bi;
    this.fills.push({ offset, fill });
    this.fillSet.add(offset);
  }

  /** After each record: once a megabyte went out, wait for the link to take it. */
  drain(): Promise<void> | null {
    if (this.sentSinceDrain < RUN_BYTES) return null;
    this.sentSinceDrain = 0;
    return this.lastSend;
  }

  /**
   * A payload buffer for up to RUN_BYTES of block data (the disk copy reads straight into it):
   * fill `data`, then hand it to sendPayload().
   */
  payloadBuffer(): { payload: Buffer; data: Buffer } {
    const payload = Buffer.allocUnsafe(HDR + RUN_BYTES);
    return { payload, data: payload.subarray(HDR) };
  }

  /** Sends the first `length` data bytes of a payloadBuffer() at `offset` of block `id`, with back-pressure. */
  async sendPayload(id: string, offset: number, payload: Buffer, length: number): Promise<void> {
    this.flushRun();
    setBaseDataHeader(payload, this.blockIndex(id), offset);
    this.frame(FrameType.BASE_DATA, payload.subarray(0, HDR + length), length);
    await this.lastSend;
  }

  /** Everything collected so far is handed to the link and written. */
  async flush(): Promise<void> {
    this.flushRun();
    this.flushFills();
    await this.lastSend;
  }

  private flushRun(): void {
    if (this.runLen === 0) return;
    // The payload leaves as it is (the link encrypts it into its own buffer); the next run gets a new one.
    setBaseDataHeader(this.run, this.runBlock, this.runStart);
    this.frame(FrameType.BASE_DATA, this.run.subarray(0, HDR + this.runLen), this.runLen);
    this.run = Buffer.allocUnsafe(HDR + RUN_BYTES);
    this.runLen = 0;
    this.runBlock = -1;
  }

  private flushFills(): void {
    if (this.fills.length === 0) return;
    this.frame(FrameType.BASE_FILL, encodeBaseFill(this.fillBlock, this.fills), this.fills.length * PAGE_SIZE);
    this.fills = [];
    this.fillSet = new Set();
    this.fillBlock = -1;
  }

  private frame(type: number, payload: Buffer, counts = 0): void {
    const p = this.link.send(type, 0, payload);
    p.catch(() => {
      /* the link's close reports it; the next await sees it */
    });
    this.lastSend = p;
    this.sentSinceDrain += payload.length;
    this.bytes += counts;
    this.garbage.add(payload.length);
    this.report();
  }

  private report(): void {
    const now = performance.now();
    if (!this.o.progress || now - this.lastProgressMs < PROGRESS_EVERY_MS) return;
    this.lastProgressMs = now;
    this.o.progress(syncProgress(this.bytes, this.totalBytes, now - this.t0));
  }
}

/** Copies the allocated extents of a disk image (skipping chunks that read all zero) as block `id`. */
export async function sendDiskExtents(
  s: BaseSender,
  id: string,
  path: string,
  extents: readonly Extent[],
): Promise<void> {
  const fh = await open(path, 'r');
  const zero = Buffer.alloc(RUN_BYTES);
  let b = s.payloadBuffer();
  try {
    for (const x of extents) {
      for (let off = x.start; off < x.start + x.length; off += RUN_BYTES) {
        const n = Math.min(RUN_BYTES, x.start + x.length - off);
        const { bytesRead } = await fh.read(b.data, 0, n, off);
        const len = Math.ceil(bytesRead / PAGE_SIZE) * PAGE_SIZE;
        if (len === 0) break;
        if (bytesRead < len) b.data.fill(0, bytesRead, len);
        if (b.data.subarray(0, len).equals(zero.subarray(0, len))) continue;
        await s.sendPayload(id, off, b.payload, len);
        b = s.payloadBuffer();
      }
    }
  } finally {
    await fh.close();
  }
}
