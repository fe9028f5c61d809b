// The Jepsen-style client, run inside the client namespace: persistent TCP connections issuing
// SETs with unique keys (one outstanding request per connection), reconnecting when a connection
// breaks. Prints one JSON line per acknowledged write and per connection event; `--verify FILE`
// reads acknowledged writes back with GET and reports any that are missing or wrong.
// Bounded: it stops at --seconds or on SIGTERM, and never has more than --conns connections.

import { connect, type Socket } from 'node:net';
import { readFileSync } from 'node:fs';

const args = new Map<string, string>();
for (let i = 2; i < process.argv.length; i += 2)
  args.set(process.argv[i]!.replace(/^--/, ''), process.argv[i + 1] ?? '');
const [host, portStr] = (args.get('target') ?? '127.0.0.1:7000').split(':');
const port = Number(portStr);
/** kv: Rubato's test KV service (SET k v → OK, GET k → VALUE v); redis: the same over Redis' inline protocol. */
const redis = args.get('proto') === 'redis';
const out = (o: object) => process.stdout.write(`${JSON.stringify({ t: Date.now(), ...o })}\n`);

class LineConn {
  private buf = '';
  private waiting: Array<{ resolve: (line: string) => void; reject: (e: Error) => void }> = [];
  /** Lines nobody waited for yet (the rest of a multi-line reply that arrived in one chunk). */
  private unclaimed: string[] = [];
  readonly sock: Socket;
  dead: Error | null = null;
  constructor(readonly id: number) {
    this.sock = connect({ host: host!, port });
    this.sock.setNoDelay(true);
    this.sock.setEncoding('utf8');
    this.sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const l = this.buf.slice(0, nl).replace(/\r$/, '');
        this.buf = this.buf.slice(nl + 1);
        const w = this.waiting.shift();
        if (w) w.resolve(l);
        else this.unclaimed.push(l);
      }
    });
    const die = (e: Error) => {
      if (!this.dead) this.dead = e;
      for (const w of this.waiting.splice(0)) w.reject(e);
    };
    this.sock.on('error', die);
    this.sock.on('close', () => die(new Error('closed')));
  }
  opened(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.sock.once('connect', () => resolve());
      this.sock.once('error', reject);
      setTimeout(() => reject(new Error('connect timeout')), 5000);
    });
  }
  /** The next line, without sending anything (the rest of a multi-line reply). */
  next(timeoutMs: number): Promise<string> {
    const ready = this.unclaimed.shift();
    if (ready !== undefined) return Promise.resolve(ready);
    return new Promise((resolve, reject) => {
      if (this.dead) {
        reject(this.dead);
        return;
      }
      const t = setTimeout(() => reject(new Error('reply timeout')), timeoutMs);
      this.waiting.push({
        resolve: (l) => {
          clearTimeout(t);
          resolve(l);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      });
    });
  }
  request(line: string, timeoutMs: number): Promise<string> {
    return new Promise((resolve, reject) => {
      if (this.dead) {
        reject(this.dead);
        return;
      }
      const t = setTimeout(() => reject(new Error('request timeout')), timeoutMs);
      this.waiting.push({
        resolve: (l) => {
          clearTimeout(t);
          resolve(l);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      });
      this.sock.write(`${line}\n`);
    });
  }
}

async function load(): Promise<void> {
  if (redis) {
    // Every acknowledged write on disk before its reply: the append-only file, fsync on every write.
    const c = new LineConn(-1);
    await c.opened();
    for (const cmd of ['CONFIG SET appendonly yes', 'CONFIG SET appendfsync always']) {
      const r = await c.request(cmd, 20000);
      if (r !== '+OK') throw new Error(`${cmd}: ${r}`);
    }
    c.sock.destroy();
  }
  const conns = Number(args.get('conns') ?? 4);
  const until = Date.now() + Number(args.get('seconds') ?? 30) * 1000;
  const timeoutMs = Number(args.get('timeout-ms') ?? 20000);
  let stop = false;
  process.once('SIGTERM', () => {
    stop = true;
  });
  let nextConn = 0;
  const worker = async (w: number) => {
    let seq = 0;
    while (!stop && Date.now() < until) {
      const c = new LineConn(nextConn++);
      try {
        await c.opened();
      } catch (e) {
        out({ type: 'conn', id: c.id, event: 'connect-failed', error: String(e) });
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      out({ type: 'conn', id: c.id, event: 'open' });
      while (!stop && Date.now() < until) {
        const key = `${args.get('prefix') ?? ''}w${w}c${c.id}s${seq++}`;
        const value = `v${Math.floor(Math.random() * 1e9)}`;
        const t0 = performance.now();
        try {
          const reply = await c.request(`SET ${key} ${value}`, timeoutMs);
          if (reply === (redis ? '+OK' : 'OK'))
            out({ type: 'ack', key, value, conn: c.id, latMs: Math.round((performance.now() - t0) * 100) / 100 });
          else out({ type: 'nack', key, reply });
        } catch (e) {
          out({ type: 'conn', id: c.id, event: 'broken', error: String((e as Error).message) });
          break;
        }
      }
      c.sock.destroy();
      out({ type: 'conn', id: c.id, event: 'close' });
    }
  };
  await Promise.all(Array.from({ length: conns }, (_, i) => worker(i)));
}

async function verify(file: string): Promise<void> {
  const acks = readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { key: string; value: string });
  // Several connections read back in parallel (one outstanding GET each): the guest serves them concurrently.
  const conns = Math.max(1, Math.min(Number(args.get('conns') ?? 8), acks.length));
  const missing: string[] = [];
  await Promise.all(
    Array.from({ length: conns }, async (_, w) => {
      const c = new LineConn(w);
      await c.opened();
      for (let i = w; i < acks.length; i += conns) {
        const a = acks[i]!;
        if (redis) {
          // A bulk reply: "$LEN" then the value (or "$-1": no such key).
          const head = c.request(`GET ${a.key}`, 20000);
          const h = await head;
          const v = h === '$-1' ? null : await c.next(20000);
          if (v !== a.value) missing.push(a.key);
          continue;
        }
        const r = await c.request(`GET ${a.key}`, 20000);
        if (r !== `VALUE ${a.value}`) missing.push(a.key);
      }
      c.sock.destroy();
    }),
  );
  out({ type: 'verify', checked: acks.length, missing });
}

const v = args.get('verify');
await (v ? verify(v) : load());
process.exit(0);
