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
// redo.ckpt / stage.tmp hold one checkpoint record as it travels on the wire (protocol/record.ts).

import { existsSync } from 'node:fs';
import { open, readFile, rename, rm } from 'node:fs/promises';
import { ensurePrivateDir, fsyncDir, writePrivate, writePrivateAtomic } from '../util/private-files.ts';
import { join } from 'node:path';
import { RubatoError, assert } from '../util/errors.ts';
import { PAGE_SIZE, type BaseImage, type DirtyPage, type RamBlockInfo } from '../capture/checkpoint.ts';
import { decodeRecord, encodeRecord, validateRecord, type CheckpointRecord } from './protocol/record.ts';

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
    ensurePrivateDir(dir, 'replica folder');
    ensurePrivateDir(join(dir, 'ram'), 'replica folder');
    const fsync = opts.fsync ?? true;
    const meta: ReplicaMeta = { format: FORMAT, vm, machine: base.machine, epoch: 0, blocks: base.blocks };
    const ram = new Map<string, Buffer>();
    for (const [i, b] of base.blocks.entries()) {
      const img = base.ram.get(b.id);
      assert(img && img.length === b.lengthBytes, `base image block ${b.id} has its announced length`);
      ram.set(b.id, opts.adopt ? img : Buffer.from(img));
      await writePrivate(join(dir, 'ram', `${i}.img`), img, fsync);
    }
    const store = new ReplicaStore(dir, meta, ram, Buffer.from(base.deviceState), fsync);
    await writePrivate(join(dir, 'device.bin'), base.deviceState, fsync);
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

  /** The one epoch check: the record follows the committed checkpoint, under the number it was sent with. */
  private checkFollows(rec: CheckpointRecord, frameEpoch: number = rec.epoch): void {
    if (rec.epoch !== frameEpoch || rec.epoch !== this.meta.epoch + 1) {
      throw corrupt(`checkpoint ${rec.epoch} (sent as ${frameEpoch}) does not follow committed epoch ${this.meta.epoch}`, { epoch: rec.epoch });
    }
  }

  /** Stage, verify, commit (one rename), apply. Returns the committed epoch once applied. */
  async commit(rec: CheckpointRecord): Promise<number> {
    await this.settled();
    this.checkFollows(rec);
    validateRecord(rec, this.meta.blocks);
    const epoch = await this.commitVerified(rec.epoch, encodeRecord(rec, this.meta.blocks), rec.pages, rec.deviceState);
    await this.settled();
    return epoch;
  }

  /**
   * The same for a record as it came off the wire in a frame numbered `frameEpoch` (checksummed by
   * its sender), returning at the commit point: the checkpoint is durable (the redo record) and in
   * memory; its images are written behind the caller's acknowledgement (settled() waits for them).
   */
  async commitRecord(record: Buffer, frameEpoch: number): Promise<CheckpointRecord> {
    await this.settled();
    const rec = decodeRecord(record, this.meta.blocks); // checks every page against the layout
    this.checkFollows(rec, frameEpoch);
    await this.commitVerified(rec.epoch, record, rec.pages, rec.deviceState);
    return rec;
  }

  private async commitVerified(epoch: number, record: Buffer, pages: readonly DirtyPage[], deviceState: Buffer): Promise<number> {
    const stage = join(this.dir, 'stage.tmp');
    await writePrivate(stage, record, this.fsync);
    const redo = join(this.dir, 'redo.ckpt');
    await rename(stage, redo); // the commit point
    if (this.fsync) fsyncDir(this.dir); // … durable before it is acknowledged
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
    await writePrivate(join(this.dir, 'device.bin'), this.device, this.fsync);
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
    await writePrivateAtomic(join(this.dir, 'meta.json'), Buffer.from(JSON.stringify(this.meta, null, 1)), this.fsync);
  }
}
