// `rubato demo --hosts N --vms M`: a cluster on one machine. N namespace hosts on one LAN, the
// witness (Debian's etcd) on the LAN too, `rubato agent` on every host, M small VMs added with
// `rubato vm add` (the test guest's KV service, each with its own disk); the agents place,
// boot and protect them. A client writes to every VM throughout. Then the host that runs a VM and
// holds another's standby dies (its agent, controllers and QEMUs SIGKILLed by PID, its LAN port
// down): the agents must fail over, re-place the lost standbys and re-protect every VM with no
// operator. At the end every acknowledged write is read back from each VM.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  makeTempDir,
  removeTempDir,
  runCommand,
  spawnTracked,
  type TrackedProcess,
  logger,
  sleep,
  RubatoError,
  errorMessage,
} from '../util/index.ts';
import { ip, Lan, type LanHost } from '../io/index.ts';
import { RUBATO_COMMAND, ensureGuestImage, ensurePackages, ensurePatchedQemu, ensureTapRelay } from '../setup/index.ts';
import { guestAppend } from '../qemu/index.ts';
import { writeKeyFile } from '../replication/index.ts';
import { LocalEtcd, EtcdClient, readCluster, vmRows, type ClusterView } from '../coord/index.ts';
import { clientProcess } from './kv-rig.ts';
import { Controller } from './controller-proc.ts';

const log = logger('demo');

export interface ClusterDemoOptions {
  hosts: number;
  vms: number;
  seconds: number;
  heartbeatMs: number;
  timeoutMs: number;
  leaseTtl: number;
  policy: string;
  /**
   * Before the kill: drain a host (`rubato host drain`), check it holds nothing and every VM is protected, undrain it.
   */
  drain?: boolean;
}

export interface ClusterDemoResult {
  hosts: number;
  vms: number;
  hostKilled: string | null;
  allRunning: boolean;
  allProtected: boolean;
  recoveryMs: number;
  /** Per VM, before and after: where it ran and where its standby was. */
  before: Array<{ vm: string; primary: string | null; standby: string | null }>;
  after: Array<{ vm: string; primary: string | null; standby: string | null; generation: number; state: string }>;
  acknowledged: number;
  lost: number;
  /** With drain: the host drained, how long it took, and where the VMs were then. */
  drained?: { host: string; ms: number; after: Array<{ vm: string; primary: string | null; standby: string | null }> };
  error?: string;
}

const settled = (v: ClusterView, live: ReadonlySet<string>) => {
  const rows = vmRows(v);
  return (
    rows.length > 0 &&
    rows.every(
      (r) =>
        r.protected &&
        r.primary !== null &&
        live.has(r.primary) &&
        r.standby !== null &&
        live.has(r.standby) &&
        r.standby !== r.primary,
    )
  );
};

export async function runClusterDemo(
  o: ClusterDemoOptions,
  onStatus: (line: string, final?: boolean) => void,
): Promise<ClusterDemoResult> {
  const res: ClusterDemoResult = {
    hosts: o.hosts,
    vms: o.vms,
    hostKilled: null,
    allRunning: false,
    allProtected: false,
    recoveryMs: -1,
    before: [],
    after: [],
    acknowledged: 0,
    lost: -1,
  };
  if (o.hosts < 3)
    throw new RubatoError(
      'RUBATO_CONFIG',
      '--hosts: a cluster demo needs at least 3 hosts (one dies, two must remain to protect each other)',
    );
  onStatus('preparing: Debian packages (etcd), the patched QEMU, the test guest, the TAP helper', true);
  await ensurePackages();
  const guest = await ensureGuestImage();
  await ensurePatchedQemu();
  await ensureTapRelay();
  const dir = makeTempDir('rubato-cluster-demo-');
  let lan: Lan | null = null;
  let etcd: LocalEtcd | null = null;
  const agents = new Map<string, { host: LanHost; ctl: Controller }>();
  const clients: Array<ReturnType<typeof clientProcess>> = [];
  try {
    lan = await Lan.create('cl');
    const hosts: LanHost[] = [];
    for (let i = 1; i <= o.hosts; i++) hosts.push(await lan.addHost(`h${i}`));
    const witnessIp = await lan.attachRoot(200);
    etcd = await LocalEtcd.start(join(dir, 'witness'), { host: witnessIp });
    const client = new EtcdClient([etcd.url]);
    onStatus(`witness: etcd at ${etcd.url}; ${o.hosts} hosts on ${lan.subnet}.0/24`, true);
    const key = join(dir, 'cluster.key');
    writeKeyFile(key);
    const startAgent = (h: LanHost, name: string) => {
      const proc: TrackedProcess = spawnTracked(
        `agent-${name}`,
        'ip',
        [
          'netns',
          'exec',
          h.ns,
          RUBATO_COMMAND,
          'agent',
          '--etcd',
          etcd!.url,
          '--name',
          name,
          '--address',
          h.ip,
          '--key',
          key,
          '--state-dir',
          join(dir, name),
          '--no-fsync',
          '--events',
          '--policy',
          o.policy,
          '--heartbeat-ms',
          String(o.heartbeatMs),
          '--timeout-ms',
          String(o.timeoutMs),
          '--lease-ttl',
          String(o.leaseTtl),
        ],
        { env: { ...process.env, RUBATO_LOG: 'warn' } },
      );
      const ctl = new Controller(name, proc, (e) => {
        if (
          ['placed', 'failover', 'reprotected', 'protecting', 'leader', 'switchover', 'ownership-lost'].includes(
            String(e.event),
          )
        ) {
          log.info(
            `${name}: ${String(e.event)} ${e['vm'] ? `VM ${String(e['vm'])}` : ''}${e['primary'] ? ` primary ${String(e['primary'])} standby ${String(e['standby'])}` : ''}`,
          );
        }
      });
      agents.set(name, { host: h, ctl });
    };
    for (const [i, h] of hosts.entries()) startAgent(h, `h${i + 1}`);
    // The VMs: the test guest's KV service, each with its own address, MAC and ext2 disk.
    const vmIps: string[] = [];
    for (let i = 1; i <= o.vms; i++) {
      const disk = join(dir, `vm${i}.img`);
      writeFileSync(disk, Buffer.alloc(32 << 20));
      const mk = await runCommand('mkfs.ext2', ['-q', '-F', disk]);
      if (mk.code !== 0) throw new RubatoError('RUBATO_SETUP_FAILED', `mkfs.ext2: ${mk.stderr.trim()}`);
      const ipAddr = `${lan.subnet}.${10 + i}`;
      vmIps.push(ipAddr);
      const file = join(dir, `vm${i}.json`);
      writeFileSync(
        file,
        JSON.stringify({
          name: `vm${i}`,
          cpus: 1,
          memoryMiB: 128,
          accelerator: 'auto',
          disks: [{ path: disk, format: 'raw' }],
          nics: [{ bridge: hosts[0]!.bridge }],
          boot: {
            kernel: guest.kernel,
            initrd: guest.initrd,
            append: guestAppend(['kvd', 7000, '/data/kv.log'], { ip: `${ipAddr}/24`, disk: 'vda' }),
          },
        }),
      );
      const add = await runCommand(RUBATO_COMMAND, ['vm', 'add', file, '--etcd', etcd.url]);
      if (add.code !== 0) throw new RubatoError('RUBATO_CONFIG', `rubato vm add: ${add.stderr.trim()}`);
    }
    onStatus(`${o.vms} VMs added (rubato vm add); the agents place, boot and protect them`, true);
    const live = new Set(agents.keys());
    const t0 = Date.now();
    let view = await readCluster(client);
    while (!settled(view, live)) {
      if (Date.now() - t0 > 300_000)
        throw new RubatoError(
          'RUBATO_PEER_LOST',
          `the VMs were not all protected within 300 s: ${JSON.stringify(vmRows(view))}`,
        );
      await sleep(500);
      view = await readCluster(client);
    }
    res.before = vmRows(view).map((r) => ({ vm: r.vm, primary: r.primary, standby: r.standby }));
    onStatus(
      `all protected after ${Math.round((Date.now() - t0) / 1000)} s: ${res.before.map((r) => `${r.vm} on ${r.primary} (standby ${r.standby})`).join(', ')}`,
      true,
    );
    for (const ipAddr of vmIps)
      clients.push(clientProcess(lan, ['--target', `${ipAddr}:7000`, '--conns', '2', '--seconds', '900']));
    await sleep(o.seconds * 1000);
    if (o.drain) {
      // Planned maintenance: the host running the first VM is drained (switchover, standbys moved), then let back in.
      const host = res.before[0]!.primary!;
      onStatus(`draining ${host} (rubato host drain): its VMs switch over, its standbys move`, true);
      const t1 = Date.now();
      const d = await runCommand(RUBATO_COMMAND, ['host', 'drain', host, '--etcd', etcd.url, '--timeout', '180']);
      if (d.code !== 0)
        throw new RubatoError(
          'RUBATO_PEER_LOST',
          `rubato host drain ${host}: ${d.stderr.trim().split('\n').at(-1) ?? ''}`,
        );
      const others = new Set([...live].filter((h) => h !== host));
      for (;;) {
        view = await readCluster(client);
        if (settled(view, others)) break;
        if (Date.now() - t1 > 180_000)
          throw new RubatoError(
            'RUBATO_PEER_LOST',
            `not protected again after draining ${host}: ${JSON.stringify(vmRows(view))}`,
          );
        await sleep(250);
      }
      res.drained = {
        host,
        ms: Date.now() - t1,
        after: vmRows(view).map((r) => ({ vm: r.vm, primary: r.primary, standby: r.standby })),
      };
      onStatus(
        `${host} drained in ${res.drained.ms} ms: ${res.drained.after.map((r) => `${r.vm} on ${r.primary} (standby ${r.standby})`).join(', ')}`,
        true,
      );
      const u = await runCommand(RUBATO_COMMAND, ['host', 'undrain', host, '--etcd', etcd.url]);
      if (u.code !== 0) throw new RubatoError('RUBATO_CONFIG', `rubato host undrain ${host}: ${u.stderr.trim()}`);
      await sleep(2000);
    }
    // The victim: a host that runs a VM and holds another's standby if there is one (both kinds of loss at once).
    const now = res.drained?.after ?? res.before;
    const roles = (h: string) =>
      now.filter((r) => r.primary === h).length * 2 + now.filter((r) => r.standby === h).length;
    const victim = [...agents.keys()].sort((a, b) => roles(b) - roles(a))[0]!;
    res.hostKilled = victim;
    const v = agents.get(victim)!;
    onStatus(`killing host ${victim}: its agent, controllers and QEMUs (SIGKILL by PID), its LAN port down`, true);
    const killAt = Date.now();
    await killHost(v.host, v.ctl.proc);
    live.delete(victim);
    for (;;) {
      view = await readCluster(client);
      if (settled(view, live)) break;
      if (Date.now() - killAt > 180_000)
        throw new RubatoError('RUBATO_PEER_LOST', `not recovered within 180 s: ${JSON.stringify(vmRows(view))}`);
      await sleep(250);
    }
    res.recoveryMs = Date.now() - killAt;
    res.allProtected = true;
    res.after = vmRows(view).map((r) => ({
      vm: r.vm,
      primary: r.primary,
      standby: r.standby,
      generation: r.generation,
      state: r.state,
    }));
    onStatus(
      `recovered in ${res.recoveryMs} ms: ${res.after.map((r) => `${r.vm} on ${r.primary} (standby ${r.standby}, generation ${r.generation})`).join(', ')}`,
      true,
    );
    // Writes after the recovery prove each guest runs; then everything acknowledged is read back.
    await sleep(3000);
    let lost = 0;
    let acked = 0;
    let running = 0;
    for (const [i, c] of clients.entries()) {
      const recent = c.events.filter((e) => e.type === 'ack' && e.t > killAt + res.recoveryMs).length;
      c.proc.kill('SIGTERM');
      await c.done;
      const acks = c.events.filter((e) => e.type === 'ack');
      acked += acks.length;
      const file = join(dir, `acks${i}.jsonl`);
      writeFileSync(file, `${acks.map((a) => JSON.stringify({ key: a.key, value: a.value })).join('\n')}\n`);
      const check = clientProcess(lan, ['--target', `${vmIps[i]!}:7000`, '--verify', file]);
      await check.done;
      const verdict = check.events.find((e) => e.type === 'verify');
      lost += verdict ? (verdict.missing?.length ?? 0) : acks.length;
      if (recent > 0 && verdict) running++;
    }
    res.acknowledged = acked;
    res.lost = lost;
    res.allRunning = running === o.vms;
  } catch (e) {
    res.error = errorMessage(e);
    log.error(`cluster demo failed: ${res.error}`);
  } finally {
    onStatus('stopping: agents (in order), the witness, the LAN', true);
    for (const c of clients) c.proc.kill('SIGKILL');
    await Promise.all([...agents.values()].map(({ ctl }) => ctl.proc.stop(15_000)));
    if (lan) for (const h of lan.hosts) await killNamespacePids(h.ns);
    await etcd?.stop();
    await lan?.destroy();
    removeTempDir(dir);
  }
  return res;
}

export const clusterDemoPassed = (r: ClusterDemoResult) => !r.error && r.allRunning && r.allProtected && r.lost === 0;

/** A host dies: its LAN port goes down, then its agent and everything in its namespace is SIGKILLed by PID. */
async function killHost(h: LanHost, agent: TrackedProcess): Promise<void> {
  await ip(['-n', h.ns, 'link', 'set', h.uplink, 'down']).catch(() => {});
  agent.kill('SIGKILL');
  await killNamespacePids(h.ns);
}

/** Every process still in namespace `ns` (QEMUs, helpers), by PID. */
async function killNamespacePids(ns: string): Promise<void> {
  const r = await runCommand('ip', ['netns', 'pids', ns]);
  for (const pid of r.stdout.split(/\s+/).filter(Boolean).map(Number)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
}
