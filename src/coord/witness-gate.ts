// The activation gate backed by the witness: a standby may bring its replica live only once it
// holds the VM in etcd (a claim that advanced the generation). A primary that is only cut off from
// the standby still renews its lease, so the claim fails and the standby stays a standby: never two
// live copies. A primary that died stops renewing: its owner key stays at one revision (every
// renewal writes it again), and once the standby has seen that revision for longer than the holder
// may act on its last renewal (`takeoverWaitMs`), it claims the VM over that revision, without
// waiting for etcd to expire the lease. Without etcd nobody claims, so nobody goes live alone.

import type { ActivationGate } from '../replication/index.ts';
import { errorMessage, logger, monotonicMs, sleep } from '../util/index.ts';
import { Ownership, currentOwner } from './ownership.ts';
import { takeoverWaitMs } from './lease.ts';
import type { EtcdClient } from './etcd.ts';

const log = logger('witness');
/** How often a guarding standby reads its primary's owner key. */
const OBSERVE_EVERY_MS = 100;

export interface WitnessGate extends ActivationGate {
  /** This host's ownership of `vm` (held after an allowed activation). */
  ownership(vm: string): Ownership;
  /** Gives up every VM this host holds (an orderly stop). */
  releaseAll(): Promise<void>;
}

/** The owner key's revision a standby saw, and when it first saw it (monotonic ms, taken when the answer came). */
interface Seen {
  revision: number;
  host: string;
  sinceMs: number;
}

/**
 * Claims the VM for `host`, retrying for up to one lease TTL and a second (the old holder's lease must expire, or its
 * owner key stay unrenewed for the takeover wait).
 */
export function witnessGate(etcd: EtcdClient, host: string, ttlSec: number): WitnessGate {
  const owned = new Map<string, Ownership>();
  const seen = new Map<string, Seen | null>();
  /** VMs whose owner key this host saw held by another host while guarding (so that its absence means a release). */
  const held = new Set<string>();
  const observers = new Map<string, NodeJS.Timeout>();
  const waitMs = takeoverWaitMs(ttlSec * 1000);
  const ownershipOf = (vm: string) => {
    let o = owned.get(vm);
    if (!o) owned.set(vm, (o = new Ownership(etcd, vm, host, ttlSec)));
    return o;
  };
  /** One read of the owner key; a revision counts from when its answer arrived (never before it was applied). */
  const look = async (vm: string) => {
    const kv = await etcd.get(`/rubato/vm/${vm}/owner`);
    const at = monotonicMs();
    if (!kv) return void seen.set(vm, null);
    const prev = seen.get(vm);
    const owner = (JSON.parse(kv.value) as { host: string }).host;
    if (owner !== host && observers.has(vm)) held.add(vm);
    if (prev?.revision === kv.modRevision) return;
    seen.set(vm, { revision: kv.modRevision, host: owner, sinceMs: at });
  };
  const unobserve = (vm: string) => {
    const t = observers.get(vm);
    if (t) clearInterval(t);
    observers.delete(vm);
    seen.delete(vm);
    held.delete(vm);
  };
  return {
    ownership: ownershipOf,
    releaseAll: async () => {
      for (const vm of [...observers.keys()]) unobserve(vm);
      for (const o of owned.values()) await o.release();
    },
    observe: (vm) => {
      if (observers.has(vm)) return;
      let busy = false;
      const t = setInterval(() => {
        if (busy) return;
        busy = true;
        look(vm)
          .catch((e: unknown) => log.debug(`reading the owner of ${vm}: ${errorMessage(e)}`))
          .finally(() => {
            busy = false;
          });
      }, OBSERVE_EVERY_MS);
      t.unref();
      observers.set(vm, t);
    },
    unobserve,
    released: async (vm) => {
      if (!held.has(vm)) return false;
      await look(vm);
      return seen.get(vm) === null;
    },
    mayActivate: async (ctx) => {
      const ownership = ownershipOf(ctx.vm);
      const until = Date.now() + ownership.ttlSec * 1000 + 1000;
      let last = 'no answer from the witness';
      for (;;) {
        if (ctx.stillWanted && !ctx.stillWanted())
          return { allow: false, why: `not activating VM ${ownership.vm}: its primary is back` };
        let retryInMs = 200;
        try {
          let gen = await ownership.claim();
          let how = '';
          if (gen === null) {
            await look(ctx.vm);
            const s = seen.get(ctx.vm);
            const stillMs = s ? monotonicMs() - s.sinceMs : 0;
            if (s && s.host !== host && stillMs >= waitMs) {
              gen = await ownership.claimOver(s.revision);
              how = ` over ${s.host}'s unrenewed claim (revision ${s.revision}, unchanged for ${Math.round(stillMs)} ms)`;
            } else if (s) retryInMs = Math.max(10, Math.min(200, waitMs - stillMs + 1));
          }
          if (gen !== null) {
            unobserve(ctx.vm);
            return {
              allow: true,
              why: `the witness gave ${ownership.host} generation ${gen}${how}`,
              generation: gen,
            };
          }
          const o = await currentOwner(etcd, ownership.vm).catch(() => null);
          last = o ? `${o.host} holds it (generation ${o.generation}): it is alive` : 'another claim won';
        } catch (e) {
          last = `the witness is unreachable (${errorMessage(e)})`;
        }
        if (Date.now() >= until) return { allow: false, why: `not activating VM ${ownership.vm}: ${last}` };
        await sleep(retryInMs);
      }
    },
  };
}
