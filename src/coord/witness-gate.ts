// The activation gate backed by the witness: a standby may bring its replica live only once it
// holds the VM in etcd (a claim that advanced the generation). A primary that is only cut off from
// the standby still renews its lease, so the claim fails and the standby stays a standby: never two
// live copies. A primary that died stops renewing; its lease expires within the TTL and the claim
// succeeds. Without etcd nobody claims, so nobody goes live alone.

import type { ActivationGate } from '../replication/index.ts';
import { errorMessage, sleep } from '../util/index.ts';
import { Ownership, currentOwner } from './ownership.ts';
import type { EtcdClient } from './etcd.ts';

export interface WitnessGate extends ActivationGate {
  /** This host's ownership of `vm` (held after an allowed activation). */
  ownership(vm: string): Ownership;
  /** Gives up every VM this host holds (an orderly stop). */
  releaseAll(): Promise<void>;
}

/**
 * Claims the VM for `host`, retrying for up to one lease TTL and a second (the old holder's lease must expire first).
 */
export function witnessGate(etcd: EtcdClient, host: string, ttlSec: number): WitnessGate {
  const owned = new Map<string, Ownership>();
  const ownershipOf = (vm: string) => {
    let o = owned.get(vm);
    if (!o) owned.set(vm, (o = new Ownership(etcd, vm, host, ttlSec)));
    return o;
  };
  return {
    ownership: ownershipOf,
    releaseAll: async () => {
      for (const o of owned.values()) await o.release();
    },
    mayActivate: async (ctx) => {
      const ownership = ownershipOf(ctx.vm);
      const until = Date.now() + ownership.ttlSec * 1000 + 1000;
      let last = 'no answer from the witness';
      for (;;) {
        if (ctx.stillWanted && !ctx.stillWanted())
          return { allow: false, why: `not activating VM ${ownership.vm}: its primary is back` };
        try {
          const gen = await ownership.claim();
          if (gen !== null)
            return { allow: true, why: `the witness gave ${ownership.host} generation ${gen}`, generation: gen };
          const o = await currentOwner(etcd, ownership.vm).catch(() => null);
          last = o ? `${o.host} holds it (generation ${o.generation}): it is alive` : 'another claim won';
        } catch (e) {
          last = `the witness is unreachable (${errorMessage(e)})`;
        }
        if (Date.now() >= until) return { allow: false, why: `not activating VM ${ownership.vm}: ${last}` };
        await sleep(200);
      }
    },
  };
}
