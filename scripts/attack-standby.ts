// `tsx scripts/attack-standby.ts HOST:PORT [STANDBY_PID]`: what an attacker on the replication
// network can do to a running `rubato standby` before authenticating, measured: four peers that
// claim 500 MiB frames and stream 100 MiB each, then 300 silent connections. Prints when each was
// disconnected and, given the standby's PID, its peak resident memory (VmHWM).
import { connect, type Socket } from 'node:net';
import { readFileSync } from 'node:fs';

const [hp, pidArg] = process.argv.slice(2);
const m = hp?.match(/^(.+):(\d+)$/);
if (!m) {
  process.stderr.write('usage: attack-standby.ts HOST:PORT [STANDBY_PID]\n');
  process.exit(2);
}
const host = m[1]!;
const port = Number(m[2]);
const hwmMb = () => {
  if (!pidArg) return null;
  const line = readFileSync(`/proc/${pidArg}/status`, 'utf8')
    .split('\n')
    .find((l) => l.startsWith('VmHWM:'));
  return line ? Math.round(Number(line.replace(/\D+/g, '')) / 1024) : null;
};
const dial = () =>
  new Promise<Socket>((res, rej) => {
    const s = connect({ host, port }, () => res(s));
    s.once('error', rej);
  });
// The attacker reads (and drops) what the standby sends, so it sees the standby close the connection.
const closed = (s: Socket, t0: number) =>
  new Promise<number>((r) => {
    s.on('error', () => {});
    s.resume();
    s.once('close', () => r(Date.now() - t0));
  });

const t0 = Date.now();
const claims = await Promise.all([0, 1, 2, 3].map(() => dial()));
const claimClosed = claims.map((s) => closed(s, t0));
for (const s of claims) {
  const head = Buffer.alloc(24);
  head.writeUInt32BE(500 << 20, 0);
  head[4] = 2; // HELLO
  head[5] = 2;
  s.write(head);
  let sent = 0;
  const chunk = Buffer.alloc(1 << 20, 0x41);
  const pump = () => {
    while (sent < 100 << 20 && !s.destroyed && s.write(chunk)) sent += chunk.length;
    if (sent < 100 << 20 && !s.destroyed) s.once('drain', pump);
  };
  pump();
}
const claimMs = await Promise.all(claimClosed);
const t1 = Date.now();
const silentMs = await Promise.all(
  Array.from(
    { length: 300 },
    () =>
      new Promise<number>((r) => {
        const s = connect({ host, port });
        void closed(s, t1).then(r);
      }),
  ),
);
process.stdout.write(
  `${JSON.stringify({
    claims: { peers: 4, disconnectedAfterMsMax: Math.max(...claimMs) },
    silent: {
      connections: 300,
      closedWithin100Ms: silentMs.filter((x) => x < 100).length,
      allClosedAfterMs: Math.max(...silentMs),
    },
    standbyPeakRssMb: hwmMb(),
  })}\n`,
);
