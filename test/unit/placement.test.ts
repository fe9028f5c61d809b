// The leader's placement: pure, so every rule is checked on its own.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { place, type PlacementInput } from '../../src/coord/placement.ts';

const input = (o: Omit<Partial<PlacementInput>, 'vms'> & { vms: string[] }): PlacementInput => ({
  live: ['h1', 'h2', 'h3'],
  draining: new Set(),
  placements: new Map(),
  owners: new Map(),
  generations: new Map(),
  ...o,
  vms: new Map(o.vms.map((v) => [v, { home: null }])),
});

test('placement: new VMs spread their primaries and standbys; no host is standby for all', () => {
  const plan = place(input({ vms: ['a', 'b', 'c'] }));
  const ps = [...plan.placements.values()];
  assert.deepEqual(new Set(ps.map((p) => p.primary)).size, 3, 'one primary per host');
  assert.equal(new Set(ps.map((p) => p.standby)).size, 3, 'standbys spread too');
  for (const p of ps) assert.notEqual(p.primary, p.standby);
  assert.deepEqual(plan.changed, ['a', 'b', 'c']);
  // Stable: placing again changes nothing.
  const again = place(input({ vms: ['a', 'b', 'c'], placements: plan.placements }));
  assert.deepEqual(again.changed, []);
});

test('placement: a kept standby counts before a new primary is chosen', () => {
  const plan = place(input({ vms: ['a', 'b'], placements: new Map([['a', { primary: 'h1', standby: 'h2' }]]) }));
  assert.equal(plan.placements.get('b')!.primary, 'h3');
});

test('placement: the witness owner is the primary (a failover moved it); the standby is re-placed off it', () => {
  const placements = new Map([['a', { primary: 'h1', standby: 'h2' }]]);
  const plan = place(
    input({
      vms: ['a'],
      live: ['h2', 'h3'],
      placements,
      owners: new Map([['a', { host: 'h2' }]]),
      generations: new Map([['a', 2]]),
    }),
  );
  assert.deepEqual(plan.placements.get('a'), { primary: 'h2', standby: 'h3' });
});

test('placement: a VM that ran and has no owner keeps its primary (its standby is claiming it); one that never ran is placed again', () => {
  const placements = new Map([
    ['a', { primary: 'h1', standby: 'h2' }],
    ['b', { primary: 'h1', standby: 'h2' }],
  ]);
  const plan = place(input({ vms: ['a', 'b'], live: ['h2', 'h3'], placements, generations: new Map([['a', 1]]) }));
  assert.deepEqual(plan.placements.get('a'), { primary: 'h1', standby: 'h2' }, 'ran: only the witness moves it');
  assert.notEqual(plan.placements.get('b')!.primary, 'h1', 'never ran: placed on a live host');
});

test('placement: draining hosts get no standbys; a lone host gets none; removed VMs are dropped', () => {
  const placements = new Map([
    ['a', { primary: 'h1', standby: 'h2' }],
    ['gone', { primary: 'h1', standby: 'h3' }],
  ]);
  const plan = place(input({ vms: ['a'], placements, draining: new Set(['h2']) }));
  assert.deepEqual(plan.placements.get('a'), { primary: 'h1', standby: 'h3' });
  assert.deepEqual(plan.removed, ['gone']);
  const alone = place(input({ vms: ['a'], live: ['h1'] }));
  assert.deepEqual(alone.placements.get('a'), { primary: 'h1', standby: null });
  const none = place(input({ vms: ['a'], live: [] }));
  assert.equal(none.placements.size, 0);
});

test('placement: a VM with a home starts there', () => {
  const i = input({ vms: ['a'] });
  (i.vms as Map<string, { home: string | null }>).set('a', { home: 'h3' });
  assert.equal(place(i).placements.get('a')!.primary, 'h3');
});
