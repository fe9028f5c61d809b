// `rubato bench services`: real services in the Debian guest (redis, nginx, PostgreSQL) measured
// with Debian's stock clients from the client namespace over the test LAN — `redis-benchmark`
// (SET and GET, 50 clients), `wrk` (a 4 KiB and a 100 KiB page, 64 keep-alive connections),
// `pgbench` (TPC-B-like, 8 clients). The same booted guest runs unreplicated and under each
// policy, interleaved (U P1 U P2 U …), per vCPU count. Latencies are the clients' own numbers.

import { standbySide, startPrimarySide } from '../host/index.ts';
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  makeTempDir,
  removeTempDir,
  runCommand,
  median,
  percentile,
  round,
  sleep,
  waitFor,
  RubatoError,
} from '../util/index.ts';
import { type Lan, GuestIo } from '../io/index.ts';
import type { QemuBinary, Accel } from '../qemu/index.ts';
import type { CompareCounts } from '../commit/index.ts';
import { ensureServiceClients, ensureTapRelay } from '../setup/index.ts';
import { summarise } from './scheduler.ts';
import { protect, whileProtected } from './protected.ts';
import { cpuWindow, type CpuShare } from './cpu.ts';
import {
  LatencyBreakdown,
  SEGMENTS,
  formatBreakdown,
  type Breakdown,
  DISK_BLOCK_ID,
  type ReleaseMode,
} from '../replication/index.ts';

/** A breakdown's segment means (ms), which add up to `total`. */
const breakdownMeans = (b: Breakdown) =>
  Object.fromEntries([...SEGMENTS, 'total' as const].map((k) => [k, round(b[k].mean, 2)]));
import { startDebianRig, stopKvRig, type KvRig } from '../chaos/index.ts';
import { parsePolicy } from '../scheduler/index.ts';
import { randomBytes } from 'node:crypto';
import { barChart, stackedBarChart, svgToPng } from './plot.ts';

export const SERVICE_POLICIES = ['model', 'adaptive', 'bounded-latency', 'fixed:25ms'] as const;

export interface ServicesBenchOptions {
  accel: Accel;
  binary: QemuBinary;
  quick: boolean;
  outDir: string;
  seconds?: number;
  policies?: readonly string[];
  /** Output release modes, each measured under every policy (default buffer). */
  modes?: readonly ReleaseMode[];
  cpus?: readonly number[];
  /** The probes to run (default all, in their order). */
  probes?: readonly Probe[];
  onStatus?: (s: string) => void;
}

/** What one client run reported. */
export interface ClientRun {
  perSec: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  /** What the errors were, in the client's words (wrk: "connect 0, read 0, write 0, timeout 43"). */
  errorKinds?: string;
}

export const PROBES = ['redis-set', 'redis-get', 'nginx-4k', 'nginx-100k', 'pgbench', 'upload-100mb'] as const;
export type Probe = (typeof PROBES)[number];
type Service = 'redis' | 'nginx' | 'postgres' | 'upload';
const SERVICE_OF: Record<Probe, Service> = {
  'redis-set': 'redis',
  'redis-get': 'redis',
  'nginx-4k': 'nginx',
  'nginx-100k': 'nginx',
  pgbench: 'postgres',
  'upload-100mb': 'upload',
};

export interface ServiceCell {
  service: Service;
  probe: Probe;
  policy: string;
  mode: ReleaseMode;
  cpus: number;
  throughputRatio: number;
  /** Compare mode: the secondary's frames that differed from the primary's, per second. */
  mismatchesPerSec: number;
  /** The differences found in the run, by kind (compare and auto). */
  mismatchKinds: Record<string, number>;
  /** … and frames released by comparison (before their checkpoint), per second. */
  comparedPerSec: number;
  perSec: number;
  perSecUnreplicated: number;
  p50Ms: number;
  p99Ms: number;
  p50MsUnreplicated: number;
  p99MsUnreplicated: number;
  errors: number;
  errorKinds?: string;
  /** Cores used during the replicated run: the guest's QEMU, this process (the primary), the standby, other (compare mode: the secondary VM), idle. */
  cores: CpuShare;
  checkpointsPerSec: number;
  pausedFraction: number;
  pauseMsMedian: number;
  /** Pages in the median pause, and pause ≈ fixedMs + usPerPage·pages over the cell (which of the two the pause is). */
  pausePagesMedian: number;
  pauseFit: { fixedMs: number; usPerPage: number } | null;
  mbShipped: number;
  /** Of the dirty pages, the shares sent as references to the standby's copy (unchanged, changed runs). */
  pageRefs: { sameShare: number; deltaShare: number; mbSaved: number };
  /** Where each released output frame's time went (segments: replication/latency.ts). */
  latencyBreakdown?: Breakdown;
}

// ---- the stock clients' own output, parsed ----

/**
 * `redis-benchmark --csv`:
 * "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms".
 */
export function parseRedisCsv(out: string): Map<string, ClientRun> {
  const rows = out
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.startsWith('"'))
    .map((l) => l.split(',').map((c) => c.replace(/^"|"$/g, '')));
  const head = rows.shift();
  const at = (name: string) => head?.indexOf(name) ?? -1;
  const [rps, p50, p99] = [at('rps'), at('p50_latency_ms'), at('p99_latency_ms')];
  if (!head || rps < 0 || p50 < 0 || p99 < 0)
    throw new RubatoError('RUBATO_PROTOCOL', `redis-benchmark printed no CSV table: ${out.slice(0, 200)}`);
  return new Map(
    rows.map((r) => [
      r[0]!.toUpperCase(),
      { perSec: Number(r[rps]), p50Ms: Number(r[p50]), p99Ms: Number(r[p99]), errors: 0 },
    ]),
  );
}

const toMs = (v: string, unit: string) =>
  Number(v) * (unit === 'us' ? 1e-3 : unit === 's' ? 1e3 : unit === 'm' ? 60e3 : 1);

/** `wrk --latency`: "Requests/sec: N", the latency distribution's 50 % and 99 %, socket errors and non-2xx answers. */
export function parseWrk(out: string): ClientRun {
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(out);
  const pct = (p: number) => {
    const m = new RegExp(`^\\s*${p}%\\s+([\\d.]+)(us|ms|s|m)\\s*$`, 'm').exec(out);
    return m ? round(toMs(m[1]!, m[2]!), 3) : Number.NaN;
  };
  if (!rps) throw new RubatoError('RUBATO_PROTOCOL', `wrk printed no rate: ${out.slice(0, 200)}`);
  const sock = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(out);
  const errors = (sock ? sock.slice(1).reduce((a, x) => a + Number(x), 0) : 0) + (non2xx ? Number(non2xx[1]) : 0);
  const kinds = [
    ...(sock ? [`connect ${sock[1]}, read ${sock[2]}, write ${sock[3]}, timeout ${sock[4]}`] : []),
    ...(non2xx ? [`non-2xx ${non2xx[1]}`] : []),
  ].join(', ');
  return { perSec: Number(rps[1]), p50Ms: pct(50), p99Ms: pct(99), errors, ...(errors ? { errorKinds: kinds } : {}) };
}

/**
 * pgbench: "tps = N (without initial connection time)"; latencies from its per-transaction log (-l: µs in the third
 * column).
 */
export function parsePgbench(out: string, logLines: readonly string[]): ClientRun {
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(out);
  // No transaction within the run (all of it spent connecting): a rate of 0, not a broken client.
  if (!tps && /number of transactions actually processed: 0\b/.test(out))
    return { perSec: 0, p50Ms: Number.NaN, p99Ms: Number.NaN, errors: 0 };
  if (!tps) throw new RubatoError('RUBATO_PROTOCOL', `pgbench printed no tps: ${out.slice(-300)}`);
  const lat = logLines.map((l) => Number(l.split(' ')[2]) / 1000).filter((x) => Number.isFinite(x));
  const failed = /number of failed transactions: (\d+)/.exec(out);
  return {
    perSec: Number(tps[1]),
    p50Ms: round(median(lat), 3),
    p99Ms: round(percentile(lat, 99), 3),
    errors: failed ? Number(failed[1]) : 0,
  };
}

// ---- the clients run in the rig's client namespace (the Debian guest: chaos/debian-rig.ts) ----

type Rig = KvRig;

/** A stock client in the client namespace; its stdout, or a typed error with its last words. */
async function client(lan: Lan, cmd: string, args: string[], timeoutMs: number): Promise<string> {
  // (`ip netns exec` execs the client: the tracked PID is the client's own)
  const r = await runCommand('ip', ['netns', 'exec', lan.clientNs, cmd, ...args], { timeoutMs });
  if (r.code !== 0)
    throw new RubatoError(
      'RUBATO_PROTOCOL',
      `${cmd} failed (exit ${r.code}): ${(r.stderr || r.stdout).trim().split('\n').slice(-2).join(' | ')}`,
    );
  return r.stdout;
}

/**
 * Runs one probe for about `seconds`. redis-benchmark is count-bound: its count comes from the last
 * rate seen in the same mode (replicated or not), measured first with a short run when there is none.
 */
const UPLOAD_VALUE_BYTES = 102_400;

function probeRunner(rig: Rig, seconds: number, logDir: string) {
  const ip = rig.lan.guestIp;
  const lastRate = new Map<string, number>();
  const redis = async (test: 'set' | 'get', n: number): Promise<ClientRun> => {
    const out = await client(
      rig.lan,
      'redis-benchmark',
      ['-h', ip, '-c', '50', '-n', String(n), '-t', test, '-d', '64', '-r', '100000', '--csv'],
      // count-bound, sized for `seconds` at the last rate seen: a stuck guest fails within minutes, not 15
      Math.max(120, 20 * seconds) * 1000,
    );
    const r = parseRedisCsv(out).get(test.toUpperCase());
    if (!r) throw new RubatoError('RUBATO_PROTOCOL', `redis-benchmark reported no ${test.toUpperCase()}`);
    return r;
  };
  /** `secs`: this run's length (a warm-up is shorter); the rate it measures is kept all the same. */
  return async (probe: Probe, mode: 'unreplicated' | 'replicated', secs = seconds): Promise<ClientRun> => {
    if (probe === 'redis-set' || probe === 'redis-get') {
      const test = probe === 'redis-set' ? 'set' : 'get';
      const k = `${probe}/${mode}`;
      if (!lastRate.has(k)) lastRate.set(k, (await redis(test, 1000)).perSec);
      const r = await redis(test, Math.max(1000, Math.min(1_000_000, Math.round(lastRate.get(k)! * secs))));
      lastRate.set(k, r.perSec);
      return r;
    }
    if (probe === 'upload-100mb') {
      // Inbound bulk: 1000 SETs of 100 KiB over 4 connections (~100 MB into the guest). The guest's
      // TCP ACKs are output: held for a checkpoint like any reply, they pace the sender's window.
      const out = await client(
        rig.lan,
        'redis-benchmark',
        [
          '-h',
          ip,
          '-c',
          '4',
          '-n',
          // (a warm-up: about 60 values a second, as buffer mode takes them)
          String(secs === seconds ? 1000 : Math.min(1000, Math.max(100, Math.round(60 * secs)))),
          '-t',
          'set',
          '-d',
          String(UPLOAD_VALUE_BYTES),
          '-r',
          '1000',
          '--csv',
        ],
        900_000,
      );
      const r = parseRedisCsv(out).get('SET');
      if (!r) throw new RubatoError('RUBATO_PROTOCOL', 'redis-benchmark reported no SET for the upload');
      return r;
    }
    if (probe === 'nginx-4k' || probe === 'nginx-100k') {
      const out = await client(
        rig.lan,
        'wrk',
        [
          '-t',
          '2',
          '-c',
          '64',
          '-d',
          `${secs}s`,
          // wrk's default 2 s timeout counts a slow reply as an error and leaves it out of the
          // latencies: 64 connections fetching 100 KiB from the TCG guest see 9–26 such per 5 s
          // even unreplicated. With 10 s they are latencies (in the p99), not errors.
          '--timeout',
          '10s',
          '--latency',
          `http://${ip}/${probe === 'nginx-4k' ? '4k' : '100k'}.html`,
        ],
        (secs + 60) * 1000,
      );
      return parseWrk(out);
    }
    const prefix = join(logDir, `pgb-${Date.now()}`);
    const out = await client(
      rig.lan,
      'pgbench',
      [
        '-h',
        ip,
        '-U',
        'postgres',
        '-c',
        '8',
        '-j',
        '2',
        '-T',
        String(secs),
        '-n',
        '-l',
        `--log-prefix=${prefix}`,
        'postgres',
      ],
      (secs + 120) * 1000,
    );
    const lines = readdirSync(logDir)
      .filter((f) => join(logDir, f).startsWith(prefix))
      .flatMap((f) => readFileSync(join(logDir, f), 'utf8').split('\n').filter(Boolean));
    return parsePgbench(out, lines);
  };
}

export async function runServicesBench(
  o: ServicesBenchOptions,
): Promise<{ summary: Record<string, unknown>; file: string; cells: ServiceCell[] }> {
  const status = o.onStatus ?? (() => {});
  const seconds = o.seconds ?? (o.quick ? 5 : 15);
  const warmSeconds = o.quick ? 10 : 15;
  const policies = o.policies ?? (o.quick ? ['model'] : SERVICE_POLICIES);
  const modes = o.modes ?? ['buffer'];
  const cpuCounts = o.cpus ?? (o.quick ? [1] : [1, 2]);
  const scale = o.quick ? 2 : 10;
  const probes = PROBES.filter((p) => !o.probes || o.probes.includes(p));
  await ensureServiceClients();
  const cells: ServiceCell[] = [];
  for (const cpus of cpuCounts) {
    const dir = makeTempDir('rubato-svc-');
    let rig: Rig | null = null;
    try {
      status(`booting the Debian guest (${cpus} vCPU, 1 GiB) from its disk`);
      rig = await startDebianRig(dir, o.accel, 'svc', { hosts: 1, cpus });
      if (probes.includes('pgbench')) {
        status(`initialising pgbench (scale ${scale}) in the guest`);
        await client(
          rig.lan,
          'pgbench',
          ['-h', rig.lan.guestIp, '-U', 'postgres', '-i', '-s', String(scale), '-q', 'postgres'],
          900_000,
        );
      }
      const logDir = join(dir, 'pgbench');
      mkdirSync(logDir, { recursive: true });
      const probe = probeRunner(rig, seconds, logDir);
      const guest = rig;
      // A client that fails says what the guest's console said last (a stuck NIC, a crash).
      const run: typeof probe = async (p, m, secs) => {
        try {
          return await probe(p, m, secs);
        } catch (e) {
          const tail = guest.vm.serialLines.slice(-8).join(' | ');
          if (tail) status(`${p} (${m}) failed; the guest's console last said: ${tail}`);
          const qemu = guest.vm.stderrTail.trim();
          if (qemu) status(`QEMU said: ${qemu.split('\n').slice(-4).join(' | ')}`);
          throw e;
        }
      };
      if (!rig.io.relay) throw new RubatoError('RUBATO_CONFIG', 'the guest has no NIC behind the relay');
      const io = { relay: rig.io.relay, nbd: rig.io.nbd };
      // Unreplicated once per probe (a warm-up that also sizes redis-benchmark), then U P U P … per probe.
      for (const p of probes) await run(p, 'unreplicated');
      const before = new Map<Probe, ClientRun>();
      for (const p of probes) before.set(p, await run(p, 'unreplicated'));
      for (const policy of policies)
        for (const mode of modes) {
          status(`${cpus} vCPU: ${policy} (${mode}): synchronising the standby`);
          const latency = new LatencyBreakdown();
          const prot = await protect(
            rig.vm,
            dir,
            `svc-${cpus}-${policy}-${mode}`.replace(/[^a-z0-9-]/gi, ''),
            policy,
            io,
            undefined,
            undefined,
            latency,
            'memory',
            mode,
          );
          const during = await whileProtected(prot, async () => {
            await sleep(500);
            const out: Array<{
              p: Probe;
              r: ClientRun;
              s: ReturnType<typeof summarise>;
              b: Breakdown | null;
              c: {
                mismatchesPerSec: number;
                comparedPerSec: number;
                comparedWaitMsP50: number | null;
                mirroredMB: number;
                resentMB: number;
                mismatchKinds: Record<string, number>;
              };
              cores: CpuShare;
            }> = [];
            const counts = () => {
              const snap = prot.snapshot();
              const c = snap['compare'] as CompareCounts | undefined;
              return {
                mismatches: c?.mismatches ?? 0,
                kinds: { ...c?.kinds },
                compared: (snap['output'] as { compared: number }).compared,
                // (how long the latest matched frames waited for the secondary's copy, median)
                comparedWaitMs: (snap['outputWaitMsP50'] as { compared: number | null } | undefined)?.compared ?? null,
                input: (snap['input'] as { mirroredBytes: number; resentBytes: number } | undefined) ?? {
                  mirroredBytes: 0,
                  resentBytes: 0,
                },
              };
            };
            for (const p of probes) {
              // A warm-up of the probe's load under protection, the same in every mode: --mode auto
              // settles on a plan for the new load here (a trial takes about 9 s), as it would once
              // in a service's long run, so the measured run shows the plan it settled on.
              await run(p, 'replicated', warmSeconds);
              const n0 = prot.events.length;
              latency.reset();
              const t0 = performance.now();
              const k0 = counts();
              const cpu = cpuWindow({ guest: guest.vm.pid, standby: prot.standbyPid });
              const r = await run(p, 'replicated');
              const cores = cpu.end();
              const secs = (performance.now() - t0) / 1000;
              const k1 = counts();
              const b = latency.frames ? latency.summary() : null;
              const c = {
                mismatchesPerSec: round((k1.mismatches - k0.mismatches) / secs, 1),
                comparedPerSec: round((k1.compared - k0.compared) / secs, 1),
                comparedWaitMsP50: k1.comparedWaitMs,
                mirroredMB: round((k1.input.mirroredBytes - k0.input.mirroredBytes) / 1e6, 1),
                resentMB: round((k1.input.resentBytes - k0.input.resentBytes) / 1e6, 1),
                mismatchKinds: Object.fromEntries(
                  Object.entries(k1.kinds)
                    .map(([k, v]) => [k, v - ((k0.kinds as Record<string, number>)[k] ?? 0)] as const)
                    .filter(([, v]) => v > 0),
                ),
              };
              const s = summarise(prot.events.slice(n0), secs);
              out.push({ p, r, s, b, c, cores });
              status(
                `  ${p} under ${policy} (${mode}): ${round(r.perSec)}/s, p50 ${r.p50Ms} ms, p99 ${r.p99Ms} ms${r.errors ? `, ${r.errors} errors${r.errorKinds ? ` (${r.errorKinds})` : ''}` : ''}${
                  mode !== 'buffer'
                    ? `, ${c.comparedPerSec} frames/s matched (after ${c.comparedWaitMsP50 ?? '-'} ms, median; input mirrored ${c.mirroredMB} MB, ${c.resentMB} MB of it again at checkpoints), ${c.mismatchesPerSec} mismatches/s${
                        c.mismatchesPerSec
                          ? ` (${Object.entries(c.mismatchKinds)
                              .map(([k, v]) => `${k} ${v}`)
                              .join(', ')})`
                          : ''
                      }`
                    : ''
                }`,
              );
              if (b) status(`    released frames: ${formatBreakdown(b)}`);
              status(
                `    paused ${round(s.pausedFraction * 100, 1)} % of the time, ${s.checkpointsPerSec} ckpt/s, pause median ${s.pauseMsMedian} ms with ${s.pausePagesMedian} pages${s.pauseFit ? ` (fit: ${s.pauseFit.fixedMs} ms + ${s.pauseFit.usPerPage} µs per page)` : ''}`,
              );
              status(
                `    cores: guest ${cores.guest}, primary ${cores.primary}, standby ${cores.standby}, other ${cores.other}${mode !== 'buffer' ? ' (the secondary VM, a child of the standby, counts here)' : ''}, idle ${cores.idle}`,
              );
            }
            return out;
          });
          for (const { p, r, s, b, c, cores } of during) {
            const u0 = before.get(p)!;
            const u1 = await run(p, 'unreplicated');
            before.set(p, u1);
            const uRate = (u0.perSec + u1.perSec) / 2;
            cells.push({
              service: SERVICE_OF[p],
              probe: p,
              policy,
              mode,
              cpus,
              throughputRatio: round(r.perSec / uRate, 3),
              ...c,
              perSec: round(r.perSec, 1),
              perSecUnreplicated: round(uRate, 1),
              p50Ms: r.p50Ms,
              p99Ms: r.p99Ms,
              p50MsUnreplicated: round((u0.p50Ms + u1.p50Ms) / 2, 3),
              p99MsUnreplicated: round((u0.p99Ms + u1.p99Ms) / 2, 3),
              errors: r.errors,
              ...(r.errorKinds ? { errorKinds: r.errorKinds } : {}),
              checkpointsPerSec: s.checkpointsPerSec,
              pausedFraction: s.pausedFraction,
              pauseMsMedian: s.pauseMsMedian,
              pausePagesMedian: s.pausePagesMedian,
              pauseFit: s.pauseFit,
              mbShipped: s.mbShipped,
              pageRefs: s.pageRefs,
              cores,
              ...(b ? { latencyBreakdown: b } : {}),
            });
          }
        }
    } finally {
      await stopKvRig(rig);
      removeTempDir(dir);
    }
  }
  // The headline per service: the default policy on 1 vCPU, throughput as the mean of its probes.
  const headline = (service: ServiceCell['service']) => {
    const cs = cells.filter(
      (c) => c.service === service && c.policy === policies[0] && c.mode === modes[0] && c.cpus === cpuCounts[0],
    );
    if (!cs.length) return null;
    const first = cs[0]!;
    return {
      throughputRatio: round(cs.reduce((a, c) => a + c.throughputRatio, 0) / cs.length, 3),
      p50Ms: first.p50Ms,
      p50MsUnreplicated: first.p50MsUnreplicated,
      p99Ms: first.p99Ms,
      p99MsUnreplicated: first.p99MsUnreplicated,
      checkpointsPerSec: first.checkpointsPerSec,
      pausedFraction: first.pausedFraction,
      errors: cs.reduce((a, c) => a + c.errors, 0),
      ...(service === 'upload'
        ? {
            mbPerSec: round((first.perSec * UPLOAD_VALUE_BYTES) / 1e6, 1),
            mbPerSecUnreplicated: round((first.perSecUnreplicated * UPLOAD_VALUE_BYTES) / 1e6, 1),
          }
        : {}),
      probes: Object.fromEntries(
        cs.map((c) => [
          c.probe,
          {
            throughputRatio: c.throughputRatio,
            perSec: c.perSec,
            perSecUnreplicated: c.perSecUnreplicated,
            p50Ms: c.p50Ms,
            p50MsUnreplicated: c.p50MsUnreplicated,
            p99Ms: c.p99Ms,
            p99MsUnreplicated: c.p99MsUnreplicated,
            ...(c.latencyBreakdown ? { heldMsMean: breakdownMeans(c.latencyBreakdown) } : {}),
          },
        ]),
      ),
    };
  };
  // The clients' view of a failover is part of the whole run; a run narrowed to some probes skips it.
  let failover: Awaited<ReturnType<typeof runFailoverUnderLoad>> | null = null;
  if (!o.probes) {
    status('failover as the clients see it: wrk, then redis-benchmark, while the primary host dies');
    failover = await runFailoverUnderLoad({ accel: o.accel, seconds: o.quick ? 15 : 30, onStatus: status });
  }
  mkdirSync(o.outDir, { recursive: true });
  const file = join(o.outDir, 'services.json');
  const summary = {
    benchmark: 'services',
    policy: policies[0],
    cpus: cpuCounts[0],
    seconds,
    pgbenchScale: scale,
    redis: headline('redis'),
    nginx: headline('nginx'),
    postgres: headline('postgres'),
    upload: headline('upload'),
    failover,
    results: file,
    // Per service and mode (the first policy, the first vCPU count): the modes side by side.
    modes: Object.fromEntries(
      (['redis', 'nginx', 'postgres', 'upload'] as const).map((service) => [
        service,
        Object.fromEntries(
          modes.map((mode) => {
            const cs = cells.filter(
              (c) => c.service === service && c.mode === mode && c.policy === policies[0] && c.cpus === cpuCounts[0],
            );
            const first = cs[0];
            return [
              mode,
              first
                ? {
                    throughputRatio: round(cs.reduce((a, c) => a + c.throughputRatio, 0) / cs.length, 3),
                    p50Ms: first.p50Ms,
                    p50MsUnreplicated: first.p50MsUnreplicated,
                    p99Ms: first.p99Ms,
                    mismatchesPerSec: round(cs.reduce((a, c) => a + c.mismatchesPerSec, 0) / cs.length, 1),
                    comparedPerSec: round(cs.reduce((a, c) => a + c.comparedPerSec, 0) / cs.length, 1),
                    checkpointsPerSec: first.checkpointsPerSec,
                    errors: cs.reduce((a, c) => a + c.errors, 0),
                    cores: first.cores,
                    linkMBPerSec: round(first.mbShipped / seconds, 1),
                  }
                : null,
            ];
          }),
        ),
      ]),
    ),
  };
  writeFileSync(file, JSON.stringify({ summary, cells, failover }, null, 2));
  await writeServicesReport(o.outDir, cells, {
    seconds,
    scale,
    command: `npm run bench -- services${o.quick ? ' --quick' : ''}`,
    ...(failover ? { failover } : {}),
  });
  return { summary, file, cells };
}

/** The anchors' published numbers on real services (../shared/ANCHORS.md; sources in docs/evaluation.md). */
const ANCHOR_LINES = [
  'Remus (NSDI 2008): large slowdowns on network-bound workloads at 20–40 checkpoints/s (fixed 25 ms epochs, as `fixed:25ms` here).',
  'RemusDB (VLDB J.): plain Remus costs databases up to 32 % of their throughput.',
  'IBM micro-checkpointing (QEMU, 2014): 25–50 % penalty on a 4 GB Java server over 10 GbE (fixed 100 ms).',
  "VMware FT: < 10 % slowdown (1 vCPU, record/replay). RRC (ATC'22, containers): < 0.4 ms added response delay, overhead < 48 %.",
];

/** results/services.md: the table per probe, policy and vCPU count, a grouped-bar figure, the anchors. */
export async function writeServicesReport(
  outDir: string,
  cells: readonly ServiceCell[],
  o: { seconds: number; scale: number; command: string; failover?: readonly FailoverUnderLoad[] },
): Promise<string> {
  const md: string[] = [
    '# Real services under Rubato',
    '',
    `Debian 12 guest (1 GiB) booted from its disk; redis-server, nginx-light and PostgreSQL 15 measured by Debian's stock clients from the client namespace: \`redis-benchmark\` (50 clients, SET and GET, 64-byte values), \`wrk\` (64 connections, 2 threads, a 4 KiB and a 100 KiB page), \`pgbench\` (TPC-B-like, 8 clients, scale ${o.scale}), and an inbound bulk upload (\`upload-100mb\`: \`redis-benchmark\` SETs of 100 KiB, 1000 over 4 connections, ~100 MB into the guest, whose TCP acknowledgements are output held like any reply). ${o.seconds} s per client run; each policy's phase sits between unreplicated phases of the same booted guest; ratios are to their mean. Latencies are the clients' own (pgbench: its per-transaction log). Command: \`${o.command}\`.`,
    '',
    '| vCPUs | policy | probe | ratio | req/s (unreplicated) | p50 ms (unrepl.) | p99 ms (unrepl.) | ckpt/s | paused | MB shipped | errors |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const c of cells) {
    md.push(
      `| ${c.cpus} | ${variant(c)} | ${c.probe} | ${c.throughputRatio} | ${c.perSec} (${c.perSecUnreplicated}) | ${c.p50Ms} (${c.p50MsUnreplicated}) | ${c.p99Ms} (${c.p99MsUnreplicated}) | ${c.checkpointsPerSec} | ${(c.pausedFraction * 100).toFixed(1)} % | ${c.mbShipped} | ${c.errors} |`,
    );
  }
  const figs: string[] = [];
  for (const cpus of [...new Set(cells.map((c) => c.cpus))]) {
    const probes = [...new Set(cells.map((c) => c.probe))];
    const groups = probes.map((p) => ({
      category: p,
      values: cells
        .filter((c) => c.cpus === cpus && c.probe === p)
        .map((c) => ({ label: variant(c), value: c.throughputRatio })),
    }));
    const name = `services-throughput-${cpus}vcpu`;
    const svg = barChart(groups, {
      title: `Throughput vs unreplicated, ${cpus} vCPU (stock clients)`,
      xLabel: 'service and client',
      yLabel: 'throughput ratio (1 = unreplicated)',
      reference: { value: 1, label: 'unreplicated' },
    });
    writeFileSync(join(outDir, `${name}.svg`), svg);
    writeFileSync(join(outDir, `${name}.png`), await svgToPng(svg));
    figs.push(`![${name}](${name}.svg)`);
    const lat = probes.map((p) => ({
      category: p,
      values: [
        { label: 'unreplicated', value: cells.find((c) => c.cpus === cpus && c.probe === p)?.p50MsUnreplicated ?? 0 },
        ...cells.filter((c) => c.cpus === cpus && c.probe === p).map((c) => ({ label: variant(c), value: c.p50Ms })),
      ],
    }));
    const lname = `services-latency-${cpus}vcpu`;
    const lsvg = barChart(lat, {
      title: `Median latency as the client saw it, ${cpus} vCPU`,
      xLabel: 'service and client',
      yLabel: 'p50 latency (ms)',
    });
    writeFileSync(join(outDir, `${lname}.svg`), lsvg);
    writeFileSync(join(outDir, `${lname}.png`), await svgToPng(lsvg));
    figs.push(`![${lname}](${lname}.svg)`);
    // Where a released output frame's time went (segment means add up to the mean hold).
    const held = cells.filter((c) => c.cpus === cpus && c.latencyBreakdown);
    if (held.length) {
      const bars = held.map((c) => ({
        category: `${c.probe} · ${variant(c)}`,
        values: SEGMENTS.map((k) => ({ label: k, value: c.latencyBreakdown![k].mean })),
      }));
      const bname = `services-held-${cpus}vcpu`;
      const bsvg = stackedBarChart(bars, {
        title: `Where a released output frame waited, ${cpus} vCPU (mean ms per segment)`,
        xLabel: 'ms from the guest sending a frame to the frame leaving',
      });
      writeFileSync(join(outDir, `${bname}.svg`), bsvg);
      writeFileSync(join(outDir, `${bname}.png`), await svgToPng(bsvg));
      figs.push(`![${bname}](${bname}.svg)`);
    }
  }
  md.push('', ...figs.flatMap((f) => [f, '']));
  if (o.failover?.length) {
    md.push(
      '## Failover as the clients saw it',
      '',
      "The primary host killed (controller, QEMU, relay, disk server) a third into the client's run; `model` policy, timeout 500 ms, no witness. The longest stall is the slowest request the client reported.",
      '',
      '| client | failover (ms) | requests | errors | longest stall (ms) | req/s over the run |',
      '|---|---|---|---|---|---|',
      ...o.failover.map(
        (f) => `| ${f.client} | ${f.failoverMs} | ${f.requests} | ${f.errors} | ${f.longestStallMs} | ${f.perSec} |`,
      ),
      '',
    );
  }
  md.push('## Next to the anchors', '', ...ANCHOR_LINES.map((l) => `- ${l}`), '');
  const file = join(outDir, 'services.md');
  writeFileSync(file, md.join('\n'));
  return file;
}

/** What a stock client saw while the primary host died under it. */
export interface FailoverUnderLoad {
  client: 'wrk' | 'redis-benchmark';
  failoverMs: number;
  requests: number;
  errors: number;
  longestStallMs: number;
  perSec: number;
}

/** wrk's "Latency avg stdev max" line: the slowest request (the longest stall a connection saw). */
export function wrkMaxLatencyMs(out: string): number {
  const m = /^\s*Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)\s/m.exec(out);
  return m ? round(toMs(m[1]!, m[2]!), 1) : Number.NaN;
}

/**
 * Failover as clients see it: the Debian guest protected (model policy) with a standby on a second
 * host; `wrk` (nginx, 4 KiB page) and then `redis-benchmark` (SET) run while the primary host is
 * killed (controller, QEMU, relay and disk server, no goodbye) a few seconds in. The clients' own
 * counts: requests, errors, the slowest request (the longest stall). After the first failover the
 * guest is protected again by a standby on the old host, for the second.
 */
export async function runFailoverUnderLoad(o: {
  accel: Accel;
  seconds: number;
  onStatus?: (s: string) => void;
}): Promise<FailoverUnderLoad[]> {
  const status = o.onStatus ?? (() => {});
  await ensureServiceClients();
  const dir = makeTempDir('rubato-svcfo-');
  let rig: KvRig | null = null;
  const stops: Array<() => Promise<void>> = [];
  const out: FailoverUnderLoad[] = [];
  try {
    status('booting the Debian guest for the failover runs');
    rig = await startDebianRig(dir, o.accel, 'svcfo');
    const psk = randomBytes(32);
    let live = { vm: rig.vm, io: rig.io, host: 0 };
    for (const [k, clientName] of (['wrk', 'redis-benchmark'] as const).entries()) {
      const other = rig.hosts[1 - live.host]!;
      let nextIo: GuestIo | null = null;
      let failoverAt = 0;
      const standby = standbySide({
        listen: { host: '127.0.0.1', port: 0 },
        gate: null, // (one pair on one machine, measuring a failover under load: no witness)
        stateDir: join(dir, `sb${k}`),
        psk,
        heartbeatMs: 50,
        timeoutMs: 500,
        fsync: false,
        binaryFor: async () => rig!.binary,
        onEvent: (e) => {
          if (e.event === 'failover') failoverAt = e.runningAtMs;
        },
        restoreIo: async (_id, store) => {
          const io = await GuestIo.start(other, dir, `fo${k}`, store.imagePath(DISK_BLOCK_ID), await ensureTapRelay());
          nextIo = io;
          return {
            relay: io.relay,
            netSockets: [io.netSocket],
            nbdSockets: io.nbdSocket ? [io.nbdSocket] : [],
            close: async () => {
              if (nextIo === io) nextIo = null;
              await io.close();
            },
          };
        },
      });
      await standby.start();
      stops.push(() => standby.stop());
      let protectedNow = false;
      const { primary } = startPrimarySide({
        vm: live.vm,
        runDir: dir,
        standby: { host: '127.0.0.1', port: standby.boundPort },
        psk,
        heartbeatMs: 50,
        timeoutMs: 500,
        retryMs: 300,
        io: { relay: live.io.relay, nbds: live.io.nbd ? [live.io.nbd] : [] },
        ownership: null,
        policy: parsePolicy('model'),
        onEvent: (e) => {
          if (e.event === 'protecting') protectedNow = true;
        },
      });
      stops.push(() => primary.stop());
      await waitFor(() => protectedNow, 120_000, 'protection of the guest');
      status(`${clientName} against the guest; the primary host dies ${Math.round(o.seconds / 3)} s in`);
      const ip = rig.lan.guestIp;
      const run =
        clientName === 'wrk'
          ? client(
              rig.lan,
              'wrk',
              ['-t', '2', '-c', '64', '-d', `${o.seconds}s`, '--latency', '--timeout', '30s', `http://${ip}/4k.html`],
              (o.seconds + 90) * 1000,
            )
          : client(
              rig.lan,
              'redis-benchmark',
              ['-h', ip, '-c', '50', '-n', String(1500 * o.seconds), '-t', 'set', '-d', '64', '-r', '100000', '--csv'],
              (o.seconds + 300) * 1000,
            );
      await sleep((o.seconds / 3) * 1000);
      const killAt = Date.now();
      await primary.crash();
      await live.io.close().catch(() => {});
      const text = await run;
      const r = clientName === 'wrk' ? parseWrk(text) : parseRedisCsv(text).get('SET')!;
      const requests = clientName === 'wrk' ? Number(/(\d+) requests in/.exec(text)?.[1] ?? 0) : 1500 * o.seconds;
      const longest =
        clientName === 'wrk'
          ? wrkMaxLatencyMs(text)
          : Number(
              text
                .split('\n')
                .find((l) => l.startsWith('"SET"'))
                ?.split(',')
                .at(-1)
                ?.replace(/"/g, '') ?? Number.NaN,
            );
      out.push({
        client: clientName,
        failoverMs: failoverAt ? failoverAt - killAt : -1,
        requests,
        errors: r.errors,
        longestStallMs: round(longest, 1),
        perSec: round(r.perSec, 1),
      });
      status(
        `  ${clientName}: failover ${failoverAt - killAt} ms, ${requests} requests, ${r.errors} errors, longest stall ${round(longest, 1)} ms`,
      );
      if (!standby.vm || !nextIo) throw new RubatoError('RUBATO_PEER_LOST', 'no failover happened');
      live = { vm: standby.vm, io: nextIo, host: 1 - live.host };
      standby.vm = null;
      await standby.stop();
      stops.push(
        () => live.vm.stop(),
        () => (nextIo ? nextIo.close().catch(() => {}) : Promise.resolve()),
      );
    }
  } finally {
    for (const s of stops.reverse()) await s().catch(() => {});
    if (rig) {
      await rig.vm.stop();
      await rig.io.close().catch(() => {});
      await rig.lan.destroy();
    }
    removeTempDir(dir);
  }
  return out;
}

/** A cell's policy, with its release mode when it is not the default. */
const variant = (c: ServiceCell): string => (c.mode === 'compare' ? `${c.policy} · compare` : c.policy);
