// The embedded default witness: a single-member etcd (Debian's etcd-server) started by Rubato on
// loopback, its data in a private folder, tracked and ended by PID. Production points at the
// operator's cluster instead (--etcd URL,...).

import { createServer } from 'node:net';
import { join } from 'node:path';
import { rmSync } from 'node:fs';
import { ensurePrivateDir, spawnTracked, type TrackedProcess, RubatoError, sleep } from '../util/index.ts';
import { EtcdClient } from './etcd.ts';
import { WITNESS_NICE } from './ownership.ts';

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

export class LocalEtcd {
  private constructor(
    readonly url: string,
    private readonly proc: TrackedProcess,
    private readonly dataDir: string,
    private readonly keepData: boolean,
  ) {}

  /** Resolves when etcd exits on its own. */
  get exited(): Promise<unknown> {
    return this.proc.exited;
  }

  get pid(): number {
    return this.proc.pid;
  }

  /** `host`: the address to listen on (default loopback; in a namespace, its LAN address). */
  static async start(
    dir: string,
    opts: {
      binary?: string;
      ns?: string;
      host?: string;
      clientPort?: number;
      peerPort?: number;
      keepData?: boolean;
    } = {},
  ): Promise<LocalEtcd> {
    ensurePrivateDir(dir);
    const dataDir = join(dir, 'etcd-data');
    const [client, peer] = [opts.clientPort ?? (await freePort()), opts.peerPort ?? (await freePort())];
    const host = opts.host ?? '127.0.0.1';
    const url = `http://${host}:${client}`;
    const args = [
      '--name',
      'rubato',
      '--data-dir',
      dataDir,
      '--listen-client-urls',
      url,
      '--advertise-client-urls',
      url,
      '--listen-peer-urls',
      `http://${host}:${peer}`,
      '--initial-advertise-peer-urls',
      `http://${host}:${peer}`,
      '--initial-cluster',
      `rubato=http://${host}:${peer}`,
      '--log-level',
      'error',
      // A single local member: short raft timers, so that etcd grants leases down to 1 s (its minimum
      // TTL is 1.5 election timeouts) and a crashed primary is replaced within about 2 s.
      '--heartbeat-interval',
      '50',
      '--election-timeout',
      '500',
    ];
    const bin = opts.binary ?? '/usr/bin/etcd';
    // Ahead of the guests' vCPUs on a busy host (as root): a witness that answers late costs leases.
    const cmd = process.getuid?.() === 0 ? ['nice', '-n', String(WITNESS_NICE), bin, ...args] : [bin, ...args];
    const proc = opts.ns
      ? spawnTracked('etcd', 'ip', ['netns', 'exec', opts.ns, ...cmd])
      : spawnTracked('etcd', cmd[0]!, cmd.slice(1));
    let stderr = '';
    let exited = false;
    void proc.exited.then(() => {
      exited = true;
    });
    proc.child.stderr?.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-2000);
    });
    const etcd = new LocalEtcd(url, proc, dataDir, opts.keepData ?? false);
    const c = new EtcdClient([url], 500);
    const until = Date.now() + 15_000;
    while (!(await c.healthy())) {
      if (exited || Date.now() > until) {
        await etcd.stop();
        throw new RubatoError(
          'RUBATO_SETUP_FAILED',
          `the local etcd did not become healthy: ${stderr.trim().split('\n').at(-1) ?? 'no output'} (is etcd-server installed? rubato setup)`,
        );
      }
      await sleep(100);
    }
    return etcd;
  }

  /** Ends etcd by PID and removes its data (unless kept: `rubato witness`). */
  async stop(): Promise<void> {
    await this.proc.stop(3000);
    if (!this.keepData) rmSync(this.dataDir, { recursive: true, force: true });
  }
}
