// `rubato demo --adopt`: protection turned on for a VM that already runs. The test guest (a web
// server with keep-alive, a counter written through its disk) runs in a plain QEMU of its
// owner's, started as `rubato qemu-args` prints, on a TAP on the primary host's
// bridge. A client keeps one connection open and opens new ones throughout. `rubato protect
// --adopt` moves the running guest live into Rubato on the same host; then the primary host dies
// and the standby takes over. Measured: the guest's downtime at the adoption, the client's view.

import { writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { LineSplitter, makeTempDir, removeTempDir, spawnTracked, type TrackedProcess, logger } from '../util/index.ts';
import { ip, Lan, type LanHost } from '../io/index.ts';
import { ensureGuestImage, ensurePatchedQemu, ensureTapRelay, stockQemu } from '../setup/index.ts';
import { writeKeyFile } from '../replication/index.ts';
import { guestAppend, loadVmDefinition, resolveAccel } from '../qemu/index.ts';
import { ownQemuArgs, ownTapName, specOf } from '../host/index.ts';
import { LocalEtcd } from '../coord/index.ts';
import { nsLauncher } from './controller-proc.ts';

const log = logger('demo');

export interface AdoptDemoOptions {
  seconds: number;
  memMb: number;
  heartbeatMs: number;
  timeoutMs: number;
  accel: string;
}

export interface AdoptDemoResult {
  adopted: boolean;
  /** The guest not running at the adoption: from its QEMU's STOP to Rubato's RESUME. */
  adoptDowntimeMs: number;
  /** The same as QEMU counts it (the source's stop to the end of the copy). */
  qemuDowntimeMs: number;
  /** The owner's QEMU ended after the move (no second copy on the host). */
  ownQemuEnded: boolean;
  protected: boolean;
  failover: boolean;
  failoverMs: number;
  httpRequests: number;
  httpErrors: number;
  /** The client's one keep-alive connection carried on across the adoption and the failover. */
  connectionSurvived: boolean;
  /** The longest gap between two answers the client saw (adoption and failover included). */
  longestStallMs: number;
  /** The guest's answer counter ("rubato N") went back at some point (a lost state). */
  counterWentBack: boolean;
  error?: string;
}

export async function runAdoptDemo(
  o: AdoptDemoOptions,
  onStatus: (line: string, final?: boolean) => void,
): Promise<AdoptDemoResult> {
  const res: AdoptDemoResult = {
    adopted: false,
    adoptDowntimeMs: -1,
    qemuDowntimeMs: -1,
    ownQemuEnded: false,
    protected: false,
    failover: false,
    failoverMs: -1,
    httpRequests: 0,
    httpErrors: 0,
    connectionSurvived: false,
    longestStallMs: -1,
    counterWentBack: false,
  };
  onStatus('preparing: the test guest, the patched QEMU, the TAP helper, etcd (the witness)', true);
  const guest = await ensureGuestImage();
  const { accel } = await resolveAccel(o.accel as 'auto' | 'kvm' | 'tcg', stockQemu(), guest);
  if (accel === 'tcg') await ensurePatchedQemu();
  await ensureTapRelay();
  const dir = makeTempDir('rubato-adopt-demo-');
  let lan: Lan | null = null;
  let etcd: LocalEtcd | null = null;
  const procs: TrackedProcess[] = [];
  try {
    lan = await Lan.create('adopt');
    const l = lan;
    const [ha, hb] = [await l.addHost('ha'), await l.addHost('hb')];
    etcd = await LocalEtcd.start(join(dir, 'witness'), { host: await l.attachRoot(200) });
    const disk = join(dir, 'counter.img');
    writeFileSync(disk, Buffer.alloc(4 << 20));
    const vmFile = join(dir, 'web.json');
    writeFileSync(
      vmFile,
      JSON.stringify({
        name: 'web',
        memoryMiB: o.memMb,
        accelerator: accel,
        disks: [{ path: disk }],
        nics: [{ bridge: ha.bridge, mac: '52:54:00:ad:0b:01' }],
        boot: {
          kernel: guest.kernel,
          initrd: guest.initrd,
          append: guestAppend(['webd', 80], { ip: `${l.guestIp}/24`, rawDisk: 'vda' }),
        },
      }),
    );
    // The owner's VM: a plain QEMU (Debian's) on a TAP of the primary host's bridge, as printed by
    // `rubato qemu-args`.
    const def = loadVmDefinition(vmFile);
    const tap = ownTapName(def.name, 0);
    await ip(['-n', ha.ns, 'tuntap', 'add', 'dev', tap, 'mode', 'tap']);
    await ip(['-n', ha.ns, 'link', 'set', tap, 'master', ha.bridge, 'up']);
    const own = { qmp: join(dir, 'own.qmp'), serial: join(dir, 'own.serial') };
    const args = ownQemuArgs(specOf(def, accel), {
      qmpSocket: own.qmp,
      serialSocket: own.serial,
      diskFiles: [disk],
      taps: [tap],
    });
    const ownQemu = spawnTracked('qemu:own', 'ip', ['netns', 'exec', ha.ns, stockQemu().path, ...args]);
    procs.push(ownQemu);
    const ready = await serialLine(own.serial, /RUBATO webd ready/, 120_000);
    onStatus(`the VM runs in its own QEMU (pid ${ownQemu.pid}) on ${ha.ns}: ${ready}`, true);

    const key = join(dir, 'psk');
    writeKeyFile(key);
    const launch = nsLauncher(procs);
    const rubato = (name: string, h: LanHost, a: string[]) => launch.rubato(name, h.ns, a);
    const common = ['--key', key, '--heartbeat-ms', String(o.heartbeatMs), '--timeout-ms', String(o.timeoutMs)];
    common.push('--events', '--etcd', etcd.url);
    const standby = rubato('standby-b', hb, [
      'standby',
      '--host',
      'hb',
      '--listen',
      `${hb.ip}:7400`,
      '--state-dir',
      join(dir, 'hb'),
      ...common,
    ]);
    await standby.waitEvent((e) => e.event === 'listening', 30_000, 'listening');

    const client = launch.httpClient('client', l.clientNs, `${l.guestIp}:80`, '/', true);
    await client.waitEvent((e) => e.type === 'ok', 60_000, 'a first answer');
    await new Promise((r) => setTimeout(r, 2000));

    onStatus('rubato protect --adopt: moving the running guest into Rubato on the same host', true);
    const primary = rubato('primary-a', ha, [
      'protect',
      vmFile,
      '--adopt',
      own.qmp,
      '--host',
      'ha',
      '--standby',
      `${hb.ip}:7400`,
      '--state-dir',
      join(dir, 'ha'),
      ...common,
    ]);
    const adopted = await primary.waitEvent((e) => e.event === 'adopted', 120_000, 'the adoption');
    res.adopted = true;
    res.adoptDowntimeMs = Number(adopted['downtimeMs']);
    res.qemuDowntimeMs = Number(adopted['qemuDowntimeMs']);
    res.ownQemuEnded = await Promise.race([
      ownQemu.exited.then(() => true),
      new Promise<boolean>((r) => setTimeout(() => r(false), 10_000)),
    ]);
    onStatus(
      `adopted: the guest stood still ${res.adoptDowntimeMs} ms (QEMU: ${res.qemuDowntimeMs} ms); its own QEMU ${res.ownQemuEnded ? 'ended' : 'STILL RUNS'}`,
      true,
    );
    await primary.waitEvent((e) => e.event === 'protecting', 300_000, 'protection');
    res.protected = true;
    const started = await primary.waitEvent((e) => e.event === 'started', 1000, "Rubato's QEMU");
    onStatus('protected; the client carries on', true);
    await new Promise((r) => setTimeout(r, o.seconds * 1000));

    const killAt = Date.now();
    await ip(['-n', ha.ns, 'link', 'set', ha.uplink, 'down']);
    try {
      process.kill(Number(started['qemuPid']), 'SIGKILL');
    } catch {
      /* gone */
    }
    primary.proc.kill('SIGKILL');
    onStatus('primary host killed (LAN port down, QEMU and controller SIGKILLed)', true);
    const fo = await standby.waitEvent((e) => e.event === 'failover', 60_000, 'failover');
    res.failover = true;
    res.failoverMs = Number(fo['runningAtMs']) - killAt;
    await client.waitEvent(
      (e) => e.type === 'ok' && e.t > Number(fo['runningAtMs']) && e['conn'] === 'persistent',
      60_000,
      'an answer after the failover',
    );
    onStatus(`the standby took over in ${res.failoverMs} ms`, true);
    await new Promise((r) => setTimeout(r, 2000));
    client.proc.kill('SIGTERM');
    await client.proc.exited;
    const oks = client.events.filter((e) => e.type === 'ok');
    res.httpRequests = oks.length;
    res.httpErrors = client.events.filter((e) => e.type === 'error').length;
    const persistent = oks.filter((e) => e['conn'] === 'persistent');
    res.connectionSurvived =
      persistent.some((e) => e.t > Number(fo['runningAtMs'])) &&
      persistent.some((e) => e.t < Number(adopted.t)) &&
      new Set(persistent.map((e) => e['socket'])).size === 1;
    let stall = 0;
    for (let i = 1; i < oks.length; i++) stall = Math.max(stall, oks[i]!.t - oks[i - 1]!.t);
    res.longestStallMs = stall;
    // The persistent connection's answers in order: the guest's counter only goes up.
    let prev = 0;
    for (const e of persistent) {
      const n = Number(/rubato (\d+)/.exec(String(e['body']))?.[1] ?? 0);
      if (n < prev) res.counterWentBack = true;
      prev = n;
    }
  } catch (e) {
    res.error = e instanceof Error ? e.message : String(e);
    log.error(`demo failed: ${res.error}`);
  } finally {
    for (const p of procs.reverse()) await p.stop(5000);
    await etcd?.stop();
    await lan?.destroy();
    removeTempDir(dir);
  }
  return res;
}

/** Waits for a line matching `re` on a QEMU's serial socket (a unix socket server), and returns it. */
export function serialLine(path: string, re: RegExp, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const until = Date.now() + timeoutMs;
    const attempt = () => {
      const s = connect(path);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`no ${re.source} on ${path} within ${timeoutMs} ms`));
      }, until - Date.now());
      const lines = new LineSplitter((l) => {
        if (re.test(l)) {
          clearTimeout(timer);
          s.destroy();
          resolve(l.trim());
        }
      });
      s.on('data', (d: Buffer) => lines.push(d));
      s.on('error', () => {
        clearTimeout(timer);
        if (Date.now() > until) reject(new Error(`cannot reach ${path}`));
        else setTimeout(attempt, 100);
      });
    };
    attempt();
  });
}

export const adoptDemoPassed = (r: AdoptDemoResult): boolean =>
  r.adopted &&
  r.adoptDowntimeMs >= 0 &&
  r.ownQemuEnded &&
  r.protected &&
  r.failover &&
  r.httpErrors === 0 &&
  r.httpRequests > 0 &&
  r.connectionSurvived &&
  !r.counterWentBack &&
  !r.error;
