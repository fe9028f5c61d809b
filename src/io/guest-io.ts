// The I/O a protected guest needs on one host: its network relay (with output commit) behind a
// TAP on the host's bridge, and its NBD disk server. Started before QEMU (primary) or at failover
// (standby: attaching the TAP any earlier would queue frames for a guest that is not running).

import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { spawnTracked, type TrackedProcess, RubatoError } from '../util/index.ts';
import { NetRelay } from './net/relay.ts';
import { NbdServer } from './disk/nbd-server.ts';
import { addTap, delTap, type TapSite } from './net/tap.ts';

export class GuestIo {
  private constructor(
    readonly relay: NetRelay,
    readonly nbd: NbdServer | null,
    private readonly site: TapSite,
    private readonly tap: string,
    private readonly taprelay: TrackedProcess,
  ) {}

  get netSocket(): string {
    return this.relay.guestSocketPath;
  }
  get nbdSocket(): string | undefined {
    return this.nbd?.socketPath;
  }

  /**
   * `site`: the bridge the guest's TAP joins (and its namespace, in test topologies); `tapRelay`:
   * the TAP helper's binary (built by setup before any guest starts, never here).
   */
  static async start(
    site: TapSite,
    dir: string,
    tag: string,
    diskImage: string | null,
    tapRelay: string,
    existing: {
      relay?: NetRelay | undefined;
      nbd?: NbdServer | undefined;
      /** (a promoted secondary's disk servers: the first one is this guest's disk) */
      nbds?: readonly NbdServer[] | undefined;
    } = {},
  ): Promise<GuestIo> {
    const tap = tapName(tag);
    const bin = tapRelay;
    // (`existing`: the relay and disk server a running guest is already connected to — a promoted secondary's)
    const relay = existing.relay ?? new NetRelay(join(dir, `${tag}.net`));
    if (!existing.relay) await relay.start();
    const kept = existing.nbd ?? existing.nbds?.[0];
    const nbd = kept ?? (diskImage ? new NbdServer(diskImage, join(dir, `${tag}.nbd`)) : null);
    try {
      if (!kept) await nbd?.start();
      await addTap(site, tap);
    } catch (e) {
      await nbd?.close().catch(() => {});
      await relay.close();
      throw e;
    }
    const sock = join(dir, `${tag}.tap`);
    const p = site.ns
      ? spawnTracked(`taprelay:${tag}`, 'ip', ['netns', 'exec', site.ns, bin, tap, sock])
      : spawnTracked(`taprelay:${tag}`, bin, [tap, sock]);
    const ready = await new Promise<boolean>((resolve) => {
      let out = '';
      p.child.stdout?.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('ready')) resolve(true);
      });
      void p.exited.then(() => resolve(false));
      setTimeout(() => resolve(false), 5000);
    });
    if (!ready) {
      p.kill();
      await relay.close();
      await nbd?.close().catch(() => {});
      await delTap(site, tap);
      throw new RubatoError('RUBATO_NETNS', `taprelay for ${tap}${site.ns ? ` in ${site.ns}` : ''} did not start`);
    }
    await relay.attachOutside(sock);
    return new GuestIo(relay, nbd, site, tap, p);
  }

  /** The host dies or the guest moves: relay, disk server, TAP helper and TAP all go. */
  async close(): Promise<void> {
    this.taprelay.kill('SIGKILL');
    await this.taprelay.exited;
    await this.relay.close();
    await this.nbd?.close();
    await delTap(this.site, this.tap);
  }
}

/**
 * The TAP device of the guest tagged `tag`: `tap` + the tag when that fits an interface name (15
 * characters), else its first 6 characters and 6 hex digits of its hash — two guests whose tags
 * share a prefix never get the same device.
 */
export function tapName(tag: string): string {
  const plain = `tap${tag}`;
  return plain.length <= 15
    ? plain
    : `tap${tag.slice(0, 6)}${createHash('sha256').update(tag).digest('hex').slice(0, 6)}`;
}
