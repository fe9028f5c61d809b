// `rubato chaos`: the Jepsen-style check. A KV service in the protected guest, a client in its own
// namespace writing over persistent TCP connections, and the primary host killed at random moments
// again and again; each failover's guest becomes the next primary, protected by a fresh standby
// on the other host. At the end every acknowledged write must be readable with its value.

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
import { ensurePackages, ensureServiceClients, ensureTapRelay } from '../setup/index.ts';
import type { AccelChoice, QemuVm } from '../qemu/index.ts';
import { type LanHost, GuestIo } from '../io/index.ts';
import {
  type PrimaryController,
  DISK_BLOCK_ID,
  type PrimaryEvent,
  type StandbyController,
  type StandbyEvent,
  type ReleaseMode,
} from '../replication/index.ts';
import { parsePolicy } from '../scheduler/index.ts';
import {
  LocalEtcd,
  EtcdClient,
  Ownership,
  witnessGate,
  type WitnessGate,
  type OwnershipGuard,
} from '../coord/index.ts';
import type { CompareCounts } from '../commit/index.ts';
import { standbySide, startPrimarySide } from '../host/index.ts';
import { ThreadedProxy } from './fault-proxy.ts';
import { startDebianRig } from './debian-rig.ts';
import { clientProcess, startKvRig, stopKvRig, type KvRig } from './kv-rig.ts';
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

/** One host of the chaos pair: its LAN namespace and its own way to the witness (which a fault can cut). */
interface ChaosHost {
  lan: LanHost;
  name: string;
  etcdProxy: ThreadedProxy;
  etcd: EtcdClient;
}

/** The copy of the guest that runs live, and everything of its host that serves it. */
interface LiveCopy {
  host: ChaosHost;
  vm: QemuVm;
  io: GuestIo;
  ownership: Ownership | null;
}

/** The protection of a live copy: a standby on the other host reached through a link that faults can cut or corrupt. */
interface Pair {
  primary: PrimaryController;
  standby: StandbyController;
  link: ThreadedProxy;
  guard: OwnershipGuard | null;
  gate: WitnessGate | null;
  failCaptureOnce: () => void;
  host: ChaosHost;
  pEvents: Array<PrimaryEvent & { t: number }>;
  sEvents: Array<StandbyEvent & { t: number }>;
  gEvents: Array<Record<string, unknown>>;
  nextIo: GuestIo | null;
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
    byFault: {
      kill: 0,
      partition: 0,
      isolate: 0,
      corrupt: 0,
      'standby-kill': 0,
      'standby-isolate': 0,
      capture: 0,
      'etcd-down': 0,
      'secondary-kill': 0,
    },
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
  let rig: KvRig | null = null;
  let etcd: LocalEtcd | null = null;
  let live: LiveCopy | null = null;
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
    rig = service === 'kv' ? await startKvRig(dir, o.accel, 'chaos') : await startDebianRig(dir, o.accel, 'chaos');
    res.accel = rig.accel;
    const lan = rig.lan;
    const hosts: ChaosHost[] = [];
    for (const h of rig.hosts) {
      const etcdProxy = new ThreadedProxy(etcdPort);
      proxies.push(etcdProxy);
      await etcdProxy.listen();
      hosts.push({
        lan: h,
        name: h.name,
        etcdProxy,
        etcd: new EtcdClient([`http://127.0.0.1:${etcdProxy.port}`], 500),
      });
    }
    const withWitness = o.witness ?? true;
    const vmName = rig.vm.spec.name;
    const ownership = withWitness ? new Ownership(hosts[0]!.etcd, vmName, hosts[0]!.name, ttl) : null;
    if (ownership && (await ownership.claim()) === null)
      throw new RubatoError('RUBATO_VM_OWNED', 'the fresh witness refused the first claim');
    live = { host: hosts[0]!, vm: rig.vm, io: rig.io, ownership };
    const psk = randomBytes(32);
    detector = await SplitBrainDetector.start(
      lan,
      hosts.map((h) => h.lan),
      rig.vm.spec.mac!,
    );
    status(
      `${({ kv: 'KV', postgres: 'PostgreSQL', redis: 'Redis (appendfsync always)' } as const)[service]} guest up at ${lan.guestIp} on ${live.host.name}; witness ${etcd.url}; faults ${o.faults.join(',')}, ${o.rounds} rounds`,
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
    const protect = async (l: LiveCopy, round: number): Promise<Pair> => {
      const other = hosts.find((h) => h !== l.host)!;
      other.etcdProxy.heal(); // the other host is (back) up
      const gate = withWitness ? witnessGate(other.etcd, other.name, ttl) : null;
      const pEvents: Pair['pEvents'] = [];
      const sEvents: Pair['sEvents'] = [];
      const gEvents: Pair['gEvents'] = [];
      let nextIo: GuestIo | null = null;
      let guard: OwnershipGuard | null = null;
      let failCapture = false;
      // The product's wiring (host/standby-side.ts): the gate, and the restored guest's frames under its lease.
      const standby = standbySide({
        listen: { host: '127.0.0.1', port: 0 },
        gate,
        stateDir: join(dir, `standby${round}`),
        psk,
        heartbeatMs: 50,
        timeoutMs: o.timeoutMs,
        fsync: false,
        binaryFor: async () => rig!.binary,
        onEvent: (e) => sEvents.push({ ...e, t: Date.now() }),
        restoreIo: async (_id, store, existing) => {
          const io = await GuestIo.start(
            other.lan,
            dir,
            `g${round}`,
            store.blocks.some((b) => b.id === DISK_BLOCK_ID) ? store.imagePath(DISK_BLOCK_ID) : null,
            await ensureTapRelay(),
            existing,
          );
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
      const link = new ThreadedProxy(standby.boundPort);
      try {
        await link.listen();
      } catch (e) {
        await standby.stop(); // nothing of a pair that never formed outlives it
        throw e;
      }
      // The product's wiring (host/primary-side.ts): gate, guard, generation, a dying QEMU's word.
      const side = startPrimarySide({
        vm: l.vm,
        runDir: dir,
        standby: { host: '127.0.0.1', port: link.port },
        psk,
        heartbeatMs: 50,
        timeoutMs: o.timeoutMs,
        retryMs: 300,
        io: { relay: l.io.relay, nbds: l.io.nbd ? [l.io.nbd] : [] },
        policy: parsePolicy(o.policy),
        ownership: l.ownership,
        more: {
          mode: o.mode ?? 'buffer',
          // A capture failure on the primary (QEMU's stream breaks mid-epoch), once when asked.
          fault: (point) => {
            if (point === 'mid-epoch' && failCapture) {
              failCapture = false;
              throw new RubatoError('RUBATO_PROTOCOL', 'injected capture failure');
            }
          },
        },
        onEvent: (e) => {
          pEvents.push({ ...e, t: Date.now() });
        },
        onGuardEvent: (e) => gEvents.push({ ...e, t: Date.now() }),
      });
      const primary = side.primary;
      guard = side.guard;
      return {
        primary,
        standby,
        link,
        guard,
        gate,
        host: other,
        pEvents,
        sEvents,
        gEvents,
        failCaptureOnce: () => {
          failCapture = true;
        },
        get nextIo() {
          return nextIo;
        },
      };
    };
    const protectedSince = async (q: Pair, since: number, what: string) =>
      waitFor(() => q.pEvents.find((e) => e.event === 'protecting' && e.t >= since), 120_000, what);
    const secondaryRunning = async (q: Pair, what: string) =>
      waitFor(
        () => {
          const st = (q.standby.status()['secondary'] as { state?: string } | undefined)?.state;
          if (st === 'failed') throw new RubatoError('RUBATO_SECONDARY', `${what}: the secondary failed`);
          return st === 'running' ? true : undefined;
        },
        120_000,
        what,
      );
    const noFailoverFor = async (q: Pair, ms: number) => {
      await sleep(ms);
      return !q.sEvents.some((e) => e.event === 'failover');
    };

    for (let k = 1; k <= o.rounds; k++) {
      const fault = o.faults[(k - 1) % o.faults.length]!;
      const l: LiveCopy = live!;
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
              } as const
            )[fault];
      status(
        `round ${k}/${o.rounds}: ${fault} (${variant}) of ${fault.startsWith('standby') ? `the standby ${q.host.name}` : l.host.name} after ${(runMs / 1000).toFixed(1)} s, ${acks() - acksBefore} writes acknowledged meanwhile`,
      );
      res.byFault[fault]++;
      res.rounds++;
      // How the primary's output left in this round (compare mode: how much of it its secondary matched).
      const snap = q.primary.snapshot();
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
        primary: l.host.name,
        ...(snap['compare'] ? { compare: snap['compare'] as CompareCounts } : {}),
        ...(q.standby.status()['secondary'] ? { secondary: q.standby.status()['secondary'] as object } : {}),
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
          // The primary host dies: controller, QEMU, relay, disk server, TAP, its lease renewals — no goodbye.
          l.host.etcdProxy.blackhole();
          await q.primary.crash();
          await l.io.close();
          res.kills++;
          expectFailover = true;
          break;
        case 'partition':
          // Only the replication link: both hosts alive, both on the LAN and on the witness.
          q.link.blackhole();
          if (!withWitness) {
            // Without a witness the standby takes over and both copies answer until the old one is stopped by hand.
            await waitFor(() => q.sEvents.find((e) => e.event === 'failover'), 60_000, `failover in round ${k}`);
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
          l.host.etcdProxy.blackhole();
          if (variant === 'etcd') {
            // Cut from the witness only: the protected pair runs on, nobody goes live; back, it claims again.
            if (!(await noFailoverFor(q, ttl * 1000 + 2000)))
              throw new RubatoError(
                'RUBATO_PROTOCOL',
                `round ${k}: the standby went live while the pair was healthy (primary cut from the witness)`,
              );
            if (l.vm.exited)
              throw new RubatoError(
                'RUBATO_PROTOCOL',
                `round ${k}: the protected primary stopped its guest when only the witness was out of reach`,
              );
            l.host.etcdProxy.heal();
            await waitFor(
              () => q.gEvents.find((e) => e['event'] === 'owner' && Number(e['t']) >= faultAt),
              30_000,
              `the reclaim after round ${k}`,
            );
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
        // The standby host dies (silently: its goodbye goes into the cut). The primary runs on, alone, holding the VM.
        q.link.blackhole();
        q.host.etcdProxy.blackhole();
        await q.standby.stop();
        await waitFor(
          () => q.pEvents.find((e) => e.event === 'unprotected' && e.t >= faultAt),
          30_000,
          `the primary noticing its standby died in round ${k}`,
        );
        await sleep(ttl * 1000 + 1000);
        if (l.vm.exited)
          throw new RubatoError(
            'RUBATO_PROTOCOL',
            `round ${k}: the primary stopped its guest when only its standby died`,
          );
        q.guard?.close();
        await q.primary.stop().catch(() => {});
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
          if (l.vm.exited)
            throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: the guest stopped while only etcd was down`);
        } finally {
          process.kill(witnessPid, 'SIGCONT');
        }
        if (withWitness)
          await waitFor(
            () => q.gEvents.find((e) => e['event'] === 'owner' && Number(e['t']) >= faultAt),
            30_000,
            `the primary claiming the VM again once etcd was back (round ${k})`,
          );
      } else if (fault === 'standby-isolate') {
        // The standby cut from the witness: a healthy pair does not care.
        q.host.etcdProxy.blackhole();
        const ok = await noFailoverFor(q, ttl * 1000 + 2000);
        if (!ok || !q.primary.protected)
          throw new RubatoError(
            'RUBATO_PROTOCOL',
            `round ${k}: the pair did not stay as it was while its standby was cut from the witness`,
          );
        q.host.etcdProxy.heal();
      } else if (fault === 'secondary-kill') {
        // Compare mode's secondary VM dies (SIGKILL of its QEMU on the standby): its replies stop coming,
        // the primary's wait for checkpoints again; no failover; the standby starts a secondary again.
        const sec = q.standby.status()['secondary'] as { pid?: number | null } | undefined;
        if (!sec?.pid) throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: no secondary running to kill`);
        process.kill(sec.pid, 'SIGKILL');
        await waitFor(
          () => q.sEvents.find((e) => e.event === 'secondary-running' && e.t > faultAt),
          120_000,
          `the secondary started again after round ${k}`,
        );
        round.reprotectMs = Date.now() - faultAt;
        res.reprotected++;
        const compared = () => (q.primary.snapshot()['output'] as { compared: number }).compared;
        const comparedAt = compared();
        await waitFor(
          () => compared() > comparedAt || undefined,
          30_000,
          `replies matched by the new secondary after round ${k}`,
        );
        if (q.sEvents.some((e) => e.event === 'failover'))
          throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: the secondary's death led to a failover`);
      } else if (fault === 'capture') {
        q.failCaptureOnce();
        await protectedSince(q, faultAt + 1, `re-protection after the capture failure of round ${k}`);
        round.reprotectMs = Date.now() - faultAt;
        res.reprotected++;
        if (!(await noFailoverFor(q, o.timeoutMs * 2)))
          throw new RubatoError('RUBATO_PROTOCOL', `round ${k}: a capture failure led to a failover`);
      }
      if (expectFailover) {
        const fo = await waitFor(() => q.sEvents.find((e) => e.event === 'failover'), 60_000, `failover in round ${k}`);
        if (fo.event !== 'failover') throw new Error('unreachable');
        res.failovers++;
        round.failover = true;
        round.failoverMs = fo.runningAtMs - faultAt;
        round.promoted = fo.promoted;
        res.failoverMs.push(fo.runningAtMs - faultAt);
        kills.push({ killAt: faultAt, runningAt: fo.runningAtMs });
        // The old primary's side is gone for good (isolate: its guest was stopped by the guard).
        await q.primary.crash();
        await l.io.close().catch(() => {});
        q.guard?.close();
        await l.ownership?.release().catch(() => {});
        q.link.close();
        const vm = q.standby.vm!;
        q.standby.vm = null;
        await q.standby.stop();
        const other = hosts.find((h) => h !== l.host)!;
        live = { host: other, vm, io: q.nextIo!, ownership: q.gate?.ownership(vmName) ?? null };
        pair = null;
        status(`round ${k}: ${other.name} took over in ${round.failoverMs} ms from checkpoint ${fo.epoch}`);
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
    pair?.guard?.close();
    await pair?.primary.stop().catch(() => {});
    await pair?.standby.stop().catch(() => {});
    await pair?.standby.vm?.stop();
    await pair?.nextIo?.close().catch(() => {});
    pair?.link.close();
    if (live && rig && live.vm !== rig.vm) {
      await live.vm.stop();
      await live.io.close().catch(() => {});
    }
    await live?.ownership?.release().catch(() => {});
    await stopKvRig(rig);
    for (const p of proxies) p.close();
    await etcd?.stop();
    removeTempDir(dir);
  }
  return res;
}

/** The scheduler's reasons in the primary's latest decisions event (compare mode's round detail). */
function lastReasons(events: Array<PrimaryEvent & { t: number }>): Record<string, number> {
  for (let i = events.length - 1; i >= 0; i--) {
    const e = events[i]!;
    if (e.event === 'decisions') return { ...e.reasons };
  }
  return {};
}
