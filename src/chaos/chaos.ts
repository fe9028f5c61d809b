// `rubato chaos`: the Jepsen-style check. A KV service in the protected guest, a client in its own
// namespace writing over persistent TCP connections, and the primary host killed at random moments
// again and again; each failover's guest becomes the next primary, protected by a fresh standby
// on the other host. At the end every acknowledged write must be readable with its value. Each
// host is a process of its own (chaos-host.ts): it dies, or freezes, as a whole host does.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes, randomInt } from 'node:crypto';
import {
  makeTempDir,
  removeTempDir,
  logger,
  median,
  percentile,
  round,
  sleep,
  waitFor,
  RubatoError,
} from '../util/index.ts';
import { ensurePackages, ensureServiceClients } from '../setup/index.ts';
import type { AccelChoice } from '../qemu/index.ts';
import type { LanHost } from '../io/index.ts';
import type { ReleaseMode } from '../replication/index.ts';
import { LocalEtcd } from '../coord/index.ts';
import type { CompareCounts } from '../commit/index.ts';
import { ThreadedProxy } from './fault-proxy.ts';
import { planDebianRig } from './debian-rig.ts';
import { clientProcess, planKvRig, type RigPlan } from './kv-rig.ts';
import { HostProc, type Timed } from './host-proc.ts';
import { SplitBrainDetector } from './split-brain.ts';

const log = logger('chaos');

export const FAULTS = [
  'kill',
  'partition',
  'isolate',
  'corrupt',
  'standby-kill',
  'standby-isolate',
  'capture',
  'etcd-down',
  'secondary-kill',
  'pause',
] as const;
export type Fault = (typeof FAULTS)[number];

export interface ChaosOptions {
  /** Rounds; each injects one fault, taken in turn from `faults`. */
  rounds: number;
  faults: readonly Fault[];
  seconds: number;
  timeoutMs: number;
  accel: AccelChoice;
  conns: number;
  policy: string;
  /** buffer, or compare (a secondary VM on the standby; a reply leaves once it sent the same). */
  mode?: ReleaseMode;
  /** Witness lease TTL, seconds. */
  leaseTtl?: number;
  onStatus?: (s: string) => void;
  /**
   * false: no witness (any standby that stops hearing its primary takes over) — shows what the detector sees without
   * one.
   */
  witness?: boolean;
  /**
   * The service written to: the test guest's KV store (default), or PostgreSQL (rows inserted by psql sessions) or
   * Redis (appendfsync always) in the Debian guest.
   */
  service?: ChaosService;
}

export const CHAOS_SERVICES = ['kv', 'postgres', 'redis'] as const;
export type ChaosService = (typeof CHAOS_SERVICES)[number];
/** Where each service listens and which client writes to it (same contract: acks as JSON lines, --verify FILE). */
const SERVICE_CLIENT: Record<ChaosService, { port: number; script: string; args?: string[] }> = {
  kv: { port: 7000, script: join('src', 'chaos', 'kv-client.ts') },
  postgres: { port: 5432, script: join('src', 'chaos', 'sql-client.ts') },
  redis: { port: 6379, script: join('src', 'chaos', 'kv-client.ts'), args: ['--proto', 'redis'] },
};

export interface RoundResult {
  fault: Fault;
  variant: string;
  failover: boolean;
  failoverMs: number | null;
  reprotectMs: number | null;
  /** Compare mode: the standby promoted its running secondary (else it restored the replica). */
  promoted?: boolean;
  /** pause: from the old primary's thaw to its guest stopped by itself. */
  stoppedAfterThawMs?: number;
  /** Compare mode: the primary's comparison counts before the fault. */
  compare?: CompareCounts;
  /** Compare mode: the standby's secondary (loads, frames in and out) before the fault. */
  secondary?: object;
  ckptPerSec?: number;
  /** Compare mode: why the primary's checkpoints were taken (the scheduler's reasons, counted). */
  reasons?: Record<string, number>;
  /** Compare mode: the median wait of held frames, by how they left. */
  waitMsP50?: object;
  primary: string;
}

export interface ChaosResult {
  rounds: number;
  byFault: Record<Fault, number>;
  failovers: number;
  splitBrain: number;
  lost: number;
  acknowledged: number;
  reprotected: number;
  kills: number;
  lostKeys: string[];
  connectionsSurvived: number;
  connectionsTotal: number;
  failoverMsMedian: number;
  /** The median failover time per fault that caused failovers (after `kill`: the primary host's crash). */
  failoverMsMedianByFault: Partial<Record<Fault, number>>;
  failoverMs: number[];
  /** Held frames released by an acknowledgement, and (compare mode) by the secondary's matching frame, over the rounds. */
  framesReleased: number;
  framesCompared: number;
  latencyMsP50: number;
  latencyMsP99: number;
  accel: string;
  detail: RoundResult[];
  error?: string;
}

/** One host of the chaos pair: its LAN namespace, its own way to the witness (which a fault can cut), its process. */
interface ChaosHost {
  lan: LanHost;
  name: string;
  etcdProxy: ThreadedProxy;
  /** The host's process (null: the host is down, as after a kill, until it is needed again). */
  proc: HostProc | null;
}

type Ev = Timed<Record<string, unknown>>;

/** The protection of the live copy: a standby on the other host reached through a link that faults can cut or corrupt. */
interface Pair {
  link: ThreadedProxy;
  /** The standby's host. */
  host: ChaosHost;
  /** The primary's, the standby's and the primary's guard's events since the pair formed. */
  pEvents: Ev[];
  sEvents: Ev[];
  gEvents: Ev[];
}

export async function runChaos(o: ChaosOptions): Promise<ChaosResult> {
  if (o.faults.includes('secondary-kill') && (o.mode ?? 'buffer') === 'buffer')
    throw new RubatoError(
      'RUBATO_CONFIG',
      'the fault secondary-kill needs compare or auto mode (buffer mode runs no secondary)',
    );
  const status = o.onStatus ?? (() => {});
  const ttl = o.leaseTtl ?? 1;
  const res: ChaosResult = {
    rounds: 0,
    byFault: Object.fromEntries(FAULTS.map((f) => [f, 0])) as Record<Fault, number>,
    failovers: 0,
    splitBrain: -1,
    lost: -1,
    acknowledged: 0,
    reprotected: 0,
    kills: 0,
    lostKeys: [],
    connectionsSurvived: 0,
    connectionsTotal: 0,
    failoverMsMedian: Number.NaN,
    failoverMsMedianByFault: {},
    failoverMs: [],
    framesReleased: 0,
    framesCompared: 0,
    latencyMsP50: Number.NaN,
    latencyMsP99: Number.NaN,
    accel: o.accel,
    detail: [],
  };
  const dir = makeTempDir('rubato-chaos-');
  let plan: RigPlan | null = null;
  let etcd: LocalEtcd | null = null;
  const hosts: ChaosHost[] = [];
  let pair: Pair | null = null;
  let client: ReturnType<typeof clientProcess> | null = null;
  let detector: SplitBrainDetector | null = null;
  const proxies: ThreadedProxy[] = [];
  try {
    await ensurePackages();
    etcd = await LocalEtcd.start(join(dir, 'witness'));
    const etcdPort = Number(new URL(etcd.url).port);
    const service = o.service ?? 'kv';
    const svc = SERVICE_CLIENT[service];
    if (service !== 'kv') await ensureServiceClients(); // psql for the clients
    plan = service === 'kv' ? await planKvRig(dir, o.accel, 'chaos') : await planDebianRig(dir, o.accel, 'chaos');
    res.accel = plan.accel;
    const { lan, guest } = plan;
    for (const h of plan.hosts) {
      const etcdProxy = new ThreadedProxy(etcdPort);
      proxies.push(etcdProxy);
      await etcdProxy.listen();
      hosts.push({ lan: h, name: h.name, etcdProxy, proc: null });
    }
    const withWitness = o.witness ?? true;
    const vmName = guest.spec.name;
    const psk = randomBytes(32);
    /** The host's process, started when the host is (back) up. */
    const hostUp = async (h: ChaosHost): Promise<HostProc> => {
      if (h.proc?.alive) return h.proc;
      h.proc = await HostProc.start({
        name: h.name,
        lan: h.lan,
        etcdUrl: `http://127.0.0.1:${h.etcdProxy.port}`,
        dir,
        binary: guest.binary,
        tapRelay: guest.tapRelay,
        psk,
        vmName,
        ttl,
        witness: withWitness,
      });
      return h.proc;
    };
    const procOf = (h: ChaosHost): HostProc => {
      if (!h.proc?.alive) throw new RubatoError('RUBATO_PROTOCOL', `${h.name} is down`);
      return h.proc;
    };
    // The first live copy: the guest booted on the first host, which claims the VM.
    let live: ChaosHost = hosts[0]!;
    await (await hostUp(live)).call({ op: 'boot', guest }, guest.readyMs + 60_000);
    detector = await SplitBrainDetector.start(
      lan,
      hosts.map((h) => h.lan),
      guest.spec.mac!,
    );
    status(
      `${({ kv: 'KV', postgres: 'PostgreSQL', redis: 'Redis (appendfsync always)' } as const)[service]} guest up at ${lan.guestIp} on ${live.name}; witness ${etcd.url}; faults ${o.faults.join(',')}, ${o.rounds} rounds`,
    );
    const total = o.rounds * (o.seconds + 25) + 120;
    client = clientProcess(
      lan,
      [
        '--target',
        `${lan.guestIp}:${svc.port}`,
        '--conns',
        String(o.conns),
        '--seconds',
        String(total),
        ...(svc.args ?? []),
      ],
      svc.script,
    );
    const kills: Array<{ killAt: number; runningAt: number }> = [];
    const acks = () => client!.events.filter((e) => e.type === 'ack').length;

    /** Protects the live copy with a standby on the other host (a new pair after every failover). */
    const protect = async (l: ChaosHost, round: number): Promise<Pair> => {
      const other = hosts.find((h) => h !== l)!;
      other.etcdProxy.heal(); // the other host is (back) up
      const sp = await hostUp(other);
      const lp = procOf(l);
      const pEvents: Ev[] = [];
      const gEvents: Ev[] = [];
      const sEvents: Ev[] = [];
      lp.pEvents = pEvents;
      lp.gEvents = gEvents;
      sp.sEvents = sEvents;
      const { port } = await sp.call<{ port: number }>({ op: 'standby', round, timeoutMs: o.timeoutMs });
      const link = new ThreadedProxy(port);
      try {
        await link.listen();
      } catch (e) {
        await sp.stop(); // nothing of a pair that never formed outlives it
        other.proc = null;
        throw e;
      }
      await lp.call({
        op: 'primary',
        standbyPort: link.port,
        policy: o.policy,
        mode: o.mode ?? 'buffer',
        timeoutMs: o.timeoutMs,
      });
      return { link, host: other, pEvents, sEvents, gEvents };
    };
    const event = (events: Ev[], name: string, since = 0) => events.find((e) => e['event'] === name && e.t >= since);
    const protectedSince = async (q: Pair, since: number, what: string) =>
      waitFor(() => event(q.pEvents, 'protecting', since), 120_000, what);
    const secondaryRunning = async (q: Pair, what: string) =>
      waitFor(
        async () => {
          const st = ((await procOf(q.host).status()).standby?.['secondary'] as { state?: string } | undefined)?.state;
          if (st === 'failed') throw new RubatoError('RUBATO_SECONDARY', `${what}: the secondary failed`);
          return st === 'running' ? true : undefined;
        },
        120_000,
        what,
        200, // (each poll asks the host over its channel)
      );
    const noFailoverFor = async (q: Pair, ms: number) => {
      await sleep(ms);
      return !event(q.sEvents, 'failover');
    };
    const guestExited = async (h: ChaosHost) => (await procOf(h).status()).guestExited === true;

    for (let k = 1; k <= o.rounds; k++) {
      const fault = o.faults[(k - 1) % o.faults.length]!;
      const l = live;
      const q: Pair = pair ?? (await protect(l, k));
      pair = q;
      await protectedSince(q, 0, `protection before round ${k}`);
      // Compare mode protects fully once the standby's secondary runs (until then the replica is restored).
      if (o.mode && o.mode !== 'buffer') await secondaryRunning(q, `the secondary before round ${k}`);
      const runMs = randomInt(Math.floor(o.seconds * 500), Math.floor(o.seconds * 1500) + 1);
      const acksBefore = acks();
      await sleep(runMs);
      const variant =
        fault === 'isolate'
          ? res.byFault.isolate % 2 === 0
            ? 'etcd'
            : 'etcd+link'
          : (
              {
                kill: 'host',
                partition: 'link',
                corrupt: 'bit',
                'standby-kill': 'host',
                'standby-isolate': 'etcd',
                capture: 'mid-epoch',
                'etcd-down': 'stopped',
                'secondary-kill': 'qemu',
                pause: 'host',
              } as const
            )[fault];
      status(
        `round ${k}/${o.rounds}: ${fault} (${variant}) of ${fault.startsWith('standby') ? `the standby ${q.host.name}` : l.name} after ${(runMs / 1000).toFixed(1)} s, ${acks() - acksBefore} writes acknowledged meanwhile`,
      );
      res.byFault[fault]++;
      res.rounds++;
      // How the primary's output left in this round (compare mode: how much of it its secondary matched).
      const snap = (await procOf(l).status()).snapshot ?? {};
      const secondary = (await procOf(q.host).status()).standby?.['secondary'];
      const out = snap['output'] as { released: number; compared: number };
      res.framesReleased += out.released;
      res.framesCompared += out.compared;
      const faultAt = Date.now();
      let expectFailover = false;
      const round: RoundResult = {
        fault,
        variant,
        failover: false,
        failoverMs: null,
        reprotectMs: null,
        primary: l.name,
        ...(snap['compare'] ? { compare: snap['compare'] as CompareCounts } : {}),
        ...(secondary ? { secondary: secondary as object } : {}),
        ...(snap['compare']
          ? {
              ckptPerSec: snap['ckptPerSec'] as number,
              reasons: lastReasons(q.pEvents),
              waitMsP50: snap['outputWaitMsP50'] as object,
            }
          : {}),
      };
      switch (fault) {
        case 'kill':
          // The primary host dies: controller, QEMU, relay, disk server, TAP helper, its lease renewals — no goodbye.
          l.etcdProxy.blackhole();
          await procOf(l).kill();
          l.proc = null;
          res.kills++;
          expectFailover = true;
          break;
        case 'pause':
          // The primary's controller and QEMU freeze past the lease (SIGSTOP: a stalled host, a long pause of the
          // machine under them). The standby takes over; thawed, the old primary must find the newer holder and
          // stop its guest without letting anything out (below).
          await procOf(l).freeze();
          expectFailover = true;
          break;
        case 'partition':
          // Only the replication link: both hosts alive, both on the LAN and on the witness.
          q.link.blackhole();
          if (!withWitness) {
            // Without a witness the standby takes over and both copies answer until the old one is stopped by hand.
            await waitFor(() => event(q.sEvents, 'failover'), 60_000, `failover in round ${k}`);
            await sleep(3000);
            expectFailover = true;
            break;
          }
          if (!(await noFailoverFor(q, Math.max(3 * o.timeoutMs, ttl * 1000 + 2000))))
            throw new RubatoError(
              'RUBATO_PROTOCOL',
              `round ${k}: the standby went live while its primary held the VM (partition)`,
            );
          q.link.heal();
          await protectedSince(q, Date.now(), `re-protection after the partition of round ${k}`);
          round.reprotectMs = Date.now() - faultAt;
          res.reprotected++;
          break;
        case 'isolate':
          l.etcdProxy.blackhole();
          if (variant === 'etcd') {
            // Cut from the witness only: the protected pair runs on, nobody goes live; back, it claims again.
            if (!(await noFailoverFor(q, ttl * 1000 + 2000)))
              throw new RubatoError(
                'RUBATO_PROTOCOL',
                `round ${k}: the standby went live while the pair was healthy (primary cut from the witness)`,
              );
            if (await guestExited(l))
              throw new RubatoError(
                'RUBATO_PROTOCOL',
                `round ${k}: the protected primary stopped its guest when only the witness was out of reach`,
              );
            l.etcdProxy.heal();
            await waitFor(() => event(q.gEvents, 'owner', faultAt), 30_000, `the reclaim after round ${k}`);
          } else {
            // Cut from the witness and from its standby (on the LAN still): it must stop its guest before the standby
            // may claim.
            q.link.blackhole();
            expectFailover = true;
          }
          break;
        case 'corrupt':
          // Flipped bits on the link: the standby refuses the frame, the session restarts, a re-sync — no failover.
          q.link.flipBit(randomInt(64, 64 * 1024));
          await protectedSince(q, faultAt + 1, `re-protection after the corrupted frame of round ${k}`);
          round.reprotectMs = Date.now() - faultAt;
          res.reprotected++;
          if (!(await noFailoverFor(q, o.timeoutMs * 2)))
            throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: a corrupted frame led to a failover`);
          break;
      }
      if (fault === 'standby-kill') {
        // The standby host dies (no goodbye: everything on it is killed at once). The primary runs on, alone,
        // holding the VM.
        q.link.blackhole();
        q.host.etcdProxy.blackhole();
        await procOf(q.host).kill();
        q.host.proc = null;
        await waitFor(
          () => event(q.pEvents, 'unprotected', faultAt),
          30_000,
          `the primary noticing its standby died in round ${k}`,
        );
        await sleep(ttl * 1000 + 1000);
        if (await guestExited(l))
          throw new RubatoError(
            'RUBATO_PROTOCOL',
            `round ${k}: the primary stopped its guest when only its standby died`,
          );
        await procOf(l).call({ op: 'unpair' });
        q.link.close();
        pair = null; // the next round protects it with a fresh standby on the repaired host
      } else if (fault === 'etcd-down' && etcd) {
        // The witness itself stops answering (SIGSTOP of etcd). The pair runs on; the primary's lease
        // lapses, so its output is held at the gate (not lost); a corrupted frame meanwhile
        // re-synchronises the pair without stopping the guest; back, the primary claims the VM again.
        const witnessPid = etcd.pid;
        process.kill(witnessPid, 'SIGSTOP');
        try {
          await sleep(ttl * 1000);
          const flippedAt = Date.now();
          q.link.flipBit(randomInt(64, 64 * 1024));
          await protectedSince(q, flippedAt, `re-protection after a corrupted frame with etcd down in round ${k}`);
          round.reprotectMs = Date.now() - flippedAt;
          res.reprotected++;
          if (!(await noFailoverFor(q, o.timeoutMs * 2)))
            throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: a failover while etcd was down`);
          if (await guestExited(l))
            throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: the guest stopped while only etcd was down`);
        } finally {
          process.kill(witnessPid, 'SIGCONT');
        }
        if (withWitness)
          await waitFor(
            () => event(q.gEvents, 'owner', faultAt),
            30_000,
            `the primary claiming the VM again once etcd was back (round ${k})`,
          );
      } else if (fault === 'standby-isolate') {
        // The standby cut from the witness: a healthy pair does not care.
        q.host.etcdProxy.blackhole();
        const ok = await noFailoverFor(q, ttl * 1000 + 2000);
        if (!ok || !(await procOf(l).status()).protected)
          throw new RubatoError(
            'RUBATO_PROTOCOL',
            `round ${k}: the pair did not stay as it was while its standby was cut from the witness`,
          );
        q.host.etcdProxy.heal();
      } else if (fault === 'secondary-kill') {
        // Compare mode's secondary VM dies (SIGKILL of its QEMU on the standby): its replies stop coming,
        // the primary's wait for checkpoints again; no failover; the standby starts a secondary again.
        const sec = secondary as { pid?: number | null } | undefined;
        if (!sec?.pid) throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: no secondary running to kill`);
        process.kill(sec.pid, 'SIGKILL');
        await waitFor(
          () => q.sEvents.find((e) => e['event'] === 'secondary-running' && e.t > faultAt),
          120_000,
          `the secondary started again after round ${k}`,
        );
        round.reprotectMs = Date.now() - faultAt;
        res.reprotected++;
        const compared = async () =>
          ((await procOf(l).status()).snapshot?.['output'] as { compared: number } | undefined)?.compared ?? 0;
        const comparedAt = await compared();
        await waitFor(
          async () => (await compared()) > comparedAt || undefined,
          30_000,
          `replies matched by the new secondary after round ${k}`,
          200, // (each poll asks the host over its channel)
        );
        if (event(q.sEvents, 'failover'))
          throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: the secondary's death led to a failover`);
      } else if (fault === 'capture') {
        await procOf(l).call({ op: 'fail-capture' });
        await protectedSince(q, faultAt + 1, `re-protection after the capture failure of round ${k}`);
        round.reprotectMs = Date.now() - faultAt;
        res.reprotected++;
        if (!(await noFailoverFor(q, o.timeoutMs * 2)))
          throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: a capture failure led to a failover`);
      }
      if (expectFailover) {
        const fo = await waitFor(() => event(q.sEvents, 'failover'), 60_000, `failover in round ${k}`);
        const runningAtMs = Number(fo['runningAtMs']);
        res.failovers++;
        round.failover = true;
        round.failoverMs = runningAtMs - faultAt;
        round.promoted = fo['promoted'] === true;
        res.failoverMs.push(runningAtMs - faultAt);
        kills.push({ killAt: faultAt, runningAt: runningAtMs });
        if (fault === 'pause') {
          // Thawed after the takeover: the old primary must see it lost the VM and stop its guest by itself.
          const thawedAt = Date.now();
          procOf(l).thaw();
          await waitFor(
            async () => (await guestExited(l)) || undefined,
            15_000,
            `the old primary stopping its guest once thawed (round ${k})`,
            200, // (each poll asks the host over its channel)
          );
          round.stoppedAfterThawMs = Date.now() - thawedAt;
        }
        // The old primary's host is gone for good (isolate, pause: its guest was stopped by its guard); it comes
        // back as a fresh host when the next pair needs a standby.
        await l.proc?.kill();
        l.proc = null;
        q.link.close();
        const other = q.host;
        await procOf(other).call({ op: 'promote' });
        live = other;
        pair = null;
        status(`round ${k}: ${other.name} took over in ${round.failoverMs} ms from checkpoint ${fo['epoch']}`);
      }
      res.detail.push(round);
    }
    // Let the client see the last failover through, then stop it and read everything back.
    const acksAtEnd = acks();
    await waitFor(() => acks() > acksAtEnd + 5 || undefined, 30_000, 'writes after the last round').catch(() => {});
    client.proc.kill('SIGTERM');
    await client.done;
    res.splitBrain = await detector.stop();
    const acked = client.events.filter((e) => e.type === 'ack');
    res.acknowledged = acked.length;
    const lat = acked.map((a) => a.latMs ?? 0);
    res.latencyMsP50 = round(median(lat), 2);
    res.latencyMsP99 = round(percentile(lat, 99), 2);
    const ackFile = join(dir, 'acks.jsonl');
    writeFileSync(ackFile, `${acked.map((a) => JSON.stringify({ key: a.key, value: a.value })).join('\n')}\n`);
    status(`verifying ${acked.length} acknowledged writes by reading them back`);
    const v = clientProcess(
      lan,
      ['--target', `${lan.guestIp}:${svc.port}`, '--verify', ackFile, ...(svc.args ?? [])],
      svc.script,
    );
    await v.done;
    const verdict = v.events.find((e) => e.type === 'verify');
    if (!verdict) throw new RubatoError('RUBATO_PEER_LOST', 'the verification client reported nothing');
    res.lostKeys = verdict.missing ?? [];
    res.lost = res.lostKeys.length;
    // Connections: of those open when a primary died, how many carried on with acknowledged writes.
    const conns = new Map<number, { open: number; end: number }>();
    for (const e of client.events) {
      if (e.type === 'conn' && e.event === 'open') conns.set(e.id!, { open: e.t, end: Number.POSITIVE_INFINITY });
      if (e.type === 'conn' && (e.event === 'broken' || e.event === 'close')) {
        const c = conns.get(e.id!);
        if (c) c.end = Math.min(c.end, e.t);
      }
    }
    for (const kk of kills) {
      for (const [id, c] of conns) {
        if (c.open > kk.killAt || c.end < kk.killAt) continue;
        res.connectionsTotal++;
        if (acked.some((a) => a.conn === id && a.t > kk.runningAt)) res.connectionsSurvived++;
      }
    }
    res.failoverMsMedian = median(res.failoverMs);
    for (const f of FAULTS) {
      const ms = res.detail.filter((d) => d.fault === f && d.failoverMs !== null).map((d) => d.failoverMs!);
      if (ms.length) res.failoverMsMedianByFault[f] = median(ms);
    }
  } catch (e) {
    res.error = e instanceof Error ? e.message : String(e);
    log.error(`chaos failed: ${res.error}`);
  } finally {
    client?.proc.kill('SIGKILL');
    if (detector && res.splitBrain < 0) res.splitBrain = await detector.stop();
    pair?.link.close();
    for (const h of hosts) await h.proc?.stop();
    await plan?.lan.destroy();
    for (const p of proxies) p.close();
    await etcd?.stop();
    removeTempDir(dir);
  }
  return res;
}

/** The scheduler's reasons in the primary's latest decisions event (compare mode's round detail). */
function lastReasons(events: Ev[]): Record<string, number> {
  for (let i = events.length - 1; i >= 0; i--) {
    const e = events[i]!;
    if (e['event'] === 'decisions') return { ...(e['reasons'] as Record<string, number>) };
  }
  return {};
}
