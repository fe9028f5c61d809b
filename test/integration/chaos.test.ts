// Output commit end to end (Jepsen-style): a KV service in the guest, a client in its own
// namespace, the primary host killed at random moments ≥ 10 times. No acknowledged write may be
// lost; every kill must lead to a failover. A longer soak: scripts/soak-chaos.sh.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { runChaos } from '../../src/chaos/chaos.ts';
import { liveProcesses } from '../../src/util/procs.ts';
import { liveTempDirs } from '../../src/util/tmp.ts';
import { liveNamespaces } from '../../src/io/net/netns.ts';

test('chaos: 10 primary kills, no acknowledged write lost, connections carry on', { timeout: 900_000 }, async () => {
  const r = await runChaos({ rounds: Number(process.env['RUBATO_CHAOS_KILLS'] ?? 10), faults: ['kill'], seconds: 3, policy: 'model', timeoutMs: 500, conns: 4, accel: (process.env['RUBATO_TEST_ACCEL'] as 'auto' | undefined) ?? 'auto' });
  process.stderr.write(`chaos: ${JSON.stringify({ ...r, lostKeys: r.lostKeys.length })}\n`);
  assert.equal(r.error, undefined);
  assert.equal(r.failovers, r.kills);
  assert.ok(r.kills >= 10 || process.env['RUBATO_CHAOS_KILLS'] !== undefined);
  assert.ok(r.acknowledged > 100, `acknowledged ${r.acknowledged}`);
  assert.equal(r.lost, 0, `lost writes: ${r.lostKeys.slice(0, 5).join(', ')}`);
  assert.ok(r.connectionsTotal > 0 && r.connectionsSurvived > 0, `connections ${r.connectionsSurvived}/${r.connectionsTotal}`);
});

after(() => {
  assert.deepEqual(liveProcesses(), [], 'no process left running');
  assert.deepEqual(liveTempDirs(), [], 'no temp folder left behind');
  assert.deepEqual(liveNamespaces(), [], 'no namespace left behind');
});
