// Who may run a protected VM live: its ownership in the witness (etcd), with a fencing token.
// Per VM, `/rubato/vm/NAME/owner` names the host that may release the guest's output or bring a
// replica live; it is attached to that host's lease, so it vanishes when the host stops renewing.
// `/rubato/vm/NAME/generation` (no lease) only grows. Claiming is one transaction: the owner key
// absent (or ours) and the generation unchanged since read → owner = us, generation + 1. The new
// generation is the fencing token that frames and acks carry.
//
// A holder that cannot renew for LOSS_FRACTION of the TTL gives up at once (onLost): from then on it
// may not run the guest alone — before the lease can expire and another host claim the VM, it
// stops its guest unless its standby still acknowledges every checkpoint (a standby that does is not
// live, and one that is not cannot claim without etcd either), and it claims again when it can.

import { Worker } from 'node:worker_threads';
import { logger } from '../util/log.ts';
import { errorMessage } from '../util/errors.ts';
import type { EtcdClient } from './etcd.ts';

const log = logger('witness');
/** Give up after this fraction of the TTL without a renewal (before the lease can expire elsewhere). */
export const LOSS_FRACTION = 2 / 3;
const WATCHDOG_MS = 50;

/**
 * The lease keeper (a worker thread, plain JS): keepalives every `everyMs` through etcd's JSON
 * gateway, each endpoint in turn; shared[0] = the send time of the latest renewal etcd confirmed,
 * shared[1] = 1 once etcd says the lease is gone.
 */
const KEEPER_SOURCE = `
const { workerData } = require('node:worker_threads');
const { endpoints, lease, everyMs, timeoutMs, shared } = workerData;
const view = new BigInt64Array(shared);
let next = 0;
async function renew() {
  const sent = Date.now();
  for (let i = 0; i < endpoints.length; i++) {
    const ep = endpoints[(next + i) % endpoints.length];
    try {
      const r = await fetch(ep + '/v3/lease/keepalive', { method: 'POST', body: JSON.stringify({ ID: lease }), signal: AbortSignal.timeout(timeoutMs) });
      const j = await r.json();
      if (!r.ok) continue;
      next = (next + i) % endpoints.length;
      if (Number((j.result && j.result.TTL) || 0) > 0) { if (BigInt(sent) > Atomics.load(view, 0)) Atomics.store(view, 0, BigInt(sent)); }
      else Atomics.store(view, 1, 1n);
      return;
    } catch (e) { /* the next endpoint, or the next round */ }
  }
}
setInterval(renew, everyMs);
`;

export interface Owner { host: string; generation: number }

const ownerKey = (vm: string) => `/rubato/vm/${vm}/owner`;
const genKey = (vm: string) => `/rubato/vm/${vm}/generation`;

export async function currentOwner(etcd: EtcdClient, vm: string): Promise<Owner | null> {
  const kv = await etcd.get(ownerKey(vm));
  return kv ? (JSON.parse(kv.value) as Owner) : null;
}

export class Ownership {
  private lease: string | null = null;
  private keeper: Worker | null = null;
  private shared: BigInt64Array | null = null;
  private watchdog: NodeJS.Timeout | null = null;
  private lastRenewMs = 0;
  private gen = 0;
  private lostFlag = false;
  onLost: ((why: string) => void) | null = null;

  constructor(private readonly etcd: EtcdClient, readonly vm: string, readonly host: string, readonly ttlSec: number) {}

  get generation(): number { return this.gen; }
  get held(): boolean { return this.lease !== null && !this.lostFlag; }

  /**
   * Claims the VM: succeeds only if no other host holds it (its lease expired or it released it).
   * Returns the new generation, or null if another host holds it.
   */
  async claim(): Promise<number | null> {
    const lease = this.lease ?? await this.etcd.grantLease(this.ttlSec);
    const grantedAt = Date.now();
    const [owner, gen] = [await this.etcd.get(ownerKey(this.vm)), await this.etcd.get(genKey(this.vm))];
    const mine = owner && (JSON.parse(owner.value) as Owner).host === this.host && owner.lease === lease;
    if (owner && !mine) {
      if (!this.lease) await this.etcd.revokeLease(lease).catch(() => {});
      return null;
    }
    const next = (gen ? Number(gen.value) : 0) + 1;
    const ok = await this.etcd.txn(
      [owner ? { key: ownerKey(this.vm), modRevision: owner.modRevision } : { key: ownerKey(this.vm), absent: true },
        gen ? { key: genKey(this.vm), modRevision: gen.modRevision } : { key: genKey(this.vm), absent: true }],
      [{ put: ownerKey(this.vm), value: JSON.stringify({ host: this.host, generation: next }), lease }, { put: genKey(this.vm), value: String(next) }],
    );
    if (!ok) {
      if (!this.lease) await this.etcd.revokeLease(lease).catch(() => {});
      return null;
    }
    this.lease = lease;
    this.gen = next;
    this.lostFlag = false;
    this.lastRenewMs = grantedAt;
    this.startRenewing();
    log.info(`VM ${this.vm}: ${this.host} holds it, generation ${next}`);
    return next;
  }

  private startRenewing(): void {
    if (this.keeper) return;
    const everyMs = Math.max(50, (this.ttlSec * 1000) / 4);
    // The renewals run in a worker thread: a main loop busy with a checkpoint or a full sync for a
    // few hundred milliseconds must not look like a lost witness. Renewals overlap: each may take the
    // whole loss budget (a slow answer still renews; its send time is what counts). The worker
    // writes the latest renewal's send time into shared memory, read here without a message.
    this.shared = new BigInt64Array(new SharedArrayBuffer(16));
    this.shared[0] = BigInt(this.lastRenewMs);
    this.keeper = new Worker(KEEPER_SOURCE, {
      eval: true,
      workerData: { endpoints: this.etcd.urls, lease: this.lease, everyMs, timeoutMs: Math.round(this.ttlSec * 1000 * LOSS_FRACTION), shared: this.shared.buffer },
    });
    this.keeper.unref();
    this.keeper.on('error', (e) => log.warn(`the lease keeper of ${this.vm} failed: ${e.message}`));
    // The deadline is watched on its own: a renewal that hangs must not delay giving up.
    this.watchdog = setInterval(() => {
      if (!this.lease || this.lostFlag || !this.shared) return;
      if (Atomics.load(this.shared, 1) !== 0n) return this.lose('the lease expired');
      this.lastRenewMs = Math.max(this.lastRenewMs, Number(Atomics.load(this.shared, 0)));
      const silent = Date.now() - this.lastRenewMs;
      if (silent > this.ttlSec * 1000 * LOSS_FRACTION) this.lose(`no renewal for ${silent} ms (TTL ${this.ttlSec} s)`);
    }, WATCHDOG_MS);
    this.watchdog.unref();
  }

  private lose(why: string): void {
    if (this.lostFlag) return;
    this.lostFlag = true;
    this.stopRenewing();
    this.lease = null; // a later claim needs a new lease
    log.error(`VM ${this.vm}: ${this.host} lost its ownership (${why})`);
    this.onLost?.(why);
  }

  private stopRenewing(): void {
    void this.keeper?.terminate();
    if (this.watchdog) clearInterval(this.watchdog);
    this.keeper = null;
    this.shared = null;
    this.watchdog = null;
  }

  /** Gives the VM up in order (the owner key goes at once). */
  async release(): Promise<void> {
    this.stopRenewing();
    const lease = this.lease;
    this.lease = null;
    if (lease) await this.etcd.revokeLease(lease).catch((e: unknown) => log.warn(`releasing ${this.vm}: ${errorMessage(e)}`));
  }
}
