// The Jepsen-style client for PostgreSQL, run inside the client namespace: each connection is a
// stock `psql` session inserting rows with unique ids, one statement at a time (autocommit: the
// "INSERT 0 1" psql prints is the database's acknowledgement of the commit). Same contract as
// kv-client.ts: one JSON line per acknowledged write and per connection event; `--verify FILE`
// reads every acknowledged row back with one SELECT and reports any missing or wrong.

import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';

const args = new Map<string, string>();
for (let i = 2; i < process.argv.length; i += 2)
  args.set(process.argv[i]!.replace(/^--/, ''), process.argv[i + 1] ?? '');
const host = (args.get('target') ?? '127.0.0.1:5432').split(':')[0]!;
const out = (o: object) => process.stdout.write(`${JSON.stringify({ t: Date.now(), ...o })}\n`);
const PSQL = ['-h', host, '-U', 'postgres', '-X', '-q', '-v', 'ON_ERROR_STOP=1', 'postgres'];

/** One psql session fed statements on stdin; each completed statement prints a marker line. */
class Session {
  readonly p: ChildProcess;
  private buf = '';
  private waiting: ((line: string | null) => void) | null = null;
  dead = false;
  constructor(readonly id: number) {
    this.p = spawn('psql', [...PSQL, '-A', '-t'], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.p.stdout!.setEncoding('utf8');
    this.p.stdout!.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const l = this.buf.slice(0, nl);
        this.buf = this.buf.slice(nl + 1);
        const w = this.waiting;
        this.waiting = null;
        w?.(l);
      }
    });
    this.p.stderr!.on('data', () => {
      /* errors end the session: ON_ERROR_STOP */
    });
    this.p.stdin!.on('error', () => {});
    this.p.on('exit', () => {
      this.dead = true;
      const w = this.waiting;
      this.waiting = null;
      w?.(null);
    });
  }
  /** Runs one statement; resolves with the marker line, or null if the session died. */
  run(sql: string, marker: string, timeoutMs: number): Promise<string | null> {
    if (this.dead) return Promise.resolve(null);
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.waiting = null;
        this.p.kill('SIGKILL');
        resolve(null);
      }, timeoutMs);
      this.waiting = (l) => {
        clearTimeout(t);
        resolve(l);
      };
      this.p.stdin!.write(`${sql}\nSELECT '${marker}';\n`);
    });
  }
  end(): void {
    this.p.stdin!.end();
    this.p.kill('SIGTERM');
  }
}

async function psqlOnce(sql: string): Promise<{ code: number; stdout: string }> {
  return new Promise((resolve) => {
    const p = spawn('psql', [...PSQL, '-A', '-t', '-c', sql], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    p.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
    });
    p.on('exit', (code) => resolve({ code: code ?? 1, stdout }));
  });
}

async function load(): Promise<void> {
  const conns = Number(args.get('conns') ?? 4);
  const until = Date.now() + Number(args.get('seconds') ?? 30) * 1000;
  const timeoutMs = Number(args.get('timeout-ms') ?? 20000);
  let stop = false;
  process.once('SIGTERM', () => {
    stop = true;
  });
  for (
    let i = 0;
    i < 50 && (await psqlOnce('CREATE TABLE IF NOT EXISTS chaos (id text PRIMARY KEY, v text NOT NULL)')).code !== 0;
    i++
  )
    await new Promise((r) => setTimeout(r, 200));
  let nextConn = 0;
  const worker = async (w: number) => {
    let seq = 0;
    while (!stop && Date.now() < until) {
      const s = new Session(nextConn++);
      out({ type: 'conn', id: s.id, event: 'open' });
      while (!stop && Date.now() < until) {
        const key = `w${w}c${s.id}s${seq++}`;
        const value = `v${Math.floor(Math.random() * 1e9)}`;
        const t0 = performance.now();
        const done = await s.run(`INSERT INTO chaos VALUES ('${key}', '${value}');`, `ok ${key}`, timeoutMs);
        if (done === `ok ${key}`)
          out({ type: 'ack', key, value, conn: s.id, latMs: Math.round((performance.now() - t0) * 100) / 100 });
        else {
          out({
            type: 'conn',
            id: s.id,
            event: 'broken',
            error: done === null ? 'session ended' : `unexpected: ${done}`,
          });
          break;
        }
      }
      s.end();
      out({ type: 'conn', id: s.id, event: 'close' });
      if (!stop && Date.now() < until) await new Promise((r) => setTimeout(r, 200));
    }
  };
  await Promise.all(Array.from({ length: conns }, (_, i) => worker(i)));
}

async function verify(file: string): Promise<void> {
  const acks = readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { key: string; value: string });
  const r = await psqlOnce('SELECT id, v FROM chaos');
  if (r.code !== 0) {
    out({ type: 'verify', checked: 0, missing: acks.map((a) => a.key), error: 'SELECT failed' });
    return;
  }
  const rows = new Map(
    r.stdout
      .split('\n')
      .filter(Boolean)
      .map((l) => {
        const [id, v] = l.split('|');
        return [id!, v!] as const;
      }),
  );
  const missing = acks.filter((a) => rows.get(a.key) !== a.value).map((a) => a.key);
  out({ type: 'verify', checked: acks.length, missing, rows: rows.size });
}

const v = args.get('verify');
await (v ? verify(v) : load());
process.exit(0);
