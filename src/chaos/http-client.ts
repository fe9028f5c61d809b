// The demo's web client, run inside the client namespace: one persistent (keep-alive) connection
// fetching --path every --interval-ms, and a fresh connection per request every --new-every-ms,
// until SIGTERM. One JSON line per request: {type:'ok'|'error', conn:'persistent'|'new', latMs, socket[, body]}.
// `socket` numbers the persistent connection's TCP socket: it stays 1 if the connection survives.

import { Agent, request } from 'node:http';

const args = new Map<string, string>();
for (let i = 2; i < process.argv.length; i += 2)
  args.set(process.argv[i]!.replace(/^--/, ''), process.argv[i + 1] ?? '');
const [host, portStr] = (args.get('target') ?? '127.0.0.1:80').split(':');
const path = args.get('path') ?? '/';
const out = (o: object) => process.stdout.write(`${JSON.stringify({ t: Date.now(), ...o })}\n`);
const keepAlive = new Agent({ keepAlive: true, maxSockets: 1 });
let sockets = 0;
const seen = new WeakSet<object>();

/** --body 1: each answer's first 64 bytes go in its line (a page that shows the guest's state). */
const withBody = args.get('body') === '1';

function fetchOnce(persistent: boolean): Promise<{ latMs: number; socket: number; body: string }> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const req = request(
      { host, port: Number(portStr), path, agent: persistent ? keepAlive : false, timeout: 30_000 },
      (res) => {
        let body = '';
        res.on('data', (d: Buffer) => {
          if (withBody && body.length < 64) body += d.toString('utf8', 0, 64 - body.length);
        });
        res.on('end', () =>
          res.statusCode === 200
            ? resolve({ latMs: performance.now() - t0, socket: sock, body: body.trim() })
            : reject(new Error(`HTTP ${res.statusCode}`)),
        );
        res.on('error', reject);
      },
    );
    let sock = 0;
    req.on('socket', (s) => {
      if (persistent) {
        if (!seen.has(s)) {
          seen.add(s);
          sockets++;
        }
        sock = sockets;
      }
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end();
  });
}

async function loop(persistent: boolean, everyMs: number, stop: () => boolean): Promise<void> {
  while (!stop()) {
    const t = Date.now();
    try {
      const r = await fetchOnce(persistent);
      out({
        type: 'ok',
        conn: persistent ? 'persistent' : 'new',
        latMs: Math.round(r.latMs * 10) / 10,
        socket: r.socket,
        ...(withBody ? { body: r.body } : {}),
      });
    } catch (e) {
      out({ type: 'error', conn: persistent ? 'persistent' : 'new', error: (e as Error).message });
    }
    await new Promise((r) => setTimeout(r, Math.max(0, everyMs - (Date.now() - t))));
  }
}

let stopping = false;
process.on('SIGTERM', () => {
  stopping = true;
});
await Promise.all([
  loop(true, Number(args.get('interval-ms') ?? 100), () => stopping),
  loop(false, Number(args.get('new-every-ms') ?? 500), () => stopping),
]);
keepAlive.destroy();
