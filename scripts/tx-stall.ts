// `npx tsx scripts/tx-stall.ts [RUNS] [--event-idx on]`: the Debian guest, unreplicated, after a
// `pgbench -i`, loaded in turn by redis-benchmark GET and SET, wrk and a 100 KiB upload until a
// client fails (its transmit queue stalled: the console's NETDEV WATCHDOG lines are printed) or RUNS
// runs passed. `--event-idx on` gives its NIC virtio's event index (the Debian rig leaves it off
// under TCG; docs/protect.md).
import { startDebianRig } from '../src/chaos/debian-rig.ts';
import { makeTempDir, removeTempDir, runCommand } from '../src/util/index.ts';
const runs = Number(process.argv[2] ?? 30);
const eventIdx = process.argv.includes('--event-idx') && process.argv[process.argv.indexOf('--event-idx') + 1] === 'on';
const dir = makeTempDir('rubato-txs-');
const rig = await startDebianRig(dir, 'auto', 'txs', eventIdx ? { nicEventIdx: true } : {});
const ip = rig.lan.guestIp;
const lines: string[] = [];
rig.vm.on('serial', (l: string) => {
  lines.push(l);
  if (lines.length > 6) lines.shift();
});
/** A client in the client namespace, ended by PID after `ms` (as the services benchmark runs them). */
const inClient = (args: string[], ms: number) =>
  runCommand('ip', ['netns', 'exec', rig.lan.clientNs, ...args], { timeoutMs: ms });
let ok = 0;
try {
  const init = await inClient(['pgbench', '-h', ip, '-U', 'postgres', '-i', '-s', '2', '-q', 'postgres'], 300_000);
  console.log(JSON.stringify({ pgbenchInit: init.code, console: lines.join(' | ').slice(-300) }));
  const clients = [
    ['redis-benchmark', '-h', ip, '-c', '50', '-n', '30000', '-t', 'get', '-d', '64', '-r', '100000', '--csv'],
    ['redis-benchmark', '-h', ip, '-c', '50', '-n', '30000', '-t', 'set', '-d', '64', '-r', '100000', '--csv'],
    ['wrk', '-t', '2', '-c', '64', '-d', '5s', '--timeout', '10s', `http://${ip}/100k.html`],
    ['redis-benchmark', '-h', ip, '-c', '4', '-n', '300', '-t', 'set', '-d', '102400', '-r', '1000', '--csv'],
  ];
  for (let i = 0; i < runs; i++) {
    const args = clients[i % clients.length]!;
    const t0 = Date.now();
    const r = await inClient(args, 60_000);
    const ms = Date.now() - t0;
    if (r.code !== 0) {
      console.log(
        JSON.stringify({ run: i, ok, failed: args[0], code: r.code, ms, console: lines.join(' | ').slice(-600) }),
      );
      break;
    }
    ok++;
    console.log(JSON.stringify({ run: i, ok, ms, what: args[0] }));
  }
} finally {
  console.log(JSON.stringify({ done: true, ok, eventIdx }));
  await rig.vm.stop();
  await rig.io.close().catch(() => {});
  await rig.lan.destroy();
  removeTempDir(dir);
}
