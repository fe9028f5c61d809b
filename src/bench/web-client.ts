// The web load client, run inside the client namespace: --conns concurrent workers, each fetching
// --path over a fresh TCP connection per request (busybox httpd closes after each response), for
// --seconds or until SIGTERM. One JSON line per completed request: {type:'ack', latMs, bytes}.

import { request } from 'node:http';

const args = new Map<string, string>();
for (let i = 2; i < process.argv.length; i += 2)
  args.set(process.argv[i]!.replace(/^--/, ''), process.argv[i + 1] ?? '');
const [host, portStr] = (args.get('target') ?? '127.0.0.1:80').split(':');
const path = args.get('path') ?? '/';
const out = (o: object) => process.stdout.write(`${JSON.stringify({ t: Date.now(), ...o })}\n`);

function fetchOnce(): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ host, port: Number(portStr), path, agent: false, timeout: 20_000 }, (res) => {
      let bytes = 0;
      res.on('data', (d: Buffer) => {
        bytes += d.length;
      });
      res.on('end', () => (res.statusCode === 200 ? resolve(bytes) : reject(new Error(`HTTP ${res.statusCode}`))));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end();
  });
}

async function main(): Promise<void> {
  const conns = Number(args.get('conns') ?? 4);
  const until = Date.now() + Number(args.get('seconds') ?? 10) * 1000;
  let stop = false;
  process.once('SIGTERM', () => {
    stop = true;
  });
  await Promise.all(
    Array.from({ length: conns }, async () => {
      while (!stop && Date.now() < until) {
        const t0 = performance.now();
        try {
          const bytes = await fetchOnce();
          out({ type: 'ack', latMs: Math.round((performance.now() - t0) * 100) / 100, bytes });
        } catch (e) {
          out({ type: 'error', event: (e as Error).message });
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    }),
  );
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`${(e as Error).message}\n`);
    process.exit(1);
  },
);
