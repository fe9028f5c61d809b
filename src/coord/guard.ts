// What a host running a guest live does when it loses the witness (ownership.ts: no confirmed
// renewal within 2/3 of the TTL, before the lease can expire and another host claim the VM). One
// rule, used by `rubato protect`, by a standby that took over, by the chaos harness and by the
// fault simulator (`guardDecision` is pure):
//  - stale (the whole TTL may have passed: this process was stalled) or alone (no standby
//    acknowledging its checkpoints): it stops its guest at once — another host may hold the VM;
//  - protected, it runs on — its standby acknowledges, so it is not live, and it cannot claim
//    without etcd either — its output held by the release gate, and claims again every second; if
//    the standby goes away before the witness is back, the guest stops at that moment.
// A loss before the guard is attached (between the claim and QEMU's start, during a restore) is
// heard when it is attached.

import { logger } from '../util/log.ts';
import type { Loss, Ownership } from './ownership.ts';

const log = logger('witness');
export const RECLAIM_EVERY_MS = 1000;

/** What a live host does on losing the witness. */
export function guardDecision(loss: Loss, protectedNow: boolean): 'stop' | 'run-on' {
  return loss.stale || !protectedNow ? 'stop' : 'run-on';
}

export interface GuardedGuest {
  /** Whether a standby acknowledges this guest's checkpoints right now. */
  protected(): boolean;
  /** Stops the guest for good (no goodbye: QEMU killed). */
  stopGuest(why: string): void;
  emit(e: Record<string, unknown>): void;
}

export interface OwnershipGuard {
  /** The guest's controller lost its standby. */
  unprotected(reason: string): void;
  /** Whether the witness is out of reach right now. */
  readonly witnessLost: string | null;
  close(): void;
}

export function guardOwnership(ownership: Ownership, g: GuardedGuest): OwnershipGuard {
  let lost: string | null = null;
  let retry: NodeJS.Timeout | null = null;
  let stopped = false;
  const stop = (why: string) => {
    if (stopped) return;
    stopped = true;
    if (retry) clearInterval(retry);
    g.emit({ event: 'ownership-lost', why });
    log.error(`VM ${ownership.vm}: ${why}; stopping its guest so that no second copy can run`);
    g.stopGuest(why);
  };
  ownership.watch((loss) => {
    if (guardDecision(loss, g.protected()) === 'stop') {
      return stop(loss.stale ? `this host's lease may have expired (${loss.why}): another host may hold the VM`
        : `this host lost the witness (${loss.why}) and has no standby`);
    }
    lost = loss.why;
    g.emit({ event: 'witness-lost', why: loss.why, protected: true });
    log.warn(`VM ${ownership.vm}: the witness is out of reach (${loss.why}); running on while the standby acknowledges, output held, claiming again meanwhile`);
    retry ??= setInterval(() => {
      if (!lost || stopped) return;
      ownership.claim().then((gen) => {
        if (gen === null || !lost) return;
        lost = null;
        if (retry) clearInterval(retry);
        retry = null;
        g.emit({ event: 'owner', host: ownership.host, generation: gen });
        log.info(`VM ${ownership.vm}: the witness is back; ${ownership.host} holds generation ${gen}`);
      }, (e: unknown) => log.debug(`claiming VM ${ownership.vm} again: ${e instanceof Error ? e.message : String(e)}`));
    }, RECLAIM_EVERY_MS);
    retry.unref();
  });
  return {
    unprotected: (reason) => { if (lost) stop(`the standby is gone too (${reason}) while the witness is out of reach (${lost})`); },
    get witnessLost() { return lost; },
    close: () => { stopped = true; if (retry) clearInterval(retry); ownership.watch(null); },
  };
}
