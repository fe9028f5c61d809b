// What a host running a guest live does when it loses the witness (ownership.ts: no confirmed
// renewal within 2/3 of the TTL, before the lease can expire and another host claim the VM). One
// rule, used by `rubato protect`, by a standby that took over, by the chaos harness and by the
// fault simulator (`afterReclaim` is pure):
//  - from the loss on, nothing the guest sends leaves the host: every frame passes the release
//    gate, which reads the lease (commit/release-gate.ts). The guest is fenced, not killed;
//  - the host claims the VM again at once and then every second, as the copy it held
//    (Ownership.reclaim: only while the witness's generation is still its own);
//  - claimed again, output flows again: a slow renewal (a loaded host) costs a moment of held
//    output, never the VM;
//  - superseded (another copy claimed the VM since: the standby took over), the guest is stale:
//    it stops for good.
// A loss before the guard is attached (between the claim and QEMU's start, during a restore) is
// heard when it is attached.

import { logger, errorMessage } from '../util/index.ts';
import type { Ownership } from './ownership.ts';

const log = logger('witness');
export const RECLAIM_EVERY_MS = 1000;

/** The answer to a claim-again: the new generation, 'superseded' (another copy took over), or null (no answer yet). */
export type Reclaim = number | 'superseded' | null;

/** What a fenced host does with the answer to its claim-again. */
export function afterReclaim(r: Reclaim): 'holds' | 'stop' | 'retry' {
  if (r === 'superseded') return 'stop';
  return r === null ? 'retry' : 'holds';
}

export interface GuardedGuest {
  /** Whether a standby acknowledges this guest's checkpoints right now (shown in the events). */
  protected(): boolean;
  /** Stops the guest for good (no goodbye: QEMU killed). */
  stopGuest(why: string): void;
  emit(e: Record<string, unknown>): void;
}

export interface OwnershipGuard {
  /** Why the guest is fenced right now (null: it holds the VM). */
  readonly witnessLost: string | null;
  close(): void;
}

export function guardOwnership(ownership: Ownership, g: GuardedGuest): OwnershipGuard {
  let lost: string | null = null;
  let retry: NodeJS.Timeout | null = null;
  let asking = false;
  let stopped = false;
  const stop = (why: string) => {
    if (stopped) return;
    stopped = true;
    if (retry) clearInterval(retry);
    g.emit({ event: 'ownership-lost', why });
    log.error(`VM ${ownership.vm}: ${why}; stopping its guest so that no second copy can run`);
    g.stopGuest(why);
  };
  const claimAgain = () => {
    if (!lost || stopped || asking) return;
    asking = true;
    ownership.reclaim().then(
      (r) => {
        asking = false;
        if (!lost || stopped) return;
        const d = afterReclaim(r);
        if (d === 'stop')
          return stop(`another copy took VM ${ownership.vm} over while this host was cut from the witness (${lost})`);
        if (d === 'retry') return;
        lost = null;
        if (retry) clearInterval(retry);
        retry = null;
        g.emit({ event: 'owner', host: ownership.host, generation: r });
        log.info(
          `VM ${ownership.vm}: ${ownership.host} holds it again (generation ${String(r)}); its output flows again`,
        );
      },
      (e: unknown) => {
        asking = false;
        log.debug(`claiming VM ${ownership.vm} again: ${errorMessage(e)}`);
      },
    );
  };
  ownership.watch((loss) => {
    if (stopped) return;
    lost = loss.why;
    g.emit({ event: 'witness-lost', why: loss.why, stale: loss.stale, protected: g.protected() });
    log.warn(
      `VM ${ownership.vm}: this host lost the witness (${loss.why}); its output is held and it claims the VM again; its guest stops only if another copy took over`,
    );
    retry ??= setInterval(claimAgain, RECLAIM_EVERY_MS);
    retry.unref();
    claimAgain();
  });
  return {
    get witnessLost() {
      return lost;
    },
    close: () => {
      stopped = true;
      if (retry) clearInterval(retry);
      ownership.watch(null);
    },
  };
}
