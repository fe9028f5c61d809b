// One host of the chaos pair as a process of its own (started by host-proc.ts, spoken to over its
// IPC channel): the guest's copy that runs here with its I/O (relay, disk server, TAP), and this
// host's side of the pair — the primary's controller, gate and guard, or the standby's controller
// that restores the guest here at failover. Wired exactly as the product wires them
// (host/primary-side.ts, host/standby-side.ts). Being a process, the host can die as a host dies
// (SIGKILL of its process group: controller, QEMU, TAP helper at once) and freeze as a host freezes
// (SIGSTOP of the group, then SIGCONT), which an in-process controller cannot.

import { join } from 'node:path';
import { RubatoError, errorMessage, logger } from '../util/index.ts';
import { GuestIo } from '../io/index.ts';
import type { QemuVm } from '../qemu/index.ts';
import { DISK_BLOCK_ID, type StandbyController } from '../replication/index.ts';
import { EtcdClient, Ownership, witnessGate, type WitnessGate } from '../coord/index.ts';
import { parsePolicy } from '../scheduler/index.ts';
import { type PrimarySide, standbySide, startPrimarySide } from '../host/index.ts';
import { bootRigGuest } from './kv-rig.ts';
import type { HostInit, HostReply, HostRequest, HostStatus } from './host-proc.ts';

const log = logger('chaos-host');

interface Live {
  vm: QemuVm;
  io: GuestIo;
  ownership: Ownership | null;
}

class ChaosHost {
  private live: Live | null = null;
  private side: PrimarySide | null = null;
  private standby: StandbyController | null = null;
  private gate: WitnessGate | null = null;
  private nextIo: GuestIo | null = null;
  private failCapture = false;
  private readonly etcd: EtcdClient;

  constructor(private readonly init: HostInit) {
    this.etcd = new EtcdClient([init.etcdUrl], 500);
  }

  async handle(r: HostRequest): Promise<unknown> {
    switch (r.op) {
      case 'boot': {
        const { io, vm } = await bootRigGuest(r.guest, this.init.lan, this.init.dir);
        const ownership = this.init.witness
          ? new Ownership(this.etcd, this.init.vmName, this.init.name, this.init.ttl)
          : null;
        this.live = { vm, io, ownership };
        if (ownership && (await ownership.claim()) === null)
          throw new RubatoError('RUBATO_VM_OWNED', 'the fresh witness refused the first claim');
        return { qemuPid: vm.pid };
      }
      case 'standby':
        return { port: await this.startStandby(r.round, r.timeoutMs) };
      case 'primary':
        this.startPrimary(r.standbyPort, r.policy, r.mode, r.timeoutMs);
        return null;
      case 'fail-capture':
        this.failCapture = true;
        return null;
      case 'status':
        return this.status();
      case 'promote':
        return this.promote();
      case 'unpair':
        this.side?.guard?.close();
        await this.side?.primary.stop().catch(() => {});
        this.side = null;
        return null;
      case 'shutdown':
        await this.shutdown();
        return null;
    }
  }

  private send(kind: 'p' | 's' | 'g', e: object): void {
    process.send?.({ ev: kind, e: JSON.parse(JSON.stringify({ ...e, t: Date.now() })) });
  }

  private async startStandby(round: number, timeoutMs: number): Promise<number> {
    const { init } = this;
    this.gate = init.witness ? witnessGate(this.etcd, init.name, init.ttl) : null;
    // The product's wiring (host/standby-side.ts): the gate, and the restored guest's frames under its lease.
    const standby = standbySide({
      listen: { host: '127.0.0.1', port: 0 },
      gate: this.gate,
      stateDir: join(init.dir, `standby${round}`),
      psk: init.psk,
      heartbeatMs: 50,
      timeoutMs,
      fsync: false,
      binaryFor: async () => init.binary,
      onEvent: (e) => this.send('s', e),
      restoreIo: async (_id, store, existing) => {
        const io = await GuestIo.start(
          init.lan,
          init.dir,
          `g${round}`,
          store.blocks.some((b) => b.id === DISK_BLOCK_ID) ? store.imagePath(DISK_BLOCK_ID) : null,
          init.tapRelay,
          existing,
        );
        this.nextIo = io;
        return {
          relay: io.relay,
          netSockets: [io.netSocket],
          nbdSockets: io.nbdSocket ? [io.nbdSocket] : [],
          close: async () => {
            if (this.nextIo === io) this.nextIo = null;
            await io.close();
          },
        };
      },
    });
    this.standby = standby;
    await standby.start();
    return standby.boundPort;
  }

  private startPrimary(standbyPort: number, policy: string, mode: string, timeoutMs: number): void {
    const l = this.live;
    if (!l) throw new RubatoError('RUBATO_PROTOCOL', `${this.init.name} runs no guest to protect`);
    // The product's wiring (host/primary-side.ts): gate, guard, generation, a dying QEMU's word.
    this.side = startPrimarySide({
      vm: l.vm,
      runDir: this.init.dir,
      standby: { host: '127.0.0.1', port: standbyPort },
      psk: this.init.psk,
      heartbeatMs: 50,
      timeoutMs,
      retryMs: 300,
      io: { relay: l.io.relay, nbds: l.io.nbd ? [l.io.nbd] : [] },
      policy: parsePolicy(policy),
      ownership: l.ownership,
      more: {
        mode: mode as 'buffer',
        // A capture failure on the primary (QEMU's stream breaks mid-epoch), once when asked.
        fault: (point) => {
          if (point === 'mid-epoch' && this.failCapture) {
            this.failCapture = false;
            throw new RubatoError('RUBATO_PROTOCOL', 'injected capture failure');
          }
        },
      },
      onEvent: (e) => this.send('p', e),
      onGuardEvent: (e) => this.send('g', e),
    });
  }

  private status(): HostStatus {
    const json = (v: unknown) => (v === undefined ? null : (JSON.parse(JSON.stringify(v)) as Record<string, unknown>));
    return {
      snapshot: this.side ? json(this.side.primary.snapshot()) : null,
      protected: this.side?.primary.protected ?? false,
      standby: this.standby ? json(this.standby.status()) : null,
      guestExited: this.live ? this.live.vm.exited : null,
      qemuPid: this.live?.vm.pid ?? null,
    };
  }

  /** The standby here took over: its restored guest becomes this host's live copy, its standby controller ends. */
  private async promote(): Promise<{ qemuPid: number }> {
    const s = this.standby;
    const vm = s?.vm;
    if (!s || !vm || !this.nextIo)
      throw new RubatoError('RUBATO_PROTOCOL', `${this.init.name} restored no guest to run`);
    s.vm = null;
    this.live = { vm, io: this.nextIo, ownership: this.gate?.ownership(this.init.vmName) ?? null };
    this.nextIo = null;
    await s.stop();
    this.standby = null;
    return { qemuPid: vm.pid };
  }

  /** Everything here ends: controllers, guests, their I/O; the VM given up in the witness. */
  private async shutdown(): Promise<void> {
    const steps: Array<() => Promise<unknown> | unknown> = [
      () => this.side?.guard?.close(),
      () => this.side?.primary.stop(),
      () => this.standby?.stop(),
      () => this.standby?.vm?.stop(),
      () => this.nextIo?.close(),
      () => this.live?.vm.stop(),
      () => this.live?.io.close(),
      () => this.live?.ownership?.release(),
    ];
    for (const step of steps) {
      try {
        await step();
      } catch (e) {
        log.warn(`${this.init.name}: shutdown step failed: ${errorMessage(e)}`);
      }
    }
  }
}

let host: ChaosHost | null = null;
process.on('message', (m: { id: number; init?: HostInit; req?: HostRequest }) => {
  void (async () => {
    let reply: HostReply;
    try {
      if (m.init) {
        host = new ChaosHost(m.init);
        reply = { id: m.id, ok: true, value: null };
      } else if (!host || !m.req) throw new RubatoError('RUBATO_PROTOCOL', 'a chaos host asked before its init');
      else reply = { id: m.id, ok: true, value: await host.handle(m.req) };
    } catch (e) {
      reply = { id: m.id, ok: false, error: errorMessage(e) };
    }
    process.send?.(reply);
    if (m.req?.op === 'shutdown') process.exit(0);
  })();
});
// The harness gone: this host goes too (its guests die with it by their death signal).
process.on('disconnect', () => process.exit(1));
