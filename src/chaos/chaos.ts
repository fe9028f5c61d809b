// `rubato chaos`: the Jepsen-style check. A KV service in the protected guest, a client in its own
// namespace writing over persistent TCP connections, and the primary host killed at random moments
// again and again; each failover's guest becomes the next primary, protected by a fresh standby
// on the other host. At the end every acknowledged write must be readable with its value.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { randomBytes, randomInt } from 'node:crypto';
import { makeTempDir, removeTempDir } from '../util/tmp.ts';
import { runCommand, spawnTracked, type TrackedProcess } from '../util/procs.ts';
import { logger } from '../util/log.ts';
import { median, percentile, round } from '../util/stats.ts';
import { waitFor } from '../util/async.ts';
import { RubatoError } from '../util/errors.ts';
import { REPO_ROOT, ensureGuestImage, ensurePatchedQemu, ensureTapRelay, stockQemu } from '../setup/index.ts';
import { resolveAccel, type AccelChoice } from '../qemu/accel.ts';
import { QemuVm } from '../qemu/vm.ts';
import { guestAppend, type VmSpec } from '../qemu/spec.ts';
import { Lan, type LanHost } from '../io/net/lan.ts';
import { GuestIo } from '../io/guest-io.ts';
import { PrimaryController, DISK_BLOCK_ID, type PrimaryEvent } from '../replication/primary.ts';
import { StandbyController, type StandbyEvent } from '../replication/standby.ts';
import { parsePolicy } from '../scheduler/index.ts';

const log = logger('chaos');

export interface ChaosOptions { kills: number; seconds: number; timeoutMs: number; accel: AccelChoice; conns: number; policy: string; onStatus?: (s: string) => void }

export interface ChaosResult {
  kills: number; failovers: number; acknowledged: number; lost: number; lostKeys: string[];
  connectionsSurvived: number; connectionsTotal: number; failoverMsMedian: number; failoverMs: number[];
  latencyMsP50: number; latencyMsP99: number; accel: string; error?: string;
}

interface ClientEvent { t: number; type: string; key?: string; value?: string; conn?: number; id?: number; event?: string; latMs?: number; missing?: string[]; checked?: number }

export function clientProcess(lan: Lan, args: string[], scriptPath = join('src', 'chaos', 'kv-client.ts')): { proc: TrackedProcess; events: ClientEvent[]; done: Promise<void> } {
  const tsx = pathToFileURL(join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs')).href;
  const script = join(REPO_ROOT, scriptPath);
  const proc = spawnTracked('kv-client', 'ip', ['netns', 'exec', lan.clientNs, process.execPath, '--import', tsx, script, ...args]);
  const events: ClientEvent[] = [];
  let buf = '';
  proc.child.stdout?.on('data', (d: Buffer) => {
    buf += d.toString();
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) { try { events.push(JSON.parse(buf.slice(0, nl)) as ClientEvent); } catch { /* not ours */ } buf = buf.slice(nl + 1); }
  });
  proc.child.stderr?.on('data', (d: Buffer) => log.debug(`client: ${d.toString().trim()}`));
  return { proc, events, done: proc.exited.then(() => {}) };
}


/** A KV guest on a LAN: topology, disk, the guest's I/O on host A, the booted VM. */
export interface KvRig { lan: Lan; hosts: LanHost[]; io: GuestIo; vm: QemuVm; dir: string; binary: import('../qemu/vm.ts').QemuBinary; accel: string }

/** What the rig's guest runs (default: the KV service) and the console line that says it is ready. */
export interface RigWorkload { wl: Array<string | number>; ready: RegExp }
export const KV_WORKLOAD: RigWorkload = { wl: ['kvd', 7000, '/data/kv.log'], ready: /RUBATO kvd ready/ };

export async function startKvRig(dir: string, accelChoice: AccelChoice, tag: string, workload: RigWorkload = KV_WORKLOAD): Promise<KvRig> {
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(accelChoice, stockQemu(), guest);
  const binary = accel === 'tcg' ? await ensurePatchedQemu() : stockQemu();
  await ensureTapRelay();
  const lan = await Lan.create(tag);
  try {
    const hosts: LanHost[] = [await lan.addHost('ha'), await lan.addHost('hb')];
    const disk = join(dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(32 << 20));
    const mk = await runCommand('mkfs.ext2', ['-q', '-F', disk]);
    if (mk.code !== 0) throw new RubatoError('RUBATO_SETUP_FAILED', `mkfs.ext2 failed: ${mk.stderr}`);
    const spec: VmSpec = {
      name: 'kv', accel, cpus: 1, memMb: 128, kernel: guest.kernel, initrd: guest.initrd, mac: '52:54:00:ab:cd:01', disk: true,
      append: guestAppend(workload.wl, { ip: `${lan.guestIp}/24`, disk: 'vda' }),
    };
    const io = await GuestIo.start(hosts[0]!, dir, 'g0', disk);
    const vm = await QemuVm.start(spec, { binary, runDir: dir, tag: 'g0', netSocket: io.netSocket, ...(io.nbdSocket ? { nbdSocket: io.nbdSocket } : {}) });
    await vm.waitSerial(workload.ready, 90_000);
    return { lan, hosts, io, vm, dir, binary, accel };
  } catch (e) {
    await lan.destroy();
    throw e;
  }
}

/** Stops a rig's guest, its I/O (relay, disk server) and its LAN; safe on a partly failed start. */
export async function stopKvRig(rig: KvRig | null): Promise<void> {
  if (!rig) return;
  await rig.vm.stop();
  await rig.io.close().catch(() => {});
  await rig.lan.destroy();
}

export async function runChaos(o: ChaosOptions): Promise<ChaosResult> {
  const status = o.onStatus ?? (() => {});
  const res: ChaosResult = { kills: 0, failovers: 0, acknowledged: 0, lost: -1, lostKeys: [], connectionsSurvived: 0, connectionsTotal: 0, failoverMsMedian: Number.NaN, failoverMs: [], latencyMsP50: Number.NaN, latencyMsP99: Number.NaN, accel: o.accel };
  const dir = makeTempDir('rubato-chaos-');
  let lan: Lan | null = null;
  let vm: QemuVm | null = null;
  let io: GuestIo | null = null;
  let primary: PrimaryController | null = null;
  let client: ReturnType<typeof clientProcess> | null = null;
  const cleanups: Array<() => Promise<void>> = [];
  try {
    const rig = await startKvRig(dir, o.accel, 'chaos');
    lan = rig.lan;
    const hosts = rig.hosts;
    const binary = rig.binary;
    res.accel = rig.accel;
    io = rig.io;
    vm = rig.vm;
    const psk = randomBytes(32);
    let hostIdx = 0;
    status(`KV guest up at ${lan.guestIp} behind host ${hosts[hostIdx]!.ns}`);
    const total = o.kills * (o.seconds + 15) + 60;
    client = clientProcess(lan, ['--target', `${lan.guestIp}:7000`, '--conns', String(o.conns), '--seconds', String(total)]);
    const kills: Array<{ killAt: number; runningAt: number }> = [];
    for (let k = 1; k <= o.kills; k++) {
      const other = hosts[1 - hostIdx]!;
      const curVm: QemuVm = vm!;
      const curIo: GuestIo = io!;
      const sEvents: StandbyEvent[] = [];
      const pEvents: PrimaryEvent[] = [];
      let nextIo: GuestIo | null = null;
      const standby = new StandbyController({
        host: '127.0.0.1', port: 0, stateDir: join(dir, `standby${k}`), psk, heartbeatMs: 50, timeoutMs: o.timeoutMs, fsync: false,
        binaryFor: async () => binary, onEvent: (e) => sEvents.push(e),
        prepareRestore: async (_id, store) => {
          nextIo = await GuestIo.start(other, dir, `g${k}`, store.imagePath(DISK_BLOCK_ID));
          return { netSocket: nextIo.netSocket, ...(nextIo.nbdSocket ? { nbdSocket: nextIo.nbdSocket } : {}) };
        },
      });
      await standby.start();
      primary = new PrimaryController({
        vm: curVm, runDir: dir, standby: { host: '127.0.0.1', port: standby.boundPort }, psk, periodMs: 25, heartbeatMs: 50, timeoutMs: o.timeoutMs, retryMs: 300,
        relay: curIo.relay, nbd: curIo.nbd, onEvent: (e) => pEvents.push(e), policy: parsePolicy(o.policy),
      });
      primary.start();
      await waitFor(() => pEvents.find((e) => e.event === 'protecting'), 120_000, 'protection');
      const acksBefore = client.events.filter((e) => e.type === 'ack').length;
      const runMs = randomInt(Math.floor(o.seconds * 500), Math.floor(o.seconds * 1500) + 1);
      await new Promise((r) => setTimeout(r, runMs));
      const acksDuring = client.events.filter((e) => e.type === 'ack').length - acksBefore;
      // The primary host dies: controller, QEMU, relay, disk server, TAP — no goodbye.
      const killAt = Date.now();
      await primary.crash();
      await curIo.close();
      res.kills++;
      const fo = await waitFor(() => sEvents.find((e) => e.event === 'failover'), 60_000, `failover ${k}`);
      if (fo.event !== 'failover') throw new Error('unreachable');
      res.failovers++;
      kills.push({ killAt, runningAt: fo.runningAtMs });
      res.failoverMs.push(fo.runningAtMs - killAt);
      vm = standby.vm!;
      standby.vm = null;
      await standby.stop();
      io = nextIo!;
      hostIdx = 1 - hostIdx;
      status(`kill ${k}/${o.kills}: client events ${client.events.length}, ${acksDuring} writes acknowledged in ${(runMs / 1000).toFixed(1)} s; standby took over in ${fo.runningAtMs - killAt} ms from checkpoint ${fo.epoch}`);
    }
    // Let the client see the last failover through, then stop it and read everything back.
    const acksAtEnd = client.events.filter((e) => e.type === 'ack').length;
    await waitFor(() => client!.events.filter((e) => e.type === 'ack').length > acksAtEnd + 5 || undefined, 30_000, 'writes after the last failover').catch(() => {});
    client.proc.kill('SIGTERM');
    await client.done;
    const acks = client.events.filter((e) => e.type === 'ack');
    res.acknowledged = acks.length;
    const lat = acks.map((a) => a.latMs ?? 0);
    res.latencyMsP50 = round(median(lat), 2);
    res.latencyMsP99 = round(percentile(lat, 99), 2);
    const ackFile = join(dir, 'acks.jsonl');
    writeFileSync(ackFile, acks.map((a) => JSON.stringify({ key: a.key, value: a.value })).join('\n') + '\n');
    status(`verifying ${acks.length} acknowledged writes with GET`);
    const v = clientProcess(lan, ['--target', `${lan.guestIp}:7000`, '--verify', ackFile]);
    await v.done;
    const verdict = v.events.find((e) => e.type === 'verify');
    if (!verdict) throw new RubatoError('RUBATO_PEER_LOST', 'the verification client reported nothing');
    res.lostKeys = verdict.missing ?? [];
    res.lost = res.lostKeys.length;
    // Connections: of those open when a primary died, how many carried on with acknowledged writes.
    const conns = new Map<number, { open: number; end: number }>();
    for (const e of client.events) {
      if (e.type === 'conn' && e.event === 'open') conns.set(e.id!, { open: e.t, end: Number.POSITIVE_INFINITY });
      if (e.type === 'conn' && (e.event === 'broken' || e.event === 'close')) { const c = conns.get(e.id!); if (c) c.end = Math.min(c.end, e.t); }
    }
    for (const k of kills) {
      for (const [id, c] of conns) {
        if (c.open > k.killAt || c.end < k.killAt) continue;
        res.connectionsTotal++;
        if (acks.some((a) => a.conn === id && a.t > k.runningAt)) res.connectionsSurvived++;
      }
    }
    res.failoverMsMedian = median(res.failoverMs);
  } catch (e) {
    res.error = e instanceof Error ? e.message : String(e);
    log.error(`chaos failed: ${res.error}`);
  } finally {
    client?.proc.kill('SIGKILL');
    await primary?.stop().catch(() => {});
    await vm?.stop();
    await io?.close().catch(() => {});
    for (const c of cleanups) await c();
    await lan?.destroy();
    removeTempDir(dir);
  }
  return res;
}
