import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { qemuArgs, guestAppend, VmSpecSchema } from '../../src/qemu/spec.ts';
import { diffPages } from '../../src/capture/verify.ts';
import { REPO_ROOT } from '../../src/setup/setup.ts';

test('VM spec gives a deterministic command line with shared RAM', () => {
  const spec = VmSpecSchema.parse({
    name: 'vm1',
    accel: 'tcg',
    cpus: 2,
    memMb: 128,
    ramFile: '/dev/shm/x',
    kernel: 'k',
    initrd: 'i',
    append: guestAppend(['dirtier', 10, 16]),
  });
  const a = qemuArgs(
    spec,
    { qmpSocket: 'q', serialSocket: 's', firmwareDirs: ['/usr/share/qemu'] },
    { paused: true, incoming: true },
  );
  assert.deepEqual(
    a,
    qemuArgs(
      spec,
      { qmpSocket: 'q', serialSocket: 's', firmwareDirs: ['/usr/share/qemu'] },
      { paused: true, incoming: true },
    ),
  );
  assert.ok(a.includes('memory-backend-file,id=mem0,size=128M,mem-path=/dev/shm/x,share=on'));
  assert.ok(a.includes('-S') && a.includes('defer'));
  assert.equal(a[a.indexOf('-smp') + 1], '2');
  assert.match(a[a.indexOf('-append') + 1]!, /rubato\.wl=dirtier,10,16/);
  assert.throws(() => VmSpecSchema.parse({ ...spec, name: 'bad name!' }));
});

test('the replica comparison finds exactly the corrupted page (negative control)', () => {
  const a = Buffer.alloc(64 * 4096, 3);
  const b = Buffer.from(a);
  assert.deepEqual(diffPages(a, b), []);
  b[17 * 4096 + 4095] = 4;
  assert.deepEqual(diffPages(a, b), [17 * 4096]);
});

test('CLI: a config mistake is one clear line and exit 2, never a stack trace', () => {
  for (const args of [
    ['capture-check', '--route', 'c'],
    ['capture-check', '--mem', 'lots'],
    ['bench', 'nosuch'],
    ['simulate', '--policy', 'model'],
    ['simulate', '--trace', '/nonexistent/trace.json'],
    ['bench', 'scheduler', '--workloads', 'kv,nope'],
  ]) {
    const r = spawnSync(join(REPO_ROOT, 'bin', 'rubato'), args, { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    assert.match(r.stderr, /--route|--mem|unknown benchmark|--trace FILE|cannot read trace|--workloads: unknown nope/);
  }
});
