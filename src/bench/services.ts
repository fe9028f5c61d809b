// `rubato bench services`: real services in the Debian guest (redis, nginx, PostgreSQL) measured
// with Debian's stock clients from the client namespace over the test LAN — `redis-benchmark`
// (SET and GET, 50 clients), `wrk` (a 4 KiB and a 100 KiB page, 64 keep-alive connections),
// `pgbench` (TPC-B-like, 8 clients). The same booted guest runs unreplicated and under each
// policy, interleaved (U P1 U P2 U …), per vCPU count. Latencies are the clients' own numbers.

import { copyFileSync, constants, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeTempDir, removeTempDir } from '../util/tmp.ts';
import { runCommand } from '../util/procs.ts';
import { median, percentile, round } from '../util/stats.ts';
import { sleep } from '../util/async.ts';
import { RubatoError } from '../util/errors.ts';
import { Lan } from '../io/net/lan.ts';
import { QemuVm, type QemuBinary } from '../qemu/vm.ts';
import type { Accel } from '../qemu/spec.ts';
import { parseVmDefinition } from '../qemu/definition.ts';
import { specOf, startHostIo, type HostIo } from '../host/protect.ts';
import { ensureDebianImage, ensureServiceClients, ensureTapRelay } from '../setup/index.ts';
import { protect, summarise, whileProtected } from './scheduler.ts';

/** The Debian guest's static address (guest/debian/files/etc/network/interfaces). */
const SUBNET = '10.231.0';
export const SERVICE_POLICIES = ['model', 'adaptive', 'bounded-latency', 'fixed:25ms'] as const;

export interface ServicesBenchOptions {
  accel: Accel; binary: QemuBinary; quick: boolean; outDir: string; seconds?: number;
  policies?: readonly string[]; cpus?: readonly number[]; onStatus?: (s: string) => void;
}

/** What one client run reported. */
export interface ClientRun { perSec: number; p50Ms: number; p99Ms: number; errors: number }

export type Probe = 'redis-set' | 'redis-get' | 'nginx-4k' | 'nginx-100k' | 'pgbench';
const SERVICE_OF: Record<Probe, 'redis' | 'nginx' | 'postgres'> = { 'redis-set': 'redis', 'redis-get': 'redis', 'nginx-4k': 'nginx', 'nginx-100k': 'nginx', pgbench: 'postgres' };

export interface ServiceCell {
  service: 'redis' | 'nginx' | 'postgres'; probe: Probe; policy: string; cpus: number;
  throughputRatio: number; perSec: number; perSecUnreplicated: number;
  p50Ms: number; p99Ms: number; p50MsUnreplicated: number; p99MsUnreplicated: number; errors: number;
  checkpointsPerSec: number; pausedFraction: number; pauseMsMedian: number; mbShipped: number;
}

// ---- the stock clients' own output, parsed ----

/** `redis-benchmark --csv`: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms". */
export function parseRedisCsv(out: string): Map<string, ClientRun> {
  const rows = out.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('"')).map((l) => l.split(',').map((c) => c.replace(/^"|"$/g, '')));
  const head = rows.shift();
  const at = (name: string) => head?.indexOf(name) ?? -1;
  const [rps, p50, p99] = [at('rps'), at('p50_latency_ms'), at('p99_latency_ms')];
  if (!head || rps < 0 || p50 < 0 || p99 < 0) throw new RubatoError('RUBATO_PROTOCOL', `redis-benchmark printed no CSV table: ${out.slice(0, 200)}`);
  return new Map(rows.map((r) => [r[0]!.toUpperCase(), { perSec: Number(r[rps]), p50Ms: Number(r[p50]), p99Ms: Number(r[p99]), errors: 0 }]));
}

const toMs = (v: string, unit: string) => Number(v) * (unit === 'us' ? 1e-3 : unit === 's' ? 1e3 : unit === 'm' ? 60e3 : 1);

/** `wrk --latency`: "Requests/sec: N", the latency distribution's 50 % and 99 %, socket errors and non-2xx answers. */
export function parseWrk(out: string): ClientRun {
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(out);
  const pct = (p: number) => { const m = new RegExp(`^\\s*${p}%\\s+([\\d.]+)(us|ms|s|m)\\s*$`, 'm').exec(out); return m ? round(toMs(m[1]!, m[2]!), 3) : Number.NaN; };
  if (!rps) throw new RubatoError('RUBATO_PROTOCOL', `wrk printed no rate: ${out.slice(0, 200)}`);
  const sock = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(out);
  const errors = (sock ? sock.slice(1).reduce((a, x) => a + Number(x), 0) : 0) + (non2xx ? Number(non2xx[1]) : 0);
  return { perSec: Number(rps[1]), p50Ms: pct(50), p99Ms: pct(99), errors };
}

/** pgbench: "tps = N (without initial connection time)"; latencies from its per-transaction log (-l: µs in the third column). */
export function parsePgbench(out: string, logLines: readonly string[]): ClientRun {
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(out);
  if (!tps) throw new RubatoError('RUBATO_PROTOCOL', `pgbench printed no tps: ${out.slice(-300)}`);
  const lat = logLines.map((l) => Number(l.split(' ')[2]) / 1000).filter((x) => Number.isFinite(x));
  const failed = /number of failed transactions: (\d+)/.exec(out);
  return { perSec: Number(tps[1]), p50Ms: round(median(lat), 3), p99Ms: round(percentile(lat, 99), 3), errors: failed ? Number(failed[1]) : 0 };
}

// ---- the rig: the Debian guest on a LAN host, the clients in the client namespace ----

interface Rig { lan: Lan; vm: QemuVm; io: HostIo; dir: string }

async function startRig(o: ServicesBenchOptions, cpus: number, dir: string): Promise<Rig> {
  const image = await ensureDebianImage();
  await ensureTapRelay();
  const disk = join(dir, 'debian.img');
  copyFileSync(image, disk, constants.COPYFILE_FICLONE);
  const lan = await Lan.create('svc', { subnet: SUBNET });
  try {
    const host = await lan.addHost('ha');
    const file = join(dir, 'debian.json');
    const text = JSON.stringify({ name: 'svc', cpus, memoryMiB: 1024, accelerator: o.accel, disks: [{ path: disk }], nics: [{ bridge: host.bridge }], boot: { from: 'disk' } });
    writeFileSync(file, text);
    const spec = specOf(parseVmDefinition(text, file), o.accel);
    const runDir = join(dir, 'run');
    mkdirSync(runDir, { recursive: true });
    const io = await startHostIo(spec, runDir, 'svc', disk, host.ns);
    const vm = await QemuVm.start(spec, { binary: o.binary, runDir, ...(io.netSocket ? { netSocket: io.netSocket } : {}), ...(io.nbdSocket ? { nbdSocket: io.nbdSocket } : {}) });
    await vm.waitSerial(/RUBATO debian ready/, 300_000);
    return { lan, vm, io, dir };
  } catch (e) {
    await lan.destroy();
    throw e;
  }
}

async function stopRig(r: Rig | null): Promise<void> {
  if (!r) return;
  await r.vm.stop();
  await r.io.close().catch(() => {});
  await r.lan.destroy();
}

/** A stock client in the client namespace; its stdout, or a typed error with its last words. */
async function client(lan: Lan, cmd: string, args: string[], timeoutMs: number): Promise<string> {
  const r = await runCommand('timeout', [String(Math.ceil(timeoutMs / 1000)), 'ip', 'netns', 'exec', lan.clientNs, cmd, ...args]);
  if (r.code !== 0) throw new RubatoError('RUBATO_PROTOCOL', `${cmd} failed (exit ${r.code}): ${(r.stderr || r.stdout).trim().split('\n').slice(-2).join(' | ')}`);
  return r.stdout;
}

/**
 * Runs one probe for about `seconds`. redis-benchmark is count-bound: its count comes from the last
 * rate seen in the same mode (replicated or not), measured first with a short run when there is none.
 */
function probeRunner(rig: Rig, seconds: number, logDir: string) {
  const ip = rig.lan.guestIp;
  const lastRate = new Map<string, number>();
  const redis = async (test: 'set' | 'get', n: number): Promise<ClientRun> => {
    const out = await client(rig.lan, 'redis-benchmark', ['-h', ip, '-c', '50', '-n', String(n), '-t', test, '-d', '64', '-r', '100000', '--csv'], 900_000);
    const r = parseRedisCsv(out).get(test.toUpperCase());
    if (!r) throw new RubatoError('RUBATO_PROTOCOL', `redis-benchmark reported no ${test.toUpperCase()}`);
    return r;
  };
  return async (probe: Probe, mode: 'unreplicated' | 'replicated'): Promise<ClientRun> => {
    if (probe === 'redis-set' || probe === 'redis-get') {
      const test = probe === 'redis-set' ? 'set' : 'get';
      const k = `${probe}/${mode}`;
      if (!lastRate.has(k)) lastRate.set(k, (await redis(test, 1000)).perSec);
      const r = await redis(test, Math.max(1000, Math.min(1_000_000, Math.round(lastRate.get(k)! * seconds))));
      lastRate.set(k, r.perSec);
      return r;
    }
    if (probe === 'nginx-4k' || probe === 'nginx-100k') {
      const out = await client(rig.lan, 'wrk', ['-t', '2', '-c', '64', '-d', `${seconds}s`, '--latency', `http://${ip}/${probe === 'nginx-4k' ? '4k' : '100k'}.html`], (seconds + 60) * 1000);
      return parseWrk(out);
    }
    const prefix = join(logDir, `pgb-${Date.now()}`);
    const out = await client(rig.lan, 'pgbench', ['-h', ip, '-U', 'postgres', '-c', '8', '-j', '2', '-T', String(seconds), '-n', '-l', `--log-prefix=${prefix}`, 'postgres'], (seconds + 120) * 1000);
    const lines = readdirSync(logDir).filter((f) => join(logDir, f).startsWith(prefix)).flatMap((f) => readFileSync(join(logDir, f), 'utf8').split('\n').filter(Boolean));
    return parsePgbench(out, lines);
  };
}

export async function runServicesBench(o: ServicesBenchOptions): Promise<{ summary: Record<string, unknown>; file: string; cells: ServiceCell[] }> {
  const status = o.onStatus ?? (() => {});
  const seconds = o.seconds ?? (o.quick ? 5 : 15);
  const policies = o.policies ?? (o.quick ? ['model'] : SERVICE_POLICIES);
  const cpuCounts = o.cpus ?? (o.quick ? [1] : [1, 2]);
  const scale = o.quick ? 2 : 10;
  const probes: Probe[] = ['redis-set', 'redis-get', 'nginx-4k', 'nginx-100k', 'pgbench'];
  await ensureServiceClients();
  const cells: ServiceCell[] = [];
  for (const cpus of cpuCounts) {
    const dir = makeTempDir('rubato-svc-');
    let rig: Rig | null = null;
    try {
      status(`booting the Debian guest (${cpus} vCPU, 1 GiB) from its disk`);
      rig = await startRig(o, cpus, dir);
      status(`initialising pgbench (scale ${scale}) in the guest`);
      await client(rig.lan, 'pgbench', ['-h', rig.lan.guestIp, '-U', 'postgres', '-i', '-s', String(scale), '-q', 'postgres'], 900_000);
      const logDir = join(dir, 'pgbench');
      mkdirSync(logDir, { recursive: true });
      const run = probeRunner(rig, seconds, logDir);
      if (!rig.io.relay) throw new RubatoError('RUBATO_CONFIG', 'the guest has no NIC behind the relay');
      const io = { relay: rig.io.relay, nbd: rig.io.nbd };
      // Unreplicated once per probe (a warm-up that also sizes redis-benchmark), then U P U P … per probe.
      for (const p of probes) await run(p, 'unreplicated');
      const before = new Map<Probe, ClientRun>();
      for (const p of probes) before.set(p, await run(p, 'unreplicated'));
      for (const policy of policies) {
        status(`${cpus} vCPU: ${policy}: synchronising the standby`);
        const prot = await protect(rig.vm, dir, `svc-${cpus}-${policy}`.replace(/[^a-z0-9-]/gi, ''), policy, io);
        const during = await whileProtected(prot, async () => {
          await sleep(500);
          const out: Array<{ p: Probe; r: ClientRun; s: ReturnType<typeof summarise> }> = [];
          for (const p of probes) {
            const n0 = prot.events.length;
            const t0 = performance.now();
            const r = await run(p, 'replicated');
            out.push({ p, r, s: summarise(prot.events.slice(n0), (performance.now() - t0) / 1000) });
            status(`  ${p} under ${policy}: ${round(r.perSec)}/s, p50 ${r.p50Ms} ms, p99 ${r.p99Ms} ms${r.errors ? `, ${r.errors} errors` : ''}`);
          }
          return out;
        });
        for (const { p, r, s } of during) {
          const u0 = before.get(p)!;
          const u1 = await run(p, 'unreplicated');
          before.set(p, u1);
          const uRate = (u0.perSec + u1.perSec) / 2;
          cells.push({
            service: SERVICE_OF[p], probe: p, policy, cpus, throughputRatio: round(r.perSec / uRate, 3), perSec: round(r.perSec, 1), perSecUnreplicated: round(uRate, 1),
            p50Ms: r.p50Ms, p99Ms: r.p99Ms, p50MsUnreplicated: round((u0.p50Ms + u1.p50Ms) / 2, 3), p99MsUnreplicated: round((u0.p99Ms + u1.p99Ms) / 2, 3), errors: r.errors,
            checkpointsPerSec: s.checkpointsPerSec, pausedFraction: s.pausedFraction, pauseMsMedian: s.pauseMsMedian, mbShipped: s.mbShipped,
          });
        }
      }
    } finally {
      await stopRig(rig);
      removeTempDir(dir);
    }
  }
  // The headline per service: the default policy on 1 vCPU, throughput as the mean of its probes.
  const headline = (service: ServiceCell['service']) => {
    const cs = cells.filter((c) => c.service === service && c.policy === policies[0] && c.cpus === cpuCounts[0]);
    if (!cs.length) return null;
    const first = cs[0]!;
    return {
      throughputRatio: round(cs.reduce((a, c) => a + c.throughputRatio, 0) / cs.length, 3),
      p50Ms: first.p50Ms, p50MsUnreplicated: first.p50MsUnreplicated, p99Ms: first.p99Ms, p99MsUnreplicated: first.p99MsUnreplicated,
      checkpointsPerSec: first.checkpointsPerSec, pausedFraction: first.pausedFraction, errors: cs.reduce((a, c) => a + c.errors, 0),
      probes: Object.fromEntries(cs.map((c) => [c.probe, { throughputRatio: c.throughputRatio, perSec: c.perSec, perSecUnreplicated: c.perSecUnreplicated, p50Ms: c.p50Ms, p50MsUnreplicated: c.p50MsUnreplicated, p99Ms: c.p99Ms, p99MsUnreplicated: c.p99MsUnreplicated }])),
    };
  };
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, 'services.json');
  const summary = { benchmark: 'services', policy: policies[0], cpus: cpuCounts[0], seconds, pgbenchScale: scale, redis: headline('redis'), nginx: headline('nginx'), postgres: headline('postgres'), results: file };
  writeFileSync(file, JSON.stringify({ summary, cells }, null, 2));
  return { summary, file, cells };
}
