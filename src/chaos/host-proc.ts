// The harness's handle on one chaos host run as its own process (chaos-host.ts): requests over the
// IPC channel, the host's events (its primary's, its standby's, its guard's) as they come, and the
// host's fate: killed as a host dies (its process group), frozen and thawed as a host stalls.

import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { RubatoError, logger, spawnTracked, type TrackedProcess } from '../util/index.ts';
import { REPO_ROOT } from '../setup/index.ts';
import type { LanHost } from '../io/index.ts';
import type { QemuBinary } from '../qemu/index.ts';
import type { RigGuest } from './kv-rig.ts';
import { showStderr } from './controller-proc.ts';

const log = logger('chaos');

/** What a host process is told once, at its start. */
export interface HostInit {
  name: string;
  lan: LanHost;
  /** This host's way to the witness (the harness's proxy, which faults can cut). */
  etcdUrl: string;
  dir: string;
  binary: QemuBinary;
  tapRelay: string;
  psk: Buffer;
  vmName: string;
  ttl: number;
  witness: boolean;
}

export type HostRequest =
  /** Boots the rig's guest here and (with a witness) claims the VM: the first live copy. */
  | { op: 'boot'; guest: RigGuest }
  /** A standby controller for the round's pair: answers with the port it listens on. */
  | { op: 'standby'; round: number; timeoutMs: number }
  /** Protects the live copy here with the standby behind `standbyPort` (the harness's link proxy). */
  | { op: 'primary'; standbyPort: number; policy: string; mode: string; timeoutMs: number }
  /** The next mid-epoch capture fails once. */
  | { op: 'fail-capture' }
  | { op: 'status' }
  /** The standby here took over: its guest becomes the live copy. */
  | { op: 'promote' }
  /** Its standby died: the primary side ends, the guest runs on (a fresh standby protects it next). */
  | { op: 'unpair' }
  | { op: 'shutdown' };

export type HostReply = { id: number; ok: true; value: unknown } | { id: number; ok: false; error: string };

export interface HostStatus {
  /** The primary's snapshot (null: no primary side here). */
  snapshot: Record<string, unknown> | null;
  protected: boolean;
  /** The standby's status (null: no standby here). */
  standby: Record<string, unknown> | null;
  /** The live copy's QEMU has exited (null: no live copy here). */
  guestExited: boolean | null;
  qemuPid: number | null;
}

export type Timed<T> = T & { t: number };

export class HostProc {
  /** Events of the pair this host is in now (the harness swaps the arrays per pair). */
  pEvents: Array<Timed<Record<string, unknown>>> = [];
  sEvents: Array<Timed<Record<string, unknown>>> = [];
  gEvents: Array<Timed<Record<string, unknown>>> = [];
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private dead = false;
  private frozen: number[] = [];

  private constructor(
    readonly name: string,
    private readonly proc: TrackedProcess,
  ) {
    proc.child.on('message', (m: HostReply | { ev: 'p' | 's' | 'g'; e: Timed<Record<string, unknown>> }) => {
      if ('ev' in m) {
        ({ p: this.pEvents, s: this.sEvents, g: this.gEvents })[m.ev].push(m.e);
        return;
      }
      const w = this.pending.get(m.id);
      if (!w) return;
      this.pending.delete(m.id);
      if (m.ok) w.resolve(m.value);
      else w.reject(new RubatoError('RUBATO_PROTOCOL', `${name}: ${m.error}`));
    });
    showStderr(name, proc);
    void proc.exited.then((x) => {
      this.dead = true;
      for (const w of this.pending.values())
        w.reject(new RubatoError('RUBATO_PEER_LOST', `${name}: its process ended (${x.signal ?? x.code})`));
      this.pending.clear();
    });
  }

  /** Starts a host process in a process group of its own (the group is the host: everything it starts is in it). */
  static async start(init: HostInit): Promise<HostProc> {
    const tsx = pathToFileURL(join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs')).href;
    const proc = spawnTracked(
      `chaos-host:${init.name}`,
      process.execPath,
      ['--import', tsx, join(REPO_ROOT, 'src', 'chaos', 'chaos-host.ts')],
      {
        detached: true,
        stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
        serialization: 'advanced',
        env: { ...process.env, RUBATO_LOG: process.env['RUBATO_LOG'] ?? 'warn' },
      },
    );
    const h = new HostProc(init.name, proc);
    await h.send({ init }, 60_000);
    return h;
  }

  get pid(): number {
    return this.proc.pid;
  }
  get alive(): boolean {
    return !this.dead;
  }

  call<T>(req: HostRequest, timeoutMs = 180_000): Promise<T> {
    return this.send({ req }, timeoutMs) as Promise<T>;
  }

  status(): Promise<HostStatus> {
    return this.call<HostStatus>({ op: 'status' }, 30_000);
  }

  private send(m: object, timeoutMs: number): Promise<unknown> {
    if (this.dead) return Promise.reject(new RubatoError('RUBATO_PEER_LOST', `${this.name}: its process has ended`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.pending.delete(id);
        reject(
          new RubatoError(
            'RUBATO_PEER_LOST',
            `${this.name}: no answer to ${JSON.stringify(m).slice(0, 60)} within ${timeoutMs} ms`,
          ),
        );
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (v) => {
          clearTimeout(t);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      });
      this.proc.child.send({ id, ...m });
    });
  }

  /** A signal to the whole host: its controller, its QEMUs, its TAP helpers. */
  private signal(sig: NodeJS.Signals): void {
    if (this.dead) return;
    try {
      process.kill(-this.proc.pid, sig);
    } catch (e) {
      log.debug(`${this.name}: ${sig}: ${String(e)}`);
    }
  }

  /** The host dies: no goodbye from anything on it. */
  async kill(): Promise<void> {
    this.signal('SIGKILL');
    await this.proc.exited;
  }

  /**
   * The host's controller and its guest's QEMU freeze (SIGSTOP) ... The TAP helper runs on: a frame the controller
   * released before it froze reaches the LAN at once, as it would have left a frozen host's NIC before the freeze.
   */
  async freeze(): Promise<void> {
    const { qemuPid } = await this.status();
    this.frozen = [this.proc.pid, ...(qemuPid ? [qemuPid] : [])];
    for (const pid of this.frozen) signalPid(pid, 'SIGSTOP');
  }

  /** ... and run on, unaware of the time that passed. */
  thaw(): void {
    for (const pid of this.frozen) signalPid(pid, 'SIGCONT');
    this.frozen = [];
  }

  /** Ends the host in order (its guests stopped, its VM given up), or kills it when that takes too long. */
  async stop(): Promise<void> {
    if (this.dead) return;
    this.thaw();
    await this.call({ op: 'shutdown' }, 30_000).catch((e) => log.warn(`${this.name}: ${String(e)}`));
    await Promise.race([this.proc.exited, new Promise((r) => setTimeout(r, 5000))]);
    await this.kill();
  }
}

function signalPid(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    /* gone */
  }
}
