// The guest's L2 network for tests, chaos and benchmarks: a "lan" namespace holding a bridge, a
// client namespace on it, and hosts whose own bridge joins their TAP devices to the lan. After a
// failover the restored guest appears behind another host's TAP; the lan bridge learns the new
// port from QEMU's announcements. Everything is tracked and removed.

import { randomInt } from 'node:crypto';
import { addNamespace, delNamespace, ip } from './netns.ts';
import { runCommand } from '../../util/index.ts';

export interface LanHost {
  name: string;
  ns: string;
  bridge: string;
  ip: string;
  uplink: string;
}

export class Lan {
  readonly hosts: LanHost[] = [];
  private n = 0;
  private constructor(
    readonly id: string,
    readonly lanNs: string,
    readonly clientNs: string,
    readonly subnet: string,
  ) {}

  get clientIp(): string {
    return `${this.subnet}.100`;
  }
  get guestIp(): string {
    return `${this.subnet}.10`;
  }

  /** `subnet`: the first three octets (default: a random 10.232.x); the guest is .10, the client .100. */
  static async create(tag: string, opts: { subnet?: string } = {}): Promise<Lan> {
    const id = `${process.pid % 10000}${randomInt(10, 99)}`;
    const lan = new Lan(
      id,
      `rubato-${tag}-lan-${id}`,
      `rubato-${tag}-cli-${id}`,
      opts.subnet ?? `10.232.${randomInt(0, 255)}`,
    );
    try {
      await addNamespace(lan.lanNs);
      await ip(['-n', lan.lanNs, 'link', 'add', 'br0', 'type', 'bridge', 'forward_delay', '0']);
      await ip(['-n', lan.lanNs, 'link', 'set', 'br0', 'up']);
      await addNamespace(lan.clientNs);
      await lan.plug(lan.clientNs, `rc${id}`);
      await ip(['-n', lan.clientNs, 'addr', 'add', `${lan.clientIp}/24`, 'dev', `rc${id}`]);
    } catch (e) {
      await lan.destroy();
      throw e;
    }
    return lan;
  }

  /** A veth from `ns` to the lan bridge; returns the name of the end inside `ns`. */
  private async plug(ns: string, dev: string): Promise<string> {
    const peer = `${dev}l`;
    await ip(['link', 'add', dev, 'netns', ns, 'type', 'veth', 'peer', 'name', peer, 'netns', this.lanNs]);
    await ip(['-n', this.lanNs, 'link', 'set', peer, 'master', 'br0']);
    await ip(['-n', this.lanNs, 'link', 'set', peer, 'up']);
    await ip(['-n', ns, 'link', 'set', dev, 'up']);
    return dev;
  }

  async addHost(name: string): Promise<LanHost> {
    const k = this.n++;
    const ns = await addNamespace(`rubato-${name}-${this.id}`);
    // No IPv6 chatter (router solicitations, MLD) from the host itself: its LAN port carries the guest's frames and its
    // own IPv4 only.
    for (const k of ['all', 'default'])
      await runCommand('ip', ['netns', 'exec', ns, 'sysctl', '-qw', `net.ipv6.conf.${k}.disable_ipv6=1`]);
    const dev = await this.plug(ns, `rh${k}${this.id}`);
    await ip(['-n', ns, 'link', 'add', 'brh', 'type', 'bridge', 'forward_delay', '0']);
    await ip(['-n', ns, 'link', 'set', dev, 'master', 'brh']);
    await ip(['-n', ns, 'link', 'set', 'brh', 'up']);
    // The host's own address on the LAN (its controllers talk over it): .1, .2, …
    await ip(['-n', ns, 'addr', 'add', `${this.subnet}.${k + 1}/24`, 'dev', 'brh']);
    const h = { name, ns, bridge: 'brh', ip: `${this.subnet}.${k + 1}`, uplink: dev };
    this.hosts.push(h);
    return h;
  }

  /**
   * Joins a host of another LAN to this one too, through its own bridge `bridge` there (a guest's
   * second NIC goes on it): another L2 segment, reached only through that bridge.
   */
  async attachHost(h: LanHost, bridge: string): Promise<void> {
    const dev = await this.plug(h.ns, `rx${this.n++}${this.id}`);
    await ip(['-n', h.ns, 'link', 'add', bridge, 'type', 'bridge', 'forward_delay', '0']);
    await ip(['-n', h.ns, 'link', 'set', dev, 'master', bridge]);
    await ip(['-n', h.ns, 'link', 'set', bridge, 'up']);
  }

  /**
   * Puts the machine's own namespace on the LAN at `.${suffix}` (a service every host reaches, such
   * as the witness, that this process also talks to). The veth goes with the lan namespace.
   */
  async attachRoot(suffix: number): Promise<string> {
    const dev = `rr${this.id}`;
    await ip(['link', 'add', dev, 'type', 'veth', 'peer', 'name', `${dev}l`, 'netns', this.lanNs]);
    await ip(['-n', this.lanNs, 'link', 'set', `${dev}l`, 'master', 'br0']);
    await ip(['-n', this.lanNs, 'link', 'set', `${dev}l`, 'up']);
    await ip(['addr', 'add', `${this.subnet}.${suffix}/24`, 'dev', dev]);
    await ip(['link', 'set', dev, 'up']);
    return `${this.subnet}.${suffix}`;
  }

  async destroy(): Promise<void> {
    for (const h of this.hosts) await delNamespace(h.ns);
    await delNamespace(this.clientNs);
    await delNamespace(this.lanNs);
  }
}
