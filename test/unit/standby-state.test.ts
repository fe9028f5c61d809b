import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  STANDBY_TRANSITIONS,
  acceptsPrimary,
  nextStandbyState,
  type StandbyState,
} from '../../src/replication/standby-state.ts';

const ALL: StandbyState[] = ['waiting', 'syncing', 'protecting', 'activating', 'active', 'stopped'];

test('standby: the table is the only way between states; anything else is caught', () => {
  assert.equal(nextStandbyState('waiting', 'base-begin', { hasReplica: false }), 'syncing');
  assert.equal(nextStandbyState('syncing', 'sync-abandoned', { hasReplica: false }), 'waiting');
  assert.equal(nextStandbyState('syncing', 'sync-abandoned', { hasReplica: true }), 'protecting');
  assert.equal(nextStandbyState('protecting', 'failover-begin', { hasReplica: true }), 'activating');
  assert.equal(nextStandbyState('activating', 'failover-failed', { hasReplica: true }), 'protecting');
  assert.throws(() => nextStandbyState('active', 'base-begin', { hasReplica: true }), /invariant/);
  assert.throws(() => nextStandbyState('waiting', 'failover-done', { hasReplica: false }), /invariant/);
  // a replica kept on disk is taken up only at start-up, never over a running session
  assert.equal(nextStandbyState('waiting', 'replica-recovered', { hasReplica: true }), 'protecting');
  assert.throws(() => nextStandbyState('syncing', 'replica-recovered', { hasReplica: true }), /invariant/);
  for (const s of ALL) assert.equal(nextStandbyState(s, 'stop', { hasReplica: true }), 'stopped');
  // a running guest or a failover under way never takes a primary's stream
  assert.deepEqual(ALL.filter(acceptsPrimary), ['waiting', 'syncing', 'protecting']);
  for (const [input, t] of Object.entries(STANDBY_TRANSITIONS)) {
    if (input === 'stop') continue;
    assert.ok(!t.from.includes('active') && !t.from.includes('stopped'), `${input} cannot leave active or stopped`);
  }
});
