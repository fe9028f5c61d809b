// `rubato agent`: one per host. It announces the host in the witness (on its lease), and every
// half second brings this host's share of the cluster to what the placement says: a `rubato
// protect` process for each VM first placed here, a `rubato standby` process for each VM whose
// standby is here. The processes find each other through the witness (the standby publishes its
// endpoint; the primary looks it up before each connection), claim ownership themselves, and fail
// over and re-protect without the agent. One agent at a time is the leader (a key on its lease):
// it computes the placement (placement.ts) and writes what changed.
//
// Rules that keep one live copy: the agent never starts a guest that ran before (only the
// witness-gated standby brings one back), and never stops a process that owns its VM live.

import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import {
  logger,
  errorMessage,
  ensurePrivateDir,
  spawnTracked,
  type TrackedProcess,
  LineSplitter,
  sleep,
} from '../util/index.ts';
import { heldGeneration } from '../host/index.ts';
import { controlCommand, type ReleaseMode } from '../replication/index.ts';
import { type EtcdClient, KEYS, LeasedKeys, readCluster, type ClusterView, place } from '../coord/index.ts';

const log = logger('agent');
export const AGENT_TICK_MS = 500;

export interface AgentOptions {
  etcd: EtcdClient;
  etcdUrls: readonly string[];
  name: string;
  /** This host's address as the other hosts reach it (replication links). */
  address: string;
  keyFile: string;
  stateDir: string;
  leaseTtl: number;
  heartbeatMs: number;
  timeoutMs: number;
  policy: string;
  /** How the VMs this agent runs as primaries release their output. */
  mode?: ReleaseMode;
  fsync: boolean;
  /** Passed to the standbys this agent runs. */
  durability: 'memory' | 'disk';
  /** The rubato command (bin/rubato of this checkout). */
  rubato: string;
  onEvent?: (e: Record<string, unknown>) => void;
}

interface Running {
  vm: string;
  role: 'primary' | 'standby';
  proc: TrackedProcess;
  dir: string;
  exited: boolean;
  switchoverAsked: boolean;
}

export class Agent {
  private readonly lease: LeasedKeys;
  private readonly running = new Map<string, Running>();
  private stopped = false;
  private loop: Promise<void> | null = null;

  constructor(private readonly o: AgentOptions) {
    this.lease = new LeasedKeys(o.etcd, o.leaseTtl);
  }

  private emit(e: Record<string, unknown>): void {
    this.o.onEvent?.({ ...e, host: this.o.name, t: Date.now() });
  }

  async start(): Promise<void> {
    ensurePrivateDir(this.o.stateDir);
    await this.lease.put(KEYS.host(this.o.name), JSON.stringify({ name: this.o.name, address: this.o.address }));
    this.emit({ event: 'agent-up', address: this.o.address });
    log.info(`agent ${this.o.name} (${this.o.address}) up`);
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    let failing = false;
    while (!this.stopped) {
      try {
        const view = await readCluster(this.o.etcd);
        if (failing) log.info('the witness answers again');
        failing = false;
        if (await this.leading()) await this.placeAll(view);
        await this.reconcile(view);
      } catch (e) {
        // Without the witness nothing changes here: processes keep running, nothing new starts.
        if (!failing) log.warn(`the witness is out of reach: ${errorMessage(e)}; keeping this host as it is`);
        failing = true;
      }
      await sleep(AGENT_TICK_MS);
    }
  }

  private async leading(): Promise<boolean> {
    if (this.lease.holds(KEYS.leader)) return true;
    const won = await this.lease.putIfAbsent(KEYS.leader, JSON.stringify({ host: this.o.name }));
    if (won) {
      this.emit({ event: 'leader' });
      log.info(`agent ${this.o.name} places the VMs (leader)`);
    }
    return won;
  }

  /** The leader's job: the placement of every VM, written where it changed. */
  private async placeAll(v: ClusterView): Promise<void> {
    const plan = place({
      live: [...v.hosts.keys()],
      draining: v.drains,
      vms: new Map([...v.vms].map(([n, r]) => [n, { home: r.home }])),
      placements: v.placements,
      owners: v.owners,
      generations: v.generations,
    });
    for (const vm of plan.changed) {
      const p = plan.placements.get(vm)!;
      await this.o.etcd.put(KEYS.placement(vm), JSON.stringify(p));
      v.placements.set(vm, p);
      this.emit({ event: 'placed', vm, primary: p.primary, standby: p.standby });
      log.info(`VM ${vm}: primary ${p.primary}, standby ${p.standby ?? 'none (no other host)'}`);
    }
    for (const vm of plan.removed) {
      await this.o.etcd.del(KEYS.placement(vm));
      v.placements.delete(vm);
    }
  }

  /** This host's processes to what the placement says. */
  private async reconcile(v: ClusterView): Promise<void> {
    const me = this.o.name;
    for (const [vm, r] of this.running) {
      if (r.exited) {
        this.running.delete(vm);
        continue;
      }
      const p = v.placements.get(vm);
      const ownsLive = v.owners.get(vm)?.host === me;
      if (ownsLive || p?.primary === me) {
        r.role = 'primary';
        continue;
      }
      if (p?.standby === me && v.vms.has(vm)) {
        // Drain: this standby takes the VM over in order once it protects it.
        const primary = p.primary;
        if (
          v.drains.has(primary) &&
          !r.switchoverAsked &&
          v.statuses.get(vm)?.protected &&
          v.statuses.get(vm)?.host === primary
        ) {
          r.switchoverAsked = true;
          log.info(`VM ${vm}: ${primary} is draining; switching it over to this host`);
          this.emit({ event: 'switchover', vm, from: primary });
          void controlCommand(r.dir, 'switchover').then(
            (a) => {
              if (a['ok'] === false) {
                r.switchoverAsked = false;
                log.warn(`switchover of ${vm}: ${String(a['error'])}`);
              }
            },
            (e: unknown) => {
              r.switchoverAsked = false;
              log.warn(`switchover of ${vm}: ${errorMessage(e)}`);
            },
          );
        }
        continue;
      }
      // Not ours any more (the standby moved, or the VM was removed): stop it in order.
      log.info(`VM ${vm}: its standby is no longer placed here; stopping it`);
      this.emit({ event: 'released', vm, role: r.role });
      this.running.delete(vm);
      await r.proc.stop(10_000);
    }
    for (const [vm, rec] of v.vms) {
      if (this.running.has(vm)) continue;
      const p = v.placements.get(vm);
      if (!p) continue;
      // A VM nobody runs starts here when it never ran, or when this host held its newest generation
      // (its disk here is the VM's newest state: e.g. its guest was stopped on a lost lease with no
      // replica anywhere), as vSphere HA restarts a VM; a stale disk never starts (host/claim.ts).
      const gen = v.generations.get(vm) ?? 0;
      if (p.primary === me && !v.owners.has(vm) && (gen === 0 || heldGeneration(join(this.o.stateDir, vm)) === gen)) {
        if (gen > 0)
          log.warn(
            `VM ${vm}: no copy runs and this host held its newest state (generation ${gen}); restarting it from its disk here`,
          );
        this.startPrimary(vm, rec.definition);
      } else if (p.standby === me && v.owners.get(vm)?.host !== me) this.startStandby(vm);
    }
  }

  private common(): string[] {
    return [
      '--key',
      this.o.keyFile,
      '--etcd',
      this.o.etcdUrls.join(','),
      '--host',
      this.o.name,
      '--lease-ttl',
      String(this.o.leaseTtl),
      '--heartbeat-ms',
      String(this.o.heartbeatMs),
      '--timeout-ms',
      String(this.o.timeoutMs),
      '--events',
    ];
  }

  private startPrimary(vm: string, definition: unknown): void {
    const dir = join(this.o.stateDir, vm);
    ensurePrivateDir(dir);
    const file = join(dir, 'definition.json');
    writeFileSync(file, JSON.stringify(definition, null, 2), { mode: 0o600 });
    log.info(`VM ${vm}: starting it here, protected by the standby the witness names`);
    this.spawn(vm, 'primary', dir, [
      'protect',
      file,
      '--standby',
      'auto',
      '--state-dir',
      dir,
      '--policy',
      this.o.policy,
      '--mode',
      this.o.mode ?? 'buffer',
      ...this.common(),
    ]);
  }

  private startStandby(vm: string): void {
    const dir = join(this.o.stateDir, vm);
    ensurePrivateDir(dir);
    log.info(`VM ${vm}: standing by for it here`);
    this.spawn(vm, 'standby', dir, [
      'standby',
      '--vm',
      vm,
      '--listen',
      `${this.o.address}:0`,
      '--peer',
      'auto',
      '--state-dir',
      dir,
      '--policy',
      this.o.policy,
      ...(this.o.fsync ? [] : ['--no-fsync']),
      '--durability',
      this.o.durability,
      ...this.common(),
    ]);
  }

  private spawn(vm: string, role: 'primary' | 'standby', dir: string, args: string[]): void {
    const proc = spawnTracked(`rubato-${role}-${vm}`, this.o.rubato, args, {
      env: { ...process.env, RUBATO_LOG: process.env['RUBATO_LOG'] ?? 'warn' },
    });
    const r: Running = { vm, role, proc, dir, exited: false, switchoverAsked: false };
    this.running.set(vm, r);
    this.emit({ event: 'spawned', vm, role, pid: proc.pid });
    const lines = new LineSplitter((l) => {
      try {
        this.emit({ ...(JSON.parse(l) as Record<string, unknown>), vm, role: r.role });
      } catch {
        /* not an event */
      }
    });
    proc.child.stdout?.on('data', (d: Buffer) => lines.push(d));
    proc.child.stderr?.on('data', (d: Buffer) => process.stderr.write(d));
    void proc.exited.then(({ code, signal }) => {
      r.exited = true;
      this.emit({ event: 'exited', vm, role: r.role, code, signal });
      if (!this.stopped) log.warn(`VM ${vm}: its ${r.role} process ended (${signal ?? `exit ${code}`})`);
    });
  }

  /** This agent's view: the VM processes it runs. */
  status(): Record<string, unknown> {
    return {
      role: 'agent',
      host: this.o.name,
      vms: [...this.running.values()].map((r) => ({ vm: r.vm, role: r.role, pid: r.proc.pid, running: !r.exited })),
    };
  }

  /** Orderly stop: the processes first (a primary tells its standby: no failover), then the host key. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.loop;
    const all = [...this.running.values()];
    // Standbys last: a primary that stops says goodbye to its standby, which then does not take over.
    for (const r of all.filter((x) => x.role === 'primary')) await r.proc.stop(10_000);
    for (const r of all.filter((x) => x.role === 'standby')) await r.proc.stop(10_000);
    this.running.clear();
    await this.lease.close();
    log.info(`agent ${this.o.name} stopped`);
  }
}
