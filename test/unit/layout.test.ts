// The direction of imports: cli → harness (bench, chaos, sim) → product core → pure modules.
// The core never imports the harness or the CLI; the pure modules import no I/O.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { REPO_ROOT } from '../../src/setup/setup.ts';

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

/** Every relative import and re-export of each file under src/, resolved to a path relative to src/. */
function importGraph(): Map<string, string[]> {
  const src = join(REPO_ROOT, 'src');
  const g = new Map<string, string[]>();
  for (const f of files(src)) {
    const text = readFileSync(f, 'utf8');
    const specs = [
      ...text.matchAll(/^(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]/gm),
      ...text.matchAll(/^import\s*['"]([^'"]+)['"]/gm),
    ].map((m) => m[1]!);
    g.set(
      relative(src, f),
      specs.filter((i) => i.startsWith('.')).map((i) => relative(src, join(f, '..', i))),
    );
  }
  return g;
}

const folderOf = (f: string) => (f.includes('/') ? f.split('/')[0]! : '');

/**
 * What the layout forbids, as findings (empty: none). Pure, so that a scratch graph shows each
 * rule firing (below).
 */
function layoutFindings(g: Map<string, string[]>): string[] {
  const out: string[] = [];
  const folders = new Set([...g.keys()].map(folderOf).filter((d) => d && d !== 'cli'));
  for (const d of folders) if (!g.has(`${d}/index.ts`)) out.push(`${d}/ has no front door (index.ts)`);
  // Deep imports: another folder is entered only through its index.ts.
  for (const [f, deps] of g) {
    for (const t of deps) {
      const [from, to] = [folderOf(f), folderOf(t)];
      if (to && from !== to && t !== `${to}/index.ts`) out.push(`${f} imports ${t}: use ${to}/index.ts`);
    }
  }
  // Cycles of files, and of folders.
  const cycles = (edges: Map<string, Set<string>>, what: string) => {
    const state = new Map<string, 'open' | 'done'>();
    const visit = (n: string, path: string[]) => {
      state.set(n, 'open');
      for (const m of edges.get(n) ?? []) {
        if (state.get(m) === 'open') out.push(`${what} cycle: ${[...path.slice(path.indexOf(m)), m].join(' -> ')}`);
        else if (!state.has(m)) visit(m, [...path, m]);
      }
      state.set(n, 'done');
    };
    for (const n of [...edges.keys()].sort()) if (!state.has(n)) visit(n, [n]);
  };
  cycles(new Map([...g].map(([f, deps]) => [f, new Set(deps)])), 'file');
  const byFolder = new Map<string, Set<string>>();
  for (const [f, deps] of g) {
    for (const t of deps) {
      const [from, to] = [folderOf(f), folderOf(t)];
      if (!from || !to || from === to) continue;
      if (!byFolder.has(from)) byFolder.set(from, new Set());
      byFolder.get(from)!.add(to);
    }
  }
  cycles(byFolder, 'folder');
  // The data path never reaches setup/ (which may run apt-get and a compiler).
  const reach = (from: string, seen = new Set<string>()): Set<string> => {
    for (const m of byFolder.get(from) ?? []) if (!seen.has(m)) reach(m, seen.add(m));
    return seen;
  };
  for (const d of ['io', 'capture', 'replication', 'commit']) {
    if (reach(d).has('setup')) out.push(`${d}/ reaches setup/`);
  }
  return out;
}

test('layout: a front door per folder, no deep import, no cycle of files or folders, no path from the data path to setup/', () => {
  assert.deepEqual(layoutFindings(importGraph()), []);
});

test('layout: each rule fires on a scratch graph that breaks it', () => {
  const ok: Array<[string, string[]]> = [
    ['util/index.ts', ['util/log.ts']],
    ['util/log.ts', []],
    ['io/index.ts', ['io/relay.ts']],
    ['io/relay.ts', ['util/index.ts']],
    ['setup/index.ts', []],
  ];
  assert.deepEqual(layoutFindings(new Map(ok)), []);
  const broken = (extra: Array<[string, string[]]>) => layoutFindings(new Map([...ok, ...extra]));
  assert.match(broken([['io/tap.ts', ['util/log.ts']]]).join(), /io\/tap.ts imports util\/log.ts: use util\/index.ts/);
  assert.match(broken([['qemu/vm.ts', []]]).join(), /qemu\/ has no front door/);
  assert.match(
    broken([
      ['util/a.ts', ['util/b.ts']],
      ['util/b.ts', ['util/a.ts']],
    ]).join(),
    /file cycle: util\/a.ts -> util\/b.ts -> util\/a.ts/,
  );
  assert.match(broken([['util/x.ts', ['io/index.ts']]]).join(), /folder cycle: (io -> util -> io|util -> io -> util)/);
  assert.match(broken([['io/tap.ts', ['setup/index.ts']]]).join(), /io\/ reaches setup\//);
});
