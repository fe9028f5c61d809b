// The standby controller SIGKILLed mid-stream and restarted keeps a usable replica; the primary,
// meanwhile unprotected but running, re-synchronises; a failover afterwards still works. With
// --durability disk the replica files hold every acknowledged checkpoint whatever moment it dies;
// with memory (the default) they may be behind — its memory held the rest (docs/replication.md) —
// but always one whole checkpoint. Then the
// README's main job: `rubato demo --json` end to end on two namespace hosts.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { REPO_ROOT } from '../../src/setup/setup.ts';
import { QemuVm, type QemuBinary } from '../../src/qemu/vm.ts';
import { guestAppend, type Accel } from '../../src/qemu/spec.ts';
import { PrimaryController, type PrimaryEvent } from '../../src/replication/primary.ts';
import { ReplicaStore } from '../../src/replication/replica-store.ts';
import { makeTempDir, removeTempDir } from '../../src/util/tmp.ts';
import { spawnTracked, liveProcesses, type TrackedProcess } from '../../src/util/procs.ts';
import { writeKeyFile, loadKeyFile } from '../../src/replication/keyfile.ts';
import { parseDirtierLine } from '../../src/qemu/spec.ts';

import { testPlatform } from '../helpers/platform.ts';

let accel: Accel;
let binary: QemuBinary;
let guest: { kernel: string; initrd: string };

before(async () => {
  ({ accel, binary, guest } = await testPlatform());
});

function standbyProcess(
  stateDir: string,
  key: string,
  port: number,
  durability: 'memory' | 'disk',
): { proc: TrackedProcess; events: Array<Record<string, unknown>> } {
  const proc = spawnTracked(
    'rubato-standby',
    join(REPO_ROOT, 'bin', 'rubato'),
    [
      'standby',
      '--no-witness',
      '--listen',
      `127.0.0.1:${port}`,
      '--state-dir',
      stateDir,
      '--key',
      key,
      '--heartbeat-ms',
      '50',
      '--timeout-ms',
      '600',
      '--events',
      '--no-fsync',
      '--durability',
      durability,
    ],
    { env: { ...process.env, RUBATO_LOG: 'warn' } },
  );
  const events: Array<Record<string, unknown>> = [];
  let buf = '';
  proc.child.stdout?.on('data', (d: Buffer) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      try {
        events.push(JSON.parse(buf.slice(0, nl)) as Record<string, unknown>);
      } catch {
        /* not an event */
      }
      buf = buf.slice(nl + 1);
    }
  });
  return { proc, events };
}

async function until<T>(f: () => T | undefined | false, ms: number, what: string): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

for (const durability of ['disk', 'memory'] as const)
  test(`standby (--durability ${durability}) killed and restarted mid-stream keeps a usable replica; protection resumes; failover works`, {
    timeout: 300_000,
  }, async () => {
    const dir = makeTempDir('rubato-restart-');
    const key = join(dir, 'psk');
    writeKeyFile(key);
    const port = 20000 + Math.floor(Math.random() * 20000);
    const stateDir = join(dir, 'standby');
    const vm = await QemuVm.start(
      {
        name: 'rs',
        accel,
        cpus: 1,
        memMb: 128,
        kernel: guest.kernel,
        initrd: guest.initrd,
        append: guestAppend(['dirtier', 10, 16]),
      },
      { binary, runDir: dir },
    );
    const pev: PrimaryEvent[] = [];
    const primary = new PrimaryController({
      vm,
      runDir: dir,
      standby: { host: '127.0.0.1', port },
      psk: loadKeyFile(key),
      periodMs: 25,
      heartbeatMs: 50,
      timeoutMs: 600,
      retryMs: 300,
      onEvent: (e) => pev.push(e),
    });
    let sb = standbyProcess(stateDir, key, port, durability);
    try {
      await vm.waitSerial(/RUBATO dirtier t=/, 60_000);
      await until(() => sb.events.find((e) => e['event'] === 'listening'), 60_000, 'standby listening');
      primary.start();
      await until(() => primary.ackedEpoch >= 40, 60_000, 'checkpoints acknowledged');
      sb.proc.kill('SIGKILL'); // mid-stream: checkpoints are flowing every 25 ms
      await sb.proc.exited;
      const ackedAtKill = primary.ackedEpoch;
      await until(() => pev.find((e) => e.event === 'unprotected'), 10_000, 'primary notices');
      let running = false;
      for (let i = 0; i < 100 && !running; i++) {
        running = (await vm.status()) === 'running';
        if (!running) await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(running, true, 'the guest keeps running unprotected');

      // Whatever moment it died, the files open as one whole checkpoint (a merged write-behind batch included).
      const store = await ReplicaStore.open(join(stateDir, 'replica'), { fsync: false });
      if (durability === 'disk')
        assert.ok(
          store.epoch >= ackedAtKill,
          `replica at ${store.epoch} holds every acknowledged checkpoint (${ackedAtKill})`,
        );
      else
        assert.ok(
          store.epoch >= 1,
          `replica at ${store.epoch} (acknowledged ${ackedAtKill}: the rest was in the standby's memory)`,
        );
      const recovered = store.epoch;

      sb = standbyProcess(stateDir, key, port, durability);
      const listening = await until(() => sb.events.find((e) => e['event'] === 'listening'), 60_000, 'standby back');
      assert.ok(Number(listening['replicaEpoch']) >= recovered, 'restarted standby recovered its replica');
      const protectedAgain = pev.filter((e) => e.event === 'protecting').length;
      await until(
        () => pev.filter((e) => e.event === 'protecting').length > 1 && primary.ackedEpoch >= 20,
        90_000,
        're-synchronised',
      );
      assert.ok(protectedAgain >= 1);
      const ackedCounter = primary.ackedCounter;
      await primary.crash();
      const fo = await until(() => sb.events.find((e) => e['event'] === 'failover'), 30_000, 'failover');
      assert.ok(Number(fo['epoch']) >= 20);
      const line = await until(
        () => sb.events.find((e) => e['event'] === 'guest' && /RUBATO dirtier t=/.test(String(e['line']))),
        20_000,
        'restored guest output',
      );
      const m = parseDirtierLine(String(line['line']));
      assert.ok(
        m?.ok && m.work >= ackedCounter,
        `restored guest continues (${m?.work} ≥ ${ackedCounter}) and passes its self-check`,
      );
    } finally {
      await primary.stop().catch(() => {});
      await vm.stop();
      await sb.proc.stop(3000);
      removeTempDir(dir);
    }
  });

test('rubato demo --json: the standby takes over and the guest continues', { timeout: 300_000 }, () => {
  const r = spawnSync(join(REPO_ROOT, 'bin', 'rubato'), ['demo', '--json', '--seconds', '3', '--timeout-ms', '500'], {
    encoding: 'utf8',
    timeout: 280_000,
  });
  const last = r.stdout.trim().split('\n').at(-1) ?? '';
  const j = JSON.parse(last) as Record<string, number | boolean>;
  assert.equal(r.status, 0, r.stderr.slice(-2000));
  assert.equal(j['failover'], true);
  assert.equal(j['selfCheckOk'], true);
  assert.ok(
    Number(j['checkpoints']) >= 2,
    'checkpoints taken (the default model policy stretches quiet epochs to 1 s)',
  );
  assert.ok(Number(j['counterAfter']) >= Number(j['counterBefore']));
  // Fenced by the embedded witness: the standby goes live once the dead primary's lease (TTL 1 s,
  // counted from its last renewal) expired and its claim succeeded (retried every 200 ms), then restores.
  assert.match(String(j['witness']), /^http:\/\/10\.232\./, 'the demo ran with its embedded witness');
  // Generation 2 unless the primary re-claimed its lease once before (a renewal missed under load:
  // it stops its output, claims again, and goes on under generation 2; the standby then gets 3).
  assert.match(String(j['failoverWhy']), /the witness gave standby generation ([2-9]|\d{2,})\b/);
  assert.ok(
    Number(j['failoverMs']) > 0 && Number(j['failoverMs']) <= 1000 + 200 + 300 + 1000,
    `failover ${j['failoverMs']} ms`,
  );
  const ns = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
  assert.doesNotMatch(ns, new RegExp(`rubato-demo-[ps]-${r.pid % 10000}`), 'namespaces removed');
});

after(() => {
  assert.deepEqual(liveProcesses(), [], 'no process left running');
});
