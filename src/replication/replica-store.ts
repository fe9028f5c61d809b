// The standby's replica: exactly one committed checkpoint, on disk and in memory. A checkpoint is
// staged, verified complete and intact, then committed by one rename (the redo record); applying
// it is idempotent, so a store reopened after a crash at any moment holds the last committed one.
// It never applies a partial or corrupt checkpoint. A record off the wire is acknowledgeable at
// its commit point: `commitRecord` returns there, with memory already updated, and writes the
// images behind it; the next commit, and anything that reads the files, waits for that (`settled`).
//
// On-disk format (version 1), in the store's folder:
//   meta.json        { format: 1, vm, machine, epoch, blocks: [{ id, lengthBytes }] }
//   ram/<n>.img      RAM image of block n (n = index in meta.blocks)
//   device.bin       device state of the committed epoch (QEMU sections + EOF)
//   redo.ckpt        a committed checkpoint not yet fully applied (present only mid-apply)
//   stage.tmp        a checkpoint being staged (ignored and removed on open)
// redo.ckpt / stage.tmp record: "RBCK" be32 version=1, be64 epoch, be32 pages, be32 deviceLen,
//   pages: { u8 blockIndex, u8 kind (0 data, 1 fill), u8 fill, u8 0, be64 offset, [4096 data if kind 0] },
//   device state, then be32 CRC-32 of everything before it (torn or corrupted records; the wire
//   frames carrying a record are authenticated separately with HMAC-SHA256).

import { crc32 } from 'node:zlib';
import { existsSync, mkdirSync } from 'node:fs';
import { open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { RubatoError, assert } from '../util/errors.ts';
import { checkDeviceState } from '../capture/stream/parser.ts';
import { PAGE_SIZE, type BaseImage, type Checkpoint, type DirtyPage, type RamBlockInfo } from '../capture/checkpoint.ts';

const FORMAT = 1;
const MAGIC = 0x5242434b; // "RBCK"
const HEADER_BYTES = 24;
const PAGE_HEADER_BYTES = 12;
const CHECKSUM_BYTES = 4;

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
  /** create(): keep the caller's base buffers instead of copying them (the caller gives them up). */
  adopt?: boolean;
}

const corrupt = (msg: string, ctx: Record<string, unknown> = {}) => new RubatoError('RUBATO_REPLICA_CORRUPT', msg, ctx);

export class ReplicaStore {
  private constructor(
    readonly dir: string,
    private meta: ReplicaMeta,
    private readonly ram: Map<string, Buffer>,
    private device: Buffer,
    private readonly fsync: boolean,
  ) {}

  /** The last committed epoch (its files may still be being written: see settled()). */
  get epoch(): number { return this.committed ?? this.meta.epoch; }
  private committed: number | null = null;
  private applying: Promise<void> | null = null;
  private applyError: Error | null = null;

  /** Resolves once the files hold the last committed checkpoint; rejects if writing them failed. */
  async settled(): Promise<void> {
    await this.applying;
    if (this.applyError) throw this.applyError;
  }
  get machine(): string { return this.meta.machine; }
  get blocks(): readonly RamBlockInfo[] { return this.meta.blocks; }
  get deviceState(): Buffer { return this.device; }
  /** The committed RAM of a block (read-only view; do not modify). */
  ramOf(block: string): Buffer {
    const b = this.ram.get(block);
    if (!b) throw new RubatoError('RUBATO_CONFIG', `replica has no RAM block ${block}`);
    return b;
  }
  imagePath(block: string): string {
    const i = this.meta.blocks.findIndex((b) => b.id === block);
    if (i < 0) throw new RubatoError('RUBATO_CONFIG', `replica has no RAM block ${block}`);
    return join(this.dir, 'ram', `${i}.img`);
  }

  /** Makes a new store holding the base image as epoch 0. */
  static async create(dir: string, vm: string, base: BaseImage, opts: ReplicaStoreOptions = {}): Promise<ReplicaStore> {
    mkdirSync(join(dir, 'ram'), { recursive: true });
    const fsync = opts.fsync ?? true;
    const meta: ReplicaMeta = { format: FORMAT, vm, machine: base.machine, epoch: 0, blocks: base.blocks };
    const ram = new Map<string, Buffer>();
    for (const [i, b] of base.blocks.entries()) {
      const img = base.ram.get(b.id);
      assert(img && img.length === b.lengthBytes, `base image block ${b.id} has its announced length`);
      ram.set(b.id, opts.adopt ? img : Buffer.from(img));
      await writeDurable(join(dir, 'ram', `${i}.img`), img, fsync);
    }
    const store = new ReplicaStore(dir, meta, ram, Buffer.from(base.deviceState), fsync);
    await writeDurable(join(dir, 'device.bin'), base.deviceState, fsync);
    await store.writeMeta();
    return store;
  }

  /** The same store after its directory was renamed to `dir` by the caller (nothing is reread). */
  relocated(dir: string): ReplicaStore {
    assert(this.applying === null, 'a store is relocated only before its first checkpoint');
    return new ReplicaStore(dir, this.meta, this.ram, this.device, this.fsync);
  }

  /** Opens a store, finishing a committed-but-unapplied checkpoint if a crash left one. */
  static async open(dir: string, opts: ReplicaStoreOptions = {}): Promise<ReplicaStore> {
    const fsync = opts.fsync ?? true;
    let meta: ReplicaMeta;
    try {
      meta = JSON.parse(await readFile(join(dir, 'meta.json'), 'utf8')) as ReplicaMeta;
    } catch (e) {
      throw corrupt(`replica in ${dir} has no readable meta.json`, { dir });
    }
    if (meta.format !== FORMAT) throw corrupt(`replica in ${dir} has format ${meta.format}, this Rubato reads ${FORMAT}`);
    const ram = new Map<string, Buffer>();
    for (const [i, b] of meta.blocks.entries()) {
      const img = await readFile(join(dir, 'ram', `${i}.img`));
      if (img.length !== b.lengthBytes) throw corrupt(`replica image of block ${b.id} has ${img.length} bytes, expected ${b.lengthBytes}`);
      ram.set(b.id, img);
    }
    const device = await readFile(join(dir, 'device.bin'));
    await rm(join(dir, 'stage.tmp'), { force: true });
    const store = new ReplicaStore(dir, meta, ram, device, fsync);
    const redoPath = join(dir, 'redo.ckpt');
    if (existsSync(redoPath)) {
      const rec = decodeRecord(await readFile(redoPath), meta.blocks);
      // The record was committed (renamed into place) before any of it was applied.
      if (rec.epoch === meta.epoch + 1 || rec.epoch === meta.epoch) await store.apply(rec.epoch, rec.pages, rec.deviceState);
      await rm(redoPath, { force: true });
    }
    return store;
  }

  /** Checks a checkpoint against the replica's layout without touching anything. */
  validate(cp: Checkpoint): void {
    if (cp.epoch !== this.meta.epoch + 1) {
      throw corrupt(`checkpoint ${cp.epoch} does not follow committed epoch ${this.meta.epoch}`, { epoch: cp.epoch });
    }
    for (const p of cp.pages) {
      const len = this.meta.blocks.find((b) => b.id === p.block)?.lengthBytes;
      if (len === undefined) throw corrupt(`checkpoint ${cp.epoch} names unknown RAM block ${p.block}`, { epoch: cp.epoch });
      if (p.offset % PAGE_SIZE !== 0 || p.offset + PAGE_SIZE > len) throw corrupt(`checkpoint ${cp.epoch}: page offset ${p.offset} outside block ${p.block}`, { epoch: cp.epoch });
      if (p.data && p.data.length !== PAGE_SIZE) throw corrupt(`checkpoint ${cp.epoch}: page of ${p.data.length} bytes`, { epoch: cp.epoch });
    }
    if (!checkDeviceState(cp.deviceState)) throw corrupt(`checkpoint ${cp.epoch}: device state is not framed as QEMU sections + EOF`, { epoch: cp.epoch });
  }

  /** Stage, verify, commit (one rename), apply. Returns the committed epoch once applied. */
  async commit(cp: Checkpoint): Promise<number> {
    await this.settled();
    this.validate(cp);
    const epoch = await this.commitVerified(cp.epoch, encodeRecord(cp, this.meta.blocks), cp.pages, cp.deviceState);
    await this.settled();
    return epoch;
  }

  /**
   * The same for a record as it came off the wire (checksummed by its sender), returning at the
   * commit point: the checkpoint is durable (the redo record) and in memory; its images are written
   * behind the caller's acknowledgement (settled() waits for them).
   */
  async commitRecord(record: Buffer): Promise<number> {
    await this.settled();
    const rec = decodeRecord(record, this.meta.blocks);
    this.validate({ epoch: rec.epoch, route: 'a', pages: rec.pages, deviceState: rec.deviceState, ramBytes: 0, zeroPages: 0, pausedAtMs: 0, timings: { captureMs: 0, pauseMsLocal: 0, heldMs: 0 } });
    return this.commitVerified(rec.epoch, record, rec.pages, rec.deviceState);
  }

  private async commitVerified(epoch: number, record: Buffer, pages: readonly DirtyPage[], deviceState: Buffer): Promise<number> {
    const stage = join(this.dir, 'stage.tmp');
    await writeDurable(stage, record, this.fsync);
    const redo = join(this.dir, 'redo.ckpt');
    await rename(stage, redo); // the commit point
    this.committed = epoch;
    this.applying = this.apply(epoch, pages, deviceState)
      .then(() => rm(redo, { force: true }))
      .catch((e: unknown) => { this.applyError = e instanceof Error ? e : new Error(String(e)); });
    return epoch;
  }

  private async apply(epoch: number, pages: readonly DirtyPage[], deviceState: Buffer): Promise<void> {
    // Memory first, all at once (no await before it is done): readers of ramOf()/deviceState see
    // either the previous checkpoint or this one. Then the files.
    const touched = new Map<string, number[]>();
    for (const p of pages) {
      const buf = this.ram.get(p.block)!;
      if (p.data) p.data.copy(buf, p.offset);
      else buf.fill(p.fill ?? 0, p.offset, p.offset + PAGE_SIZE);
      let list = touched.get(p.block);
      if (!list) touched.set(p.block, (list = []));
      list.push(p.offset);
    }
    this.device = Buffer.from(deviceState);
    for (const [block, offsets] of touched) await this.writeRuns(block, offsets);
    await writeDurable(join(this.dir, 'device.bin'), this.device, this.fsync);
    this.meta = { ...this.meta, epoch };
    await this.writeMeta();
  }

  /** Writes the touched pages of a block from memory to its image, coalescing adjacent pages. */
  private async writeRuns(block: string, offsets: number[]): Promise<void> {
    offsets.sort((a, b) => a - b);
    const buf = this.ram.get(block)!;
    const fh = await open(this.imagePath(block), 'r+');
    try {
      let i = 0;
      while (i < offsets.length) {
        const start = offsets[i]!;
        let end = start + PAGE_SIZE;
        while (i + 1 < offsets.length && offsets[i + 1]! <= end) { end = Math.max(end, offsets[i + 1]! + PAGE_SIZE); i++; }
        await fh.write(buf, start, end - start, start);
        i++;
      }
      if (this.fsync) await fh.sync();
    } finally {
      await fh.close();
    }
  }

  private async writeMeta(): Promise<void> {
    const tmp = join(this.dir, 'meta.json.tmp');
    await writeDurable(tmp, Buffer.from(JSON.stringify(this.meta, null, 1)), this.fsync);
    await rename(tmp, join(this.dir, 'meta.json'));
  }
}

async function writeDurable(path: string, data: Buffer, fsync: boolean): Promise<void> {
  if (!fsync) { await writeFile(path, data); return; }
  const fh = await open(path, 'w');
  try {
    await fh.write(data, 0, data.length, 0);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export function encodeRecord(cp: Checkpoint, blocks: readonly RamBlockInfo[]): Buffer {
  const index = new Map(blocks.map((b, i) => [b.id, i]));
  let size = HEADER_BYTES + cp.deviceState.length + CHECKSUM_BYTES;
  for (const p of cp.pages) size += PAGE_HEADER_BYTES + (p.data ? PAGE_SIZE : 0);
  const out = Buffer.allocUnsafe(size);
  out.writeUInt32BE(MAGIC, 0);
  out.writeUInt32BE(FORMAT, 4);
  out.writeBigUInt64BE(BigInt(cp.epoch), 8);
  out.writeUInt32BE(cp.pages.length, 16);
  out.writeUInt32BE(cp.deviceState.length, 20);
  let o = HEADER_BYTES;
  for (const p of cp.pages) {
    const bi = index.get(p.block);
    assert(bi !== undefined, `block ${p.block} is in the layout`);
    out[o] = bi;
    out[o + 1] = p.data ? 0 : 1;
    out[o + 2] = p.fill ?? 0;
    out[o + 3] = 0;
    out.writeBigUInt64BE(BigInt(p.offset), o + 4);
    o += PAGE_HEADER_BYTES;
    if (p.data) { p.data.copy(out, o); o += PAGE_SIZE; }
  }
  cp.deviceState.copy(out, o);
  o += cp.deviceState.length;
  out.writeUInt32BE(crc32(out.subarray(0, o)), o);
  return out;
}

export function decodeRecord(buf: Buffer, blocks: readonly RamBlockInfo[]): { epoch: number; pages: DirtyPage[]; deviceState: Buffer } {
  if (buf.length < HEADER_BYTES + CHECKSUM_BYTES) throw corrupt(`checkpoint record of ${buf.length} bytes is truncated`);
  const body = buf.subarray(0, buf.length - CHECKSUM_BYTES);
  if (crc32(body) !== buf.readUInt32BE(buf.length - CHECKSUM_BYTES)) throw corrupt('checkpoint record fails its checksum');
  if (buf.readUInt32BE(0) !== MAGIC || buf.readUInt32BE(4) !== FORMAT) throw corrupt('checkpoint record has a bad magic or format');
  const epoch = Number(buf.readBigUInt64BE(8));
  const n = buf.readUInt32BE(16);
  const devLen = buf.readUInt32BE(20);
  const pages: DirtyPage[] = [];
  let o = HEADER_BYTES;
  for (let i = 0; i < n; i++) {
    if (o + PAGE_HEADER_BYTES > body.length) throw corrupt('checkpoint record ends inside a page header');
    const block = blocks[buf[o]!];
    if (!block) throw corrupt(`checkpoint record names block index ${buf[o]}`);
    const kind = buf[o + 1];
    const fill = buf[o + 2]!;
    const offset = Number(buf.readBigUInt64BE(o + 4));
    o += PAGE_HEADER_BYTES;
    if (offset % PAGE_SIZE !== 0 || offset + PAGE_SIZE > block.lengthBytes) throw corrupt(`checkpoint record: offset ${offset} outside block ${block.id}`);
    if (kind === 0) {
      if (o + PAGE_SIZE > body.length) throw corrupt('checkpoint record ends inside a page');
      pages.push({ block: block.id, offset, data: buf.subarray(o, o + PAGE_SIZE) });
      o += PAGE_SIZE;
    } else if (kind === 1) {
      pages.push({ block: block.id, offset, data: null, fill });
    } else {
      throw corrupt(`checkpoint record: page kind ${kind}`);
    }
  }
  if (o + devLen !== body.length) throw corrupt('checkpoint record length does not match its contents');
  return { epoch, pages, deviceState: buf.subarray(o, o + devLen) };
}
