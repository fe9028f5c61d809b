// `rubato demo --guest debian`: the real thing on one machine. Three hosts on one LAN bridge
// (namespaces: primary, standby, client); the Debian VM protected from its disk image by
// `rubato protect` (a daemon, as an operator runs it), `rubato standby --peer` on the other host;
// a client fetching nginx pages over one persistent connection and over new connections
// throughout; the primary host killed (QEMU and controller by PID, its LAN port down); the standby
// taking over once the witness (the embedded etcd, on the LAN) lets it; then a standby started on
// the repaired old host and the VM re-protected there.

import { constants, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeTempDir, removeTempDir, type TrackedProcess, logger } from '../util/index.ts';
import { ip, Lan, type LanHost } from '../io/index.ts';
import {
  ensurePackages,
  ensureDebianImage,
  ensureDebianUefiImage,
  ensurePatchedQemu,
  ensureTapRelay,
} from '../setup/index.ts';
import { writeKeyFile, formatProgress, type SyncProgress } from '../replication/index.ts';
import { nsLauncher } from './controller-proc.ts';
import { checkReplies, type ReplyCheck } from './reply-check.ts';
import { LocalEtcd, EtcdClient, currentOwner } from '../coord/index.ts';

const log = logger('demo');
/** The Debian guest's static address (guest/debian/files/etc/network/interfaces). */
const SUBNET = '10.231.0';
/** Its second NIC's (eth1, when there), on a LAN of its own joined by this bridge on each host. */
const SUBNET2 = '10.231.1';
const BRIDGE2 = 'brdeb2';

export interface DebianDemoOptions {
  seconds: number;
  memMb: number;
  policy: string;
  heartbeatMs: number;
  timeoutMs: number;
  accel: string;
  /** Grow the disk (sparse) to this size first (the partition stays as built): real sizes. */
  diskGiB?: number;
  /** Disks of the VM (default 1): the second is written raw by the guest (a counter it publishes). */
  disks?: number;
  /** NICs of the VM (default 1, at most 2): the second on a LAN of its own, with its own client. */
  nics?: number;
  /** bios (default) or uefi: the Debian image's UEFI variant, booted through OVMF. */
  firmware?: 'bios' | 'uefi';
  /**
   * Called where the VM runs, once protected and again after the failover (a test reaches its
   * console there); a throw fails the demo.
   */
  onRunning?: (
    phase: 'protected' | 'failed-over',
    where: { ns: string; stateDir: string; vm: string },
  ) => Promise<void>;
}

export interface DebianDemoResult {
  bootedFromDisk: boolean;
  firmware: 'bios' | 'uefi';
  disks: number;
  nics: number;
  /**
   * The second NIC's client (its own LAN): pages fetched through it, after the failover too
   * (null with one NIC).
   */
  secondNic: { requests: number; afterFailover: number; errors: number; connectionSurvived: boolean } | null;
  /**
   * The counter the guest writes through on its second disk and publishes from its first: the last
   * value a client saw before the failover, the first and last after it, and whether it ever went
   * back (null with one disk).
   */
  counter: { beforeFailover: number; firstAfter: number; lastAfter: number; wentBack: boolean } | null;
  diskGiB: number;
  guestMemMb: number;
  failover: boolean;
  failoverMs: number;
  httpRequests: number;
  httpErrors: number;
  connectionSurvived: boolean;
  longestStallMs: number;
  reprotected: boolean;
  reprotectMs: number;
  syncMs: number;
  controllerRssMb: { primary: number; standby: number };
  /**
   * Output commit as the product's own events show it: epochs whose held frames left, and of those any before the
   * standby committed them.
   */
  /**
   * Output commit seen from the client (chaos/reply-check.ts): pages judged, and pages that arrived
   * before the acknowledgement of a checkpoint covering their request.
   */
  replies: ReplyCheck;
  /**
   * The embedded witness (etcd) both hosts used, and the VM's generation after the failover (2: the standby claimed
   * it).
   */
  witness: string;
  generation: number;
  /**
   * The old primary's unit restarted after the failover (`rubato protect` again on the repaired host): its exit code
   * (8: refused, its disk is stale) and whether it started QEMU.
   */
  staleRestart: { code: number | null; startedGuest: boolean; why: string };
  error?: string;
}

/** Resident memory of a process in MB (0 when gone). */
function rssMb(pid: number): number {
  try {
    const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/);
    return m ? Math.round(Number(m[1]) / 1024) : 0;
  } catch {
    return 0;
  }
}

export async function runDebianDemo(
  o: DebianDemoOptions,
  onStatus: (line: string, final?: boolean) => void,
): Promise<DebianDemoResult> {
  const nDisks = o.disks ?? 1;
  const nNics = o.nics ?? 1;
  const firmware = o.firmware ?? 'bios';
  const res: DebianDemoResult = {
    bootedFromDisk: false,
    firmware,
    disks: nDisks,
    nics: nNics,
    secondNic: null,
    counter: null,
    diskGiB: 0,
    guestMemMb: o.memMb,
    failover: false,
    failoverMs: -1,
    httpRequests: 0,
    httpErrors: 0,
    connectionSurvived: false,
    longestStallMs: -1,
    reprotected: false,
    reprotectMs: -1,
    syncMs: -1,
    controllerRssMb: { primary: 0, standby: 0 },
    replies: { checked: 0, early: 0, examples: [] },
    witness: '',
    generation: 0,
    staleRestart: { code: null, startedGuest: false, why: '' },
  };
  onStatus(
    'preparing: the Debian guest image (built once), the patched QEMU, the TAP helper, etcd (the witness)',
    true,
  );
  await ensurePackages();
  const image = firmware === 'uefi' ? await ensureDebianUefiImage() : await ensureDebianImage();
  if (o.accel !== 'kvm') await ensurePatchedQemu();
  await ensureTapRelay();
  const dir = makeTempDir('rubato-debian-demo-');
  let lan: Lan | null = null;
  let lan2: Lan | null = null;
  const procs: TrackedProcess[] = [];
  let rssTimer: NodeJS.Timeout | null = null;
  let etcd: LocalEtcd | null = null;
  try {
    // The user's disk: a copy of the built image (sparse), so the cache stays pristine.
    const disk = join(dir, 'debian.img');
    await copyFile(image, disk, constants.COPYFILE_FICLONE); // (async: a signal is not kept waiting for 8 GiB)
    if (o.diskGiB && o.diskGiB * 2 ** 30 > statSync(disk).size) truncateSync(disk, o.diskGiB * 2 ** 30);
    res.diskGiB = Math.round((statSync(disk).size / 2 ** 30) * 10) / 10;
    lan = await Lan.create('deb', { subnet: SUBNET });
    const l = lan;
    const [ha, hb] = [await l.addHost('ha'), await l.addHost('hb')];
    // A second NIC's LAN: its own bridge on each host and its own client.
    if (nNics > 1) {
      lan2 = await Lan.create('deb2', { subnet: SUBNET2 });
      for (const h of [ha, hb]) await lan2.attachHost(h, BRIDGE2);
    }
    const extraDisks: string[] = [];
    for (let i = 1; i < nDisks; i++) {
      const f = join(dir, `data${i}.img`);
      writeFileSync(f, Buffer.alloc(0));
      truncateSync(f, 64 << 20);
      extraDisks.push(f);
    }
    // The witness: Rubato's embedded default, a single-member etcd, here on the LAN where both hosts reach it.
    etcd = await LocalEtcd.start(join(dir, 'witness'), { host: await l.attachRoot(200) });
    res.witness = etcd.url;
    onStatus(
      `three hosts on one LAN: primary ${ha.ns} (${ha.ip}), standby ${hb.ns} (${hb.ip}), client ${l.clientNs} (${l.clientIp}); guest at ${l.guestIp}`,
      true,
    );
    const vmFile = join(dir, 'debian.json');
    writeFileSync(
      vmFile,
      JSON.stringify(
        {
          name: 'debian',
          cpus: 1,
          memoryMiB: o.memMb,
          accelerator: o.accel,
          firmware,
          disks: [{ path: disk }, ...extraDisks.map((path) => ({ path }))],
          nics: [{ bridge: ha.bridge }, ...(nNics > 1 ? [{ bridge: BRIDGE2 }] : [])],
          // Debian 12 on QEMU 7.2 under TCG: with virtio's event index its transmit queue can stall for good
          nicEventIdx: false,
          boot: { from: 'disk' },
        },
        null,
        2,
      ),
    );
    const key = join(dir, 'psk');
    writeKeyFile(key);
    const launch = nsLauncher(procs);
    const rubato = (name: string, h: LanHost, args: string[]) => launch.rubato(name, h.ns, args);
    const common = [
      '--key',
      key,
      '--heartbeat-ms',
      String(o.heartbeatMs),
      '--timeout-ms',
      String(o.timeoutMs),
      '--events',
      '--etcd',
      etcd.url,
    ];
    const port = 7400;
    const standbyB = rubato('standby-b', hb, [
      'standby',
      '--host',
      'hb',
      '--listen',
      `${hb.ip}:${port}`,
      '--peer',
      `${ha.ip}:${port}`,
      '--policy',
      o.policy,
      '--state-dir',
      join(dir, 'hb'),
      ...common,
    ]);
    await standbyB.waitEvent((e) => e.event === 'listening', 30_000, 'listening');
    // The primary host's unit: the same command every time it (re)starts.
    const protectA = [
      'protect',
      vmFile,
      '--host',
      'ha',
      '--standby',
      `${hb.ip}:${port}`,
      '--policy',
      o.policy,
      '--state-dir',
      join(dir, 'ha'),
      ...common,
    ];
    const primary = rubato('primary-a', ha, protectA);
    primary.onEvent = (e) => {
      if (e.event === 'sync-progress') onStatus(`initial sync: ${formatProgress(e as unknown as SyncProgress)}`);
      if (e.event === 'status')
        onStatus(
          `protected | epoch ${e['epoch']} (acked ${e['ackedEpoch']}) | ${e['ckptPerSec']} ckpt/s | pause ${e['pauseMs']} ms | lag ${e['lagMs']} ms`,
        );
    };
    const started = await primary.waitEvent((e) => e.event === 'started', 120_000, 'VM start');
    const qemuA = Number(started['qemuPid']);
    const primaryPid = primary.proc.pid;
    rssTimer = setInterval(() => {
      res.controllerRssMb.primary = Math.max(res.controllerRssMb.primary, rssMb(primaryPid));
      res.controllerRssMb.standby = Math.max(res.controllerRssMb.standby, rssMb(standbyB.proc.pid));
    }, 500);
    onStatus(
      `VM booting from its ${res.diskGiB} GiB disk through the firmware (QEMU pid ${qemuA}); under TCG this takes about a minute`,
      true,
    );
    await primary.waitEvent(
      (e) => e.event === 'guest' && /RUBATO debian ready/.test(String(e['line'])),
      300_000,
      "the guest's services",
    );
    res.bootedFromDisk = true;
    const tProt = Date.now();
    await primary.waitEvent((e) => e.event === 'protecting', 600_000, 'protection');
    const synced = standbyB.events.find((e) => e.event === 'synced');
    res.syncMs = synced ? Number(synced['ms']) : Date.now() - tProt;
    onStatus(`protected (initial sync ${res.syncMs} ms); a client fetches pages from nginx in the guest`, true);

    const client = launch.httpClient('client', l.clientNs, `${l.guestIp}:80`, '/4k.html');
    await client.waitEvent((e) => e.type === 'ok', 60_000, 'a first page');
    // The second NIC's client (or, with one NIC, a second client on the first): the counter page
    // when the VM has its second disk.
    const counterLan = lan2 ?? l;
    const second =
      nNics > 1 || nDisks > 1
        ? launch.httpClient(
            'client-2',
            counterLan.clientNs,
            `${counterLan.guestIp}:80`,
            nDisks > 1 ? '/counter.txt' : '/4k.html',
            true,
          )
        : null;
    await second?.waitEvent((e) => e.type === 'ok', 120_000, 'a first page through the second client');
    await o.onRunning?.('protected', { ns: ha.ns, stateDir: join(dir, 'ha'), vm: 'debian' });
    await new Promise((r) => setTimeout(r, o.seconds * 1000));

    // The primary host dies: its LAN port goes down, QEMU and the controller are killed by PID.
    const killAt = Date.now();
    await ip(['-n', ha.ns, 'link', 'set', ha.uplink, 'down']);
    try {
      process.kill(qemuA, 'SIGKILL');
    } catch {
      /* gone */
    }
    primary.proc.kill('SIGKILL');
    onStatus('primary host killed (LAN port down, QEMU and controller SIGKILLed)', true);
    const fo = await standbyB.waitEvent((e) => e.event === 'failover', 60_000, 'failover');
    res.failover = true;
    res.failoverMs = Number(fo['runningAtMs']) - killAt;
    res.generation = (await currentOwner(new EtcdClient([etcd.url]), 'debian'))?.generation ?? 0;
    onStatus(`standby took over in ${res.failoverMs} ms from checkpoint ${fo['epoch']}`, true);
    await client.waitEvent(
      (e) => e.type === 'ok' && e.t > Number(fo['runningAtMs']) && e['conn'] === 'persistent',
      60_000,
      'a page after the failover',
    );
    await o.onRunning?.('failed-over', { ns: hb.ns, stateDir: join(dir, 'hb'), vm: 'debian' });

    // The old host is repaired: its LAN port comes back. Its unit (Restart=on-failure) runs the
    // same `rubato protect` again: the witness's generation is newer than this host's, so it must
    // refuse (exit 8) without starting a copy from its stale disk.
    await ip(['-n', ha.ns, 'link', 'set', ha.uplink, 'up']);
    const again = rubato('primary-a-again', ha, protectA);
    let stderr = '';
    again.proc.child.stderr?.on('data', (d: Buffer | string) => {
      stderr += d.toString();
    });
    const ended = await Promise.race([again.proc.exited, new Promise<null>((r) => setTimeout(() => r(null), 60_000))]);
    if (!ended) await again.proc.stop(3000);
    const why = stderr.split('\n').find((line) => line.startsWith('rubato: ')) ?? '';
    res.staleRestart = {
      code: ended?.code ?? null,
      startedGuest: again.events.some((e) => e.event === 'started'),
      why,
    };
    onStatus(
      `the old primary's unit started again: exit ${String(res.staleRestart.code)}, ${res.staleRestart.startedGuest ? 'STARTED A COPY' : 'no copy started'}`,
      true,
    );
    // A standby starts there instead.
    const tRe = Date.now();
    const standbyA = rubato('standby-a', ha, [
      'standby',
      '--host',
      'ha',
      '--listen',
      `${ha.ip}:${port}`,
      '--state-dir',
      join(dir, 'ha-standby'),
      ...common,
    ]);
    await standbyA.waitEvent((e) => e.event === 'listening', 30_000, 'listening');
    await standbyB.waitEvent((e) => e.event === 'reprotected', 600_000, 're-protection');
    res.reprotected = true;
    res.reprotectMs = Date.now() - tRe;
    res.controllerRssMb.standby = Math.max(res.controllerRssMb.standby, rssMb(standbyA.proc.pid));
    onStatus(`re-protected by the repaired old host in ${res.reprotectMs} ms, the guest running throughout`, true);
    await new Promise((r) => setTimeout(r, 3000));

    client.proc.kill('SIGTERM');
    await client.proc.exited;
    if (second) {
      second.proc.kill('SIGTERM');
      await second.proc.exited;
      const ok2 = second.events.filter((e) => e.type === 'ok');
      const after = ok2.filter((e) => e.t > Number(fo['runningAtMs']));
      if (nNics > 1) {
        const pers = ok2.filter((e) => e['conn'] === 'persistent');
        res.secondNic = {
          requests: ok2.length,
          afterFailover: after.length,
          errors: second.events.filter((e) => e.type === 'error').length,
          connectionSurvived:
            pers.some((e) => e.t > Number(fo['runningAtMs'])) && new Set(pers.map((e) => e['socket'])).size === 1,
        };
      }
      if (nDisks > 1) {
        // Answers in the order they were given (per connection, a later answer is a later state).
        const values = (xs: typeof ok2) => xs.map((e) => Number(e['body'])).filter((n) => Number.isFinite(n) && n > 0);
        const before = values(ok2.filter((e) => e.t <= killAt));
        const afterValues = values(after);
        let wentBack = false;
        for (const conn of ['persistent', 'new'])
          values(ok2.filter((e) => e['conn'] === conn)).reduce((prev, n) => {
            if (n < prev) wentBack = true;
            return n;
          }, 0);
        res.counter = {
          beforeFailover: Math.max(0, ...before),
          firstAfter: afterValues[0] ?? 0,
          lastAfter: afterValues.at(-1) ?? 0,
          wentBack,
        };
      }
    }
    const oks = client.events.filter((e) => e.type === 'ok');
    res.httpRequests = oks.length;
    res.httpErrors = client.events.filter((e) => e.type === 'error').length;
    const persistent = oks.filter((e) => e['conn'] === 'persistent');
    res.connectionSurvived =
      persistent.some((e) => e.t > Number(fo['runningAtMs'])) && new Set(persistent.map((e) => e['socket'])).size === 1;
    // No page reached a client before a checkpoint covering its request was acknowledged: A until
    // it was killed, then B once it protected the guest (each process stamps its own events).
    const answered = [client, ...(second ? [second] : [])].flatMap((c) =>
      c.events.filter((e) => e.type === 'ok').map((e) => ({ sentAt: e.t - Number(e['latMs']), at: e.t })),
    );
    res.replies = checkReplies(answered, [{ events: primary.events, endAt: killAt }, { events: standbyB.events }]);
    if (res.replies.early)
      log.error(`pages that arrived before their checkpoint's ack: ${JSON.stringify(res.replies.examples)}`);
    let stall = 0;
    for (let i = 1; i < oks.length; i++) stall = Math.max(stall, oks[i]!.t - oks[i - 1]!.t);
    res.longestStallMs = stall;
  } catch (e) {
    res.error = e instanceof Error ? e.message : String(e);
    log.error(`demo failed: ${res.error}`);
  } finally {
    if (rssTimer) clearInterval(rssTimer);
    for (const p of procs.reverse()) await p.stop(5000);
    await etcd?.stop();
    await lan2?.destroy();
    await lan?.destroy();
    removeTempDir(dir);
  }
  return res;
}

export const debianDemoPassed = (r: DebianDemoResult): boolean =>
  r.bootedFromDisk &&
  (r.nics < 2 ||
    (r.secondNic !== null &&
      r.secondNic.afterFailover > 0 &&
      r.secondNic.errors === 0 &&
      r.secondNic.connectionSurvived)) &&
  (r.disks < 2 ||
    (r.counter !== null &&
      !r.counter.wentBack &&
      r.counter.beforeFailover > 0 &&
      r.counter.firstAfter >= r.counter.beforeFailover &&
      r.counter.lastAfter > r.counter.firstAfter)) &&
  r.diskGiB >= 8 &&
  r.failover &&
  r.generation >= 2 &&
  r.staleRestart.code === 8 &&
  !r.staleRestart.startedGuest &&
  r.httpErrors === 0 &&
  r.httpRequests > 0 &&
  r.connectionSurvived &&
  r.reprotected &&
  r.replies.checked > 0 &&
  r.replies.early === 0 &&
  r.controllerRssMb.primary > 0 &&
  r.controllerRssMb.primary < 512 &&
  r.controllerRssMb.standby > 0 &&
  r.controllerRssMb.standby < 512 &&
  !r.error;
