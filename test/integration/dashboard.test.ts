// The operator's view of a running pair, as an operator would use it: `curl /metrics` on both
// controllers (Prometheus text with a pause histogram that has observations), `rubato status
// --json`, and the live dashboard loaded in a real browser — Debian's headless Chromium driven by
// playwright-core — whose charts update and which shows the failover when the primary host dies.
// Screenshots go to test-artifacts/.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { chromium, type Browser } from 'playwright-core';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { runCommand, type TrackedProcess } from '../../src/util/procs.ts';
import { waitFor } from '../../src/util/async.ts';
import { ensureBrowser, REPO_ROOT } from '../../src/setup/setup.ts';
import { testPlatform } from '../helpers/platform.ts';
import { RUBATO_BIN, rubatoProcess, writeTestVm, type Ev } from '../helpers/rubato.ts';

const env = { ...process.env, RUBATO_LOG: 'warn' };
const ARTIFACTS = join(REPO_ROOT, 'test-artifacts');

/** A metric's value from Prometheus text (the first series matching the name and label filter). */
function metric(text: string, name: string, labels = ''): number | null {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (labels && !line.includes(labels)) continue;
    return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return null;
}

test('metrics, status and the live dashboard of a pair; the dashboard shows the failover', {
  timeout: 420_000,
}, async () => {
  const { guest } = await testPlatform();
  const executablePath = await ensureBrowser();
  const dir = makeTempDir('rubato-dash-');
  const { key, vmFile } = writeTestVm(dir, 'dash1', guest);
  const port = 20000 + Math.floor(Math.random() * 20000);
  const link = ['--heartbeat-ms', '50', '--timeout-ms', '800'];
  const observe = ['--metrics', '127.0.0.1:0', '--http', '127.0.0.1:0'];
  const procs: TrackedProcess[] = [];
  let browser: Browser | null = null;
  try {
    const b = rubatoProcess('standby-dash', [
      'standby',
      '--stop-timeout',
      '2',
      '--no-witness',
      '--listen',
      `127.0.0.1:${port}`,
      '--key',
      key,
      '--state-dir',
      join(dir, 'b'),
      '--no-fsync',
      '--events',
      ...observe,
      ...link,
    ]);
    procs.push(b.proc);
    const bUrls = await waitFor(
      () => b.events.find((e) => e['event'] === 'observe'),
      30_000,
      "the standby's endpoints",
    );
    const a = rubatoProcess('protect-dash', [
      'protect',
      '--stop-timeout',
      '2',
      vmFile,
      '--no-witness',
      '--standby',
      `127.0.0.1:${port}`,
      '--key',
      key,
      '--state-dir',
      join(dir, 'a'),
      '--events',
      '--policy',
      'fixed:50',
      ...observe,
      ...link,
    ]);
    procs.push(a.proc);
    const aUrls = await waitFor(
      () => a.events.find((e) => e['event'] === 'observe'),
      60_000,
      "the primary's endpoints",
    );
    const started = await waitFor(() => a.events.find((e) => e['event'] === 'started'), 120_000, 'the VM started');
    await waitFor(
      () => a.events.find((e) => e['event'] === 'acked' && Number(e['epoch']) >= 10),
      120_000,
      'protected, ten checkpoints acknowledged',
    );
    await waitFor(() => a.events.find((e) => e['event'] === 'decisions'), 30_000, "the scheduler's decisions reported");

    // Prometheus text on both sides (curl, as an operator would scrape it).
    const curl = async (url: unknown) => {
      const r = await runCommand('curl', ['-sf', String(url)]);
      assert.equal(r.code, 0, `curl ${String(url)}: ${r.stderr}`);
      return r.stdout;
    };
    const pm = await curl(aUrls['metrics']);
    assert.ok((metric(pm, 'rubato_checkpoint_pause_seconds_count') ?? 0) >= 10, 'the pause histogram has observations');
    assert.match(pm, /^rubato_checkpoint_pause_seconds_bucket\{le="0\.004",vm="dash1",role="primary"\} \d+$/m);
    assert.equal(metric(pm, 'rubato_protected'), 1);
    assert.ok((metric(pm, 'rubato_checkpoints_total') ?? 0) >= 10);
    assert.ok((metric(pm, 'rubato_checkpoint_shipped_bytes_total') ?? 0) > 0);
    assert.ok((metric(pm, 'rubato_checkpoint_ack_seconds_count') ?? 0) >= 5);
    assert.ok((metric(pm, 'process_resident_memory_bytes') ?? 0) > 10e6);
    assert.notEqual(metric(pm, 'rubato_output_held_frames'), null);
    assert.notEqual(metric(pm, 'rubato_replica_lag_seconds'), null);
    assert.ok((metric(pm, 'rubato_link_rtt_seconds') ?? 0) > 0, "the link's round trip");
    assert.match(
      pm,
      /^rubato_scheduler_decisions_total\{[^}]*reason="[a-z-]+"[^}]*\} [1-9]\d*$/m,
      'decisions counted by reason',
    );
    const sm = await curl(bUrls['metrics']);
    assert.ok((metric(sm, 'rubato_replica_commits_total') ?? 0) >= 10, 'the standby counts its commits');
    assert.equal(metric(sm, 'rubato_protected'), 1, 'the standby guards a live primary');
    assert.ok((metric(sm, 'rubato_replica_epoch') ?? 0) >= 10);
    const st = await runCommand(RUBATO_BIN, ['status', '--state-dir', join(dir, 'a'), '--json'], { env });
    assert.equal((JSON.parse(st.stdout) as Ev)['protected'], true);

    // The dashboards in Chromium.
    browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--disable-gpu'] });
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(String(aUrls['dashboard']));
    await page.waitForFunction(
      () => ((window as unknown as { __rubato?: { samples: unknown[] } }).__rubato?.samples.length ?? 0) >= 2,
      undefined,
      { timeout: 30_000 },
    );
    const r0 = await page.evaluate(
      () => (window as unknown as { __rubato: { redraws: number; samples: unknown[] } }).__rubato.redraws,
    );
    await page.waitForFunction(
      (n) => (window as unknown as { __rubato: { redraws: number } }).__rubato.redraws >= n + 3,
      r0,
      { timeout: 30_000 },
    );
    assert.equal(await page.locator('canvas').count(), 4, 'four charts');
    assert.equal(await page.locator('#state').textContent(), 'PROTECTED');
    assert.match(String(await page.locator('#title').textContent()), /VM dash1/);
    const last = await page.evaluate(() => {
      const s = (window as unknown as { __rubato: { samples: Array<Record<string, unknown>> } }).__rubato.samples;
      return s[s.length - 1]!;
    });
    assert.ok(Number(last['ckptPerSec']) > 0, 'checkpoints per second plotted');
    assert.ok(Number(last['pauseMs']) > 0, 'pause plotted');
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, 'dashboard-primary.png'), fullPage: true });

    const sb = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    sb.on('pageerror', (e) => errors.push(e.message));
    await sb.goto(String(bUrls['dashboard']));
    await sb.waitForFunction(
      () => ((window as unknown as { __rubato?: { samples: unknown[] } }).__rubato?.samples.length ?? 0) >= 1,
      undefined,
      { timeout: 30_000 },
    );
    assert.equal(await sb.locator('#state').textContent(), 'GUARDING A REPLICA');

    // The primary host dies: its controller and QEMU killed by PID.
    process.kill(Number(started['controllerPid']), 'SIGKILL');
    process.kill(Number(started['qemuPid']), 'SIGKILL');
    await sb.waitForFunction(
      () =>
        (window as unknown as { __rubato: { events: Array<{ event: string }> } }).__rubato.events.some(
          (e) => e.event === 'failover',
        ),
      undefined,
      { timeout: 60_000 },
    );
    assert.match(
      String(await sb.locator('#event-list').textContent()),
      /failover: the guest runs here from checkpoint \d+/,
    );
    await sb.waitForFunction(() => document.querySelector('#role')?.textContent?.startsWith('primary'), undefined, {
      timeout: 30_000,
    });
    await sb.screenshot({ path: join(ARTIFACTS, 'dashboard-failover.png'), fullPage: true });
    const after = await curl(bUrls['metrics']);
    assert.equal(metric(after, 'rubato_failovers_total'), 1);
    assert.deepEqual(errors, [], 'no script errors on the pages');
  } finally {
    await browser?.close();
    for (const p of procs.reverse()) await p.stop(5000);
    removeTempDir(dir);
  }
});
