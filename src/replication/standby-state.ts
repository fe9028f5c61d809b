// The standby's states and the only transitions between them, as a table. Pure: the controller
// changes its state through `nextStandbyState` alone, and an input a state does not accept is a
// bug (an assertion), never a silent change.
//
//   state        meaning                                         accepts a primary
//   waiting      no replica yet                                  yes
//   syncing      a primary is sending its full image             yes (a new one replaces it)
//   protecting   a replica is held (a primary may be connected)  yes
//   activating   failover under way: restoring the guest         no
//   active       the guest runs here                             no
//   stopped      the controller stopped                          no

import { assert } from '../util/index.ts';

export type StandbyState = 'waiting' | 'syncing' | 'protecting' | 'activating' | 'active' | 'stopped';

export type StandbyInput =
  | 'base-begin' // a primary starts sending its full image
  | 'base-installed' // the full image is the replica now (epoch 0)
  | 'replica-recovered' // at start-up, a replica kept on disk from before (it guards nothing until a primary connects)
  | 'sync-abandoned' // the session ended before the full image was complete
  | 'failover-begin' // the gate allowed a failover (primary lost, or an operator asked)
  | 'failover-done' // the guest runs here
  | 'failover-failed' // the restore failed: the replica is kept, nothing runs
  | 'stop';

type Target = StandbyState | ((c: { hasReplica: boolean }) => StandbyState);

export const STANDBY_TRANSITIONS: Record<StandbyInput, { from: readonly StandbyState[]; to: Target }> = {
  'base-begin': { from: ['waiting', 'syncing', 'protecting'], to: 'syncing' },
  'base-installed': { from: ['syncing'], to: 'protecting' },
  'replica-recovered': { from: ['waiting'], to: 'protecting' },
  'sync-abandoned': { from: ['syncing'], to: (c) => (c.hasReplica ? 'protecting' : 'waiting') },
  'failover-begin': { from: ['protecting', 'syncing'], to: 'activating' },
  'failover-done': { from: ['activating'], to: 'active' },
  'failover-failed': { from: ['activating'], to: 'protecting' },
  stop: { from: ['waiting', 'syncing', 'protecting', 'activating', 'active', 'stopped'], to: 'stopped' },
};

export function nextStandbyState(state: StandbyState, input: StandbyInput, c: { hasReplica: boolean }): StandbyState {
  const t = STANDBY_TRANSITIONS[input];
  assert(t.from.includes(state), `standby: ${input} is not allowed in state ${state}`);
  return typeof t.to === 'function' ? t.to(c) : t.to;
}

/** May a (new) primary connect in this state? */
export const acceptsPrimary = (s: StandbyState): boolean => s === 'waiting' || s === 'syncing' || s === 'protecting';
