// Prometheus metrics from controller events and status; the Grafana dashboard and alerts in
// examples/ only name metrics that exist; the dashboard's samples.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ControllerMetrics } from '../../src/observe/metrics.ts';
import { AgentMetrics } from '../../src/observe/observer.ts';
import { Sampler, describe } from '../../src/observe/samples.ts';
import { REPO_ROOT } from '../../src/setup/setup.ts';

const line = (text: string, re: RegExp) => text.split('\n').find((l) => re.test(l));

test('events and status become Prometheus metrics with conventional names and units', async () => {
  const m = new ControllerMetrics();
  const status: Record<string, unknown> = {
    role: 'primary',
    protected: true,
    heldFrames: 3,
    heldBytes: 4500,
    oldestHeldMs: 12,
    ackedEpoch: 41,
    epoch: 42,
    lagMs: 20,
    rttMs: 0.5,
    output: { released: 120, passedThrough: 7, releasedUnprotected: 2, dropped: 0 },
    outputBlockedNoLease: 4,
  };
  const src = m.addSource({ vm: 'web1', role: 'primary' }, () => status);
  for (let i = 1; i <= 5; i++)
    src.observe({ event: 'checkpoint', epoch: i, pages: 100 * i, bytes: 409_600 * i, pauseMs: 1.5, captureMs: 1 });
  src.observe({ event: 'acked', epoch: 1, lagMs: 3 });
  src.observe({ event: 'decisions', reasons: { 'model-optimum': 4, 'model-wait': 10 } });
  src.observe({ event: 'decisions', reasons: { 'model-optimum': 6, 'model-wait': 10 } });
  const t = await m.text();
  assert.match(t, /^rubato_checkpoint_pause_seconds_count\{vm="web1",role="primary"\} 5$/m);
  assert.match(t, /^rubato_checkpoint_pause_seconds_bucket\{le="0\.002",vm="web1",role="primary"\} 5$/m);
  assert.match(t, /^rubato_checkpoint_pause_seconds_bucket\{le="0\.001",vm="web1",role="primary"\} 0$/m);
  assert.match(t, /^rubato_checkpoints_total\{vm="web1",role="primary"\} 5$/m);
  assert.match(t, /^rubato_checkpoint_shipped_bytes_total\{vm="web1",role="primary"\} 6144000$/m);
  assert.match(t, /^rubato_scheduler_decisions_total\{vm="web1",role="primary",reason="model-optimum"\} 6$/m);
  assert.match(t, /^rubato_output_held_frames\{vm="web1",role="primary"\} 3$/m);
  assert.match(t, /^rubato_output_oldest_held_seconds\{vm="web1",role="primary"\} 0\.012$/m);
  assert.match(t, /^rubato_protected\{vm="web1",role="primary"\} 1$/m);
  assert.match(t, /^rubato_link_rtt_seconds\{vm="web1",role="primary"\} 0\.0005$/m);
  assert.match(t, /^rubato_output_frames_total\{vm="web1",role="primary",way="released"\} 120$/m);
  assert.match(t, /^rubato_output_frames_total\{vm="web1",role="primary",way="passed-through"\} 7$/m);
  assert.match(t, /^rubato_output_frames_total\{vm="web1",role="primary",way="released-unprotected"\} 2$/m);
  assert.match(t, /^rubato_output_frames_total\{vm="web1",role="primary",way="blocked-no-lease"\} 4$/m);
  assert.match(t, /^process_resident_memory_bytes \d+/m);
  // Protection lost: 0 with its reason; regained: the reason goes.
  status['protected'] = false;
  src.observe({ event: 'unprotected', reason: 'link to standby 10.0.0.2:7000 closed' });
  let u = await m.text();
  assert.match(u, /^rubato_protected\{vm="web1",role="primary"\} 0$/m);
  assert.match(
    u,
    /^rubato_unprotected_reason\{vm="web1",role="primary",reason="link to standby 10\.0\.0\.2:7000 closed"\} 1$/m,
  );
  src.observe({ event: 'protecting', standby: 'x' });
  u = await m.text();
  assert.equal(line(u, /^rubato_unprotected_reason\{/), undefined);
});

test('the agent labels each VM process it runs, fed by the events they print', async () => {
  const a = new AgentMetrics('h1');
  a.event({ event: 'checkpoint', vm: 'db', role: 'primary', pauseMs: 2, pages: 10, bytes: 40960 });
  a.event({ event: 'status', vm: 'db', role: 'primary', heldFrames: 7, epoch: 9, ackedEpoch: 8 });
  a.event({ event: 'committed', vm: 'web', role: 'standby', epoch: 12, bytes: 1000, pages: 1 });
  a.event({ event: 'spawned', vm: 'web', role: 'standby' }); // no metric, no harm
  a.event({ event: 'leader' });
  const t = await a.metrics.text();
  assert.match(t, /^rubato_checkpoints_total\{vm="db",role="primary",host="h1"\} 1$/m);
  assert.match(t, /^rubato_output_held_frames\{vm="db",role="primary",host="h1"\} 7$/m);
  assert.match(t, /^rubato_replica_commits_total\{vm="web",role="standby",host="h1"\} 1$/m);
  assert.match(t, /^rubato_replica_epoch\{vm="web",role="standby",host="h1"\} 12$/m);
});

test('examples/: the Grafana dashboard and the alert rules name only metrics Rubato exports', async () => {
  const m = new ControllerMetrics();
  const src = m.addSource({ vm: 'v', role: 'primary' }, () => ({ role: 'primary', protected: true }));
  src.observe({ event: 'checkpoint', pauseMs: 1, pages: 1, bytes: 1 });
  src.observe({ event: 'unprotected', reason: 'r' });
  const exported = new Set(
    (await m.text())
      .split('\n')
      .filter((l) => l.startsWith('# TYPE '))
      .map((l) => l.split(' ')[2]!),
  );
  for (const f of ['grafana-dashboard.json', 'rubato-alerts.yml']) {
    const text = readFileSync(join(REPO_ROOT, 'examples', f), 'utf8');
    const names = [
      ...new Set(
        [...text.matchAll(/\b(rubato_[a-z_]+|process_[a-z_]+)/g)].map((x) => x[1]!.replace(/_(bucket|sum|count)$/, '')),
      ),
    ];
    assert.ok(names.length >= 3, f);
    for (const n of names) assert.ok(exported.has(n), `${f} names ${n}, which is not exported`);
  }
  const dash = JSON.parse(readFileSync(join(REPO_ROOT, 'examples', 'grafana-dashboard.json'), 'utf8')) as {
    panels: Array<{ id: number; gridPos: object }>;
  };
  assert.equal(new Set(dash.panels.map((p) => p.id)).size, dash.panels.length, 'panel ids unique');
});

test("dashboard samples: rates from the epochs, a standby's view, events described for people", () => {
  const s = new Sampler();
  s.sample(1000, { role: 'primary', protected: true, epoch: 10, pauseMsP50: 1.5 });
  const b = s.sample(3000, { role: 'primary', protected: true, epoch: 50, pauseMsP50: 1.6, heldFrames: 2 });
  assert.equal(b.ckptPerSec, 20);
  assert.equal(b.protected, 1);
  const g = s.sample(4000, { role: 'primary', protected: false, epoch: 3 }); // a new generation: no rate
  assert.equal(g.ckptPerSec, null);
  const sb = new Sampler().sample(0, { role: 'standby', replicaEpoch: 4, primary: '10.0.0.1:5' });
  assert.equal(sb.protected, 1);
  assert.equal(sb.epoch, 4);
  assert.match(
    describe({ event: 'failover', epoch: 7, restoreMs: 40, why: 'primary silent' }),
    /failover: the guest runs here from checkpoint 7 \(restore 40 ms; primary silent\)/,
  );
  s.event(5000, { event: 'failover', epoch: 7, restoreMs: 40, why: 'x' });
  assert.equal(s.history().events.length, 1);
  assert.equal(s.history().samples.length, 3);
});
