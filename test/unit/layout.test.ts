// The direction of imports: cli → harness (bench, chaos, sim) → product core → pure modules.
// The core never imports the harness or the CLI; the pure modules import no I/O.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { REPO_ROOT } from '../../src/setup/index.ts';

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith('.ts') ? [p] : [];
  });
}

const imports = (f: string) =>
  [...readFileSync(f, 'utf8').matchAll(/^import[^'"]*['"]([^'"]+)['"]/gm)].map((m) => m[1]!);

test('layout: the product core imports nothing from the harness or the CLI', () => {
  const core = ['replication', 'capture', 'io', 'qemu', 'scheduler', 'commit', 'util'];
  const bad: string[] = [];
  for (const d of core) {
    for (const f of files(join(REPO_ROOT, 'src', d))) {
      for (const i of imports(f))
        if (/^(\.\.\/)+(sim|bench|chaos|cli)\//.test(i)) bad.push(`${relative(REPO_ROOT, f)} imports ${i}`);
    }
  }
  assert.deepEqual(bad, []);
});

test('layout: the pure modules (pipeline, output commit, scheduler, codecs) touch no sockets, files or clocks', () => {
  const pure = [
    'src/replication/pipeline.ts',
    'src/replication/standby-state.ts',
    'src/replication/admission.ts',
    'src/commit/output-commit.ts',
    'src/replication/protocol/frame.ts',
    'src/replication/protocol/messages.ts',
    'src/replication/protocol/record.ts',
    'src/replication/driver.ts',
    'src/commit/release-gate.ts',
    'src/coord/lease.ts',
    'src/sim/faults.ts',
    ...files(join(REPO_ROOT, 'src', 'scheduler')).map((f) => relative(REPO_ROOT, f)),
  ];
  const bad: string[] = [];
  for (const f of pure) {
    const text = readFileSync(join(REPO_ROOT, f), 'utf8');
    for (const i of imports(join(REPO_ROOT, f)))
      if (/^node:(net|fs|fs\/promises|child_process|timers|dgram|http)$/.test(i)) bad.push(`${f} imports ${i}`);
    if (/\b(Date\.now|performance\.now|setTimeout|setInterval)\s*\(/.test(text))
      bad.push(`${f} reads a clock or sets a timer`);
  }
  assert.deepEqual(bad, []);
});

test('TAP names: at most 15 characters, distinct for tags that share a long prefix', async () => {
  const { tapName } = await import('../../src/io/guest-io.ts');
  assert.equal(tapName('g0'), 'tapg0');
  const a = tapName('webserver-prod-1-active');
  const b = tapName('webserver-prod-2-active');
  assert.ok(a.length <= 15 && b.length <= 15, `${a} ${b}`);
  assert.notEqual(a, b);
  assert.notEqual(tapName('vm1-active'), tapName('vm2-active'));
});

test('layout: no two folders under src/ import each other, directly or around a loop', () => {
  const src = join(REPO_ROOT, 'src');
  const edges = new Map<string, Set<string>>();
  for (const f of files(src)) {
    const from = relative(src, f).split('/')[0]!;
    for (const i of imports(f)) {
      if (!i.startsWith('.')) continue;
      const to = relative(src, join(f, '..', i)).split('/');
      if (to.length < 2 || to[0] === '..' || to[0] === from) continue;
      if (!edges.has(from)) edges.set(from, new Set());
      edges.get(from)!.add(to[0]!);
    }
  }
  const cycles: string[] = [];
  const walk = (n: string, path: string[]) => {
    for (const m of edges.get(n) ?? []) {
      if (m === path[0]) cycles.push([...path, m].join(' -> '));
      else if (!path.includes(m) && m > path[0]!) walk(m, [...path, m]);
    }
  };
  for (const n of edges.keys()) walk(n, [n]);
  assert.deepEqual(cycles, []);
});
