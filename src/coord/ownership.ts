// Who may run a protected VM live: its ownership in the witness (etcd), with a fencing token.
// Per VM, `/rubato/vm/NAME/owner` names the host that may release the guest's output or bring a
// replica live; it is attached to that host's lease, so it vanishes when the host stops renewing.
// `/rubato/vm/NAME/generation` (no lease) only grows. Claiming is one transaction: the owner key
// absent (or ours) and the generation unchanged since read → owner = us, generation + 1. The new
// generation is the fencing token that frames and acks carry.
//
// A holder that cannot renew for LOSS_FRACTION of the TTL gives up at once, before the lease can
// expire and another host claim the VM: from then on no output leaves (the release gate reads
// `leaseCheck`), and the guard (guard.ts) claims it again as the same copy (`reclaim`) or stops the
// guest once the witness shows another copy took over.
// Lease age is counted on the monotonic clock from when each request was *sent* (lease.ts). A loss
// is remembered: a guard attached later (after the disk is prepared, after a restore) hears it at once.

import { Worker } from 'node:worker_threads';
import { logger, errorMessage, monotonicMs } from '../util/index.ts';
import { LeaseClock, LOSS_FRACTION } from './lease.ts';
import { LeaseSentinel } from './lease-sentinel.ts';
import type { EtcdClient } from './etcd.ts';

export { LOSS_FRACTION } from './lease.ts';

const log = logger('witness');
const WATCHDOG_MS = 50;
/** The lease keeper's and the embedded etcd's nice value: they run ahead of the guests' vCPUs on a busy host. */
export const WITNESS_NICE = -10;
/** Renewals per TTL: one slow answer (a loaded host) leaves several more before the loss budget is spent. */
const RENEWALS_PER_TTL = 6;

/**
 * The lease keeper (a worker thread, plain JS, one per VM held, started when the first claim
 * begins so that its start-up is not on a claim's path): keepalives of the lease it was last given
 * (a message: the lease, the owner key and value it renews, and its shared slots; null stops) at
 * once and every `everyMs`, through etcd's JSON gateway, each endpoint in turn. A renewal is a
 * keep-alive and then a write of the owner key conditioned on its value (still this claim's): it
 * counts only once both succeeded, and a failed condition means the VM is no longer this host's. Per lease, shared[0] = the monotonic send time (ns) of
 * the latest renewal etcd confirmed, shared[1] = 1 once etcd says the lease is gone: a lease's
 * slots are its own, so a late answer for an old lease never counts for a new one. Renewals
 * overlap: a slow answer still renews, and its send time is what counts.
 */
const KEEPER_SOURCE = `
const KEEPER_NICE = ${WITNESS_NICE};
const { workerData, parentPort } = require('node:worker_threads');
const { endpoints, everyMs, timeoutMs } = workerData;
// This thread ahead of the guests on a busy host (as corosync's): Linux nice is per thread (needs root).
try { require('node:os').setPriority(KEEPER_NICE); } catch (e) { /* not root: the default priority */ }
let cur = null;
let next = 0;
const post = (ep, path, body) => fetch(ep + path, {
  method: 'POST', body: JSON.stringify(body), signal: AbortSignal.timeout(timeoutMs),
});
async function renew() {
  const c = cur;
  if (!c) return;
  const sent = process.hrtime.bigint();
  for (let i = 0; i < endpoints.length; i++) {
    const ep = endpoints[(next + i) % endpoints.length];
    try {
      const r = await post(ep, '/v3/lease/keepalive', { ID: c.lease });
      const j = await r.json();
      if (!r.ok) continue;
      next = (next + i) % endpoints.length;
      if (Number((j.result && j.result.TTL) || 0) <= 0) { Atomics.store(c.view, 1, 1n); return; }
      // The owner key written again while it is still this claim's: every renewal is a new revision,
      // the evidence a standby's fast claim waits on (witness-gate.ts).
      const t = await post(ep, '/v3/kv/txn', {
        compare: [{ key: c.key, target: 'VALUE', result: 'EQUAL', value: c.value }],
        success: [{ request_put: { key: c.key, value: c.value, lease: c.lease } }],
      });
      const tj = await t.json();
      if (!t.ok) continue;
      if (tj.succeeded !== true) { Atomics.store(c.view, 1, 1n); return; }
      if (sent > Atomics.load(c.view, 0)) Atomics.store(c.view, 0, sent);
      return;
    } catch (e) { /* the next endpoint, or the next round */ }
  }
}
setInterval(renew, everyMs);
parentPort.on('message', (m) => {
  cur = m ? { lease: m.lease, key: m.key, value: m.value, view: new BigInt64Array(m.shared) } : null;
  void renew();
});
`;

export interface Owner {
  host: string;
  generation: number;
}

const ownerKey = (vm: string) => `/rubato/vm/${vm}/owner`;
/** The owner key's value: written byte for byte alike by the claim and by every renewal (which compares it). */
const ownerValue = (host: string, generation: number) => JSON.stringify({ host, generation });
const genKey = (vm: string) => `/rubato/vm/${vm}/generation`;

export async function currentOwner(etcd: EtcdClient, vm: string): Promise<Owner | null> {
  const kv = await etcd.get(ownerKey(vm));
  return kv ? (JSON.parse(kv.value) as Owner) : null;
}

/**
 * The witness's generation of `vm` (0: never claimed): a host that lost the VM compares it with its own before starting
 * QEMU.
 */
export async function currentGeneration(etcd: EtcdClient, vm: string): Promise<number> {
  const kv = await etcd.get(genKey(vm));
  return kv ? Number(kv.value) : 0;
}

/** Why the VM was lost: `stale` when the whole TTL may have passed (another host may hold it now). */
export interface Loss {
  why: string;
  stale: boolean;
}

export class Ownership {
  private lease: string | null = null;
  /** A claim sent whose answer never came (it may have won). */
  private inDoubt: { lease: string; next: number; sentMs: number } | null = null;
  /** The lease a loss left behind (its owner key may still be alive in etcd): revoked once claimed again. */
  private lostLease: string | null = null;
  private keeper: Worker | null = null;
  /** Gives the lease up if this process dies (lease-sentinel.ts). */
  private sentinel: LeaseSentinel | null = null;
  private shared: BigInt64Array | null = null;
  private watchdog: NodeJS.Timeout | null = null;
  private gen = 0;
  private loss: Loss | null = null;
  private listener: ((loss: Loss) => void) | null = null;
  private readonly clock: LeaseClock;

  constructor(
    private readonly etcd: EtcdClient,
    readonly vm: string,
    readonly host: string,
    readonly ttlSec: number,
    private readonly now: () => number = monotonicMs,
  ) {
    this.clock = new LeaseClock(ttlSec * 1000);
  }

  get generation(): number {
    return this.gen;
  }
  /** Held and known valid right now (its last confirmed renewal was sent within the loss budget). */
  get held(): boolean {
    return this.lease !== null && this.loss === null && this.clock.valid(this.now());
  }

  /** Why output may not leave this host now (null: it may): the release gate's check. */
  leaseCheck(nowMs: number): string | null {
    this.readRenewals();
    if (this.loss) return `VM ${this.vm}: ${this.host} lost the witness (${this.loss.why})`;
    if (this.lease === null) return `VM ${this.vm}: ${this.host} does not hold it in the witness`;
    if (!this.clock.valid(nowMs))
      return `VM ${this.vm}: lease not known valid (no confirmed renewal for ${Math.round(this.clock.silentMs(nowMs))} ms)`;
    return null;
  }

  /**
   * Calls `fn` when the VM is lost — at once if it was lost before this was attached (the window
   * between a claim and the guard: disk preparation, a restore). Null detaches.
   */
  watch(fn: ((loss: Loss) => void) | null): void {
    this.listener = fn;
    if (fn && this.loss) fn(this.loss);
  }

  /**
   * Claims the VM: succeeds only if no other host holds it (its lease expired or it released it).
   * Returns the new generation, or null if another host holds it.
   */
  async claim(): Promise<number | null> {
    const r = await this.claimFrom(null);
    return r === 'superseded' ? null : r;
  }

  /**
   * Claims the VM again after a loss, as the copy it held: only if the witness's generation is
   * still this host's (nobody claimed it meanwhile), replacing this host's own owner key even if
   * its old lease is still alive. 'superseded': another copy holds or held it since (this guest is
   * stale and must stop); null: no answer, or a claim raced this one (ask again).
   */
  async reclaim(): Promise<number | 'superseded' | null> {
    if (this.gen === 0) return this.claim();
    return this.claimFrom(this.gen);
  }

  /**
   * Claims the VM from a holder that has stopped: its owner key still at `revision`, which the
   * caller saw unchanged for longer than any holder may act on its last renewal (witness-gate.ts).
   * The transaction is conditioned on that revision: a renewal that landed meanwhile makes it fail.
   */
  async claimOver(revision: number): Promise<number | null> {
    const r = await this.claimFrom(null, revision);
    return r === 'superseded' ? null : r;
  }

  private async claimFrom(expect: number | null, takeOver?: number): Promise<number | 'superseded' | null> {
    const sentMs = this.now(); // the lease runs from no later than this
    this.ensureKeeper(); // (its start-up overlaps the claim's round trips)
    this.sentinel ??= new LeaseSentinel(this.etcd.urls);
    const lease = this.lease ?? (await this.etcd.grantLease(this.ttlSec));
    const [owner, gen] = [await this.etcd.get(ownerKey(this.vm)), await this.etcd.get(genKey(this.vm))];
    const held = owner ? (JSON.parse(owner.value) as Owner) : null;
    const witnessGen = gen ? Number(gen.value) : 0;
    const unused = async <T>(r: T): Promise<T> => {
      if (!this.lease) await this.revokeQuietly(lease);
      return r;
    };
    // A claim whose answer was lost may have won: its key (this host, its lease, its generation) says so.
    const doubt = this.inDoubt;
    this.inDoubt = null;
    if (
      doubt &&
      held?.host === this.host &&
      owner!.lease === doubt.lease &&
      held.generation === witnessGen &&
      witnessGen === doubt.next
    )
      return this.holds(doubt.lease, doubt.next, doubt.sentMs);
    if (expect !== null && (witnessGen !== expect || (held && held.host !== this.host)))
      return unused('superseded' as const);
    // Ours: this lease's key, or (claiming again) the key this host left on its lost lease.
    const mine =
      held?.host === this.host && (owner!.lease === lease || (expect !== null && held.generation === expect));
    if (owner && !mine && owner.modRevision !== takeOver) return unused(null);
    const next = witnessGen + 1;
    this.inDoubt = { lease, next, sentMs };
    const ok = await this.etcd.txn(
      [
        owner ? { key: ownerKey(this.vm), modRevision: owner.modRevision } : { key: ownerKey(this.vm), absent: true },
        gen ? { key: genKey(this.vm), modRevision: gen.modRevision } : { key: genKey(this.vm), absent: true },
      ],
      [
        { put: ownerKey(this.vm), value: ownerValue(this.host, next), lease },
        { put: genKey(this.vm), value: String(next) },
      ],
    );
    this.inDoubt = null; // (a thrown txn leaves it set: the next claim looks)
    if (!ok) return unused(null);
    return this.holds(lease, next, sentMs);
  }

  /** The claim of generation `next` on `lease` (its grant or claim sent at `sentMs`) succeeded. */
  private holds(lease: string, next: number, sentMs: number): number {
    if (this.lease !== lease) this.clock.reset();
    this.lease = lease;
    this.gen = next;
    this.loss = null;
    this.sentinel?.lease(lease);
    // An old lease kept across a claim: its validity still runs from its last confirmed renewal.
    if (this.clock.lastConfirmedSentMs === null) this.clock.confirmed(sentMs);
    this.startRenewing();
    // nothing is attached to it now
    if (this.lostLease && this.lostLease !== lease) void this.revokeQuietly(this.lostLease);
    this.lostLease = null;
    log.info(`VM ${this.vm}: ${this.host} holds it, generation ${next}`);
    return next;
  }

  private async revokeQuietly(lease: string): Promise<void> {
    // A lease nobody uses expires on its own within the TTL: a failed revoke costs nothing.
    await this.etcd.revokeLease(lease).catch((e: unknown) => log.debug(`revoking an unused lease: ${errorMessage(e)}`));
  }

  /**
   * The keeper thread, started once: a main loop busy with a checkpoint or a full sync must not look like a lost
   * witness.
   */
  private ensureKeeper(): Worker {
    if (this.keeper) return this.keeper;
    const ttlMs = this.ttlSec * 1000;
    const keeper = new Worker(KEEPER_SOURCE, {
      eval: true,
      workerData: {
        endpoints: this.etcd.urls,
        everyMs: Math.max(50, ttlMs / RENEWALS_PER_TTL),
        timeoutMs: Math.round(ttlMs * LOSS_FRACTION),
      },
    });
    keeper.unref();
    keeper.on('error', (e) => log.warn(`the lease keeper of ${this.vm} failed: ${e.message}`));
    return (this.keeper = keeper);
  }

  /** Renews the held lease from now on (a first renewal at once), its confirmations read here from shared memory. */
  private startRenewing(): void {
    this.shared = new BigInt64Array(new SharedArrayBuffer(16));
    this.ensureKeeper().postMessage({
      lease: this.lease,
      key: Buffer.from(ownerKey(this.vm)).toString('base64'),
      value: Buffer.from(ownerValue(this.host, this.gen)).toString('base64'),
      shared: this.shared.buffer,
    });
    // The deadline is watched on its own: a renewal that hangs must not delay giving up.
    if (!this.watchdog) {
      this.watchdog = setInterval(() => this.check(), WATCHDOG_MS);
      this.watchdog.unref();
    }
  }

  /** Reads the keeper's renewals and gives the VM up once the lease is not known valid. */
  private check(): void {
    if (!this.lease || this.loss || !this.shared) return;
    if (!this.readRenewals()) {
      this.lose('the lease expired or another host claimed the VM', true);
      return;
    }
    const now = this.now();
    if (this.clock.valid(now)) return;
    const silent = Math.round(this.clock.silentMs(now));
    // Past the whole TTL (this process was stalled: SIGSTOP, a long pause): another host may hold it.
    this.lose(`no renewal for ${silent} ms (TTL ${this.ttlSec} s)`, this.clock.mayHaveExpired(now));
  }

  /** Takes the keeper's latest confirmed renewal into the clock; false once etcd said the lease is gone. */
  private readRenewals(): boolean {
    if (!this.shared) return true;
    if (Atomics.load(this.shared, 1) !== 0n) {
      this.clock.expired();
      return false;
    }
    const sentNs = Atomics.load(this.shared, 0);
    if (sentNs > 0n) this.clock.confirmed(Number(sentNs) / 1e6);
    return true;
  }

  private lose(why: string, stale: boolean): void {
    if (this.loss) return;
    this.loss = { why, stale };
    this.stopRenewing();
    this.lostLease = this.lease;
    this.lease = null; // a later claim needs a new lease
    log.error(`VM ${this.vm}: ${this.host} lost its ownership (${why})`);
    this.listener?.(this.loss);
  }

  private stopRenewing(): void {
    this.keeper?.postMessage(null);
    if (this.watchdog) clearInterval(this.watchdog);
    this.shared = null;
    this.watchdog = null;
  }

  /**
   * The guest's process on this host (its QEMU): if this controller dies, the lease is given up at
   * once only when that process is gone too (lease-sentinel.ts).
   */
  tie(pid: number): void {
    (this.sentinel ??= new LeaseSentinel(this.etcd.urls)).tie(pid);
  }

  /** Gives the VM up in order (the owner key goes at once). */
  async release(): Promise<void> {
    this.sentinel?.close();
    this.sentinel = null;
    this.stopRenewing();
    void this.keeper?.terminate();
    this.keeper = null;
    const leases = [this.lease, this.lostLease].filter((l): l is string => l !== null);
    this.lease = null;
    this.lostLease = null;
    this.loss ??= { why: 'released', stale: false };
    for (const l of leases)
      await this.etcd.revokeLease(l).catch((e: unknown) => log.warn(`releasing ${this.vm}: ${errorMessage(e)}`));
  }
}
