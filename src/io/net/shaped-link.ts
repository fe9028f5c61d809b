// A replication link with a speed class: a namespace for the standby, a veth pair from this
// (root) namespace into it, and tbf on our end shaping the checkpoint stream (primary → standby).
// The kernel here has tbf but no netem: classes differ in bandwidth only, not in delay.

import { randomInt } from 'node:crypto';
import { addNamespace, delNamespace, ip } from './netns.ts';
import { runCommand } from '../../util/procs.ts';
import { RubatoError } from '../../util/errors.ts';

export const LINK_CLASSES = { unlimited: null, '10gbit': { rate: '10gbit', burst: '2mb' }, '1gbit': { rate: '1gbit', burst: '256kb' } } as const;
export type LinkClass = keyof typeof LINK_CLASSES;

export class ShapedLink {
  private constructor(readonly ns: string, readonly dev: string, readonly localIp: string, readonly remoteIp: string) {}

  static async create(): Promise<ShapedLink> {
    const id = `${process.pid % 10000}${randomInt(10, 99)}`;
    const ns = await addNamespace(`rubato-link-${id}`);
    const dev = `rbl${id}`;
    const peer = `rbk${id}`;
    const third = randomInt(0, 255);
    const l = new ShapedLink(ns, dev, `10.233.${third}.1`, `10.233.${third}.2`);
    try {
      await ip(['link', 'add', dev, 'type', 'veth', 'peer', 'name', peer, 'netns', ns]);
      await ip(['addr', 'add', `${l.localIp}/30`, 'dev', dev]);
      await ip(['link', 'set', dev, 'up']);
      await ip(['-n', ns, 'addr', 'add', `${l.remoteIp}/30`, 'dev', peer]);
      await ip(['-n', ns, 'link', 'set', peer, 'up']);
    } catch (e) {
      await delNamespace(ns);
      throw e;
    }
    return l;
  }

  async setClass(c: LinkClass): Promise<void> {
    await runCommand('tc', ['qdisc', 'del', 'dev', this.dev, 'root']);
    const spec = LINK_CLASSES[c];
    if (!spec) return;
    const r = await runCommand('tc', ['qdisc', 'add', 'dev', this.dev, 'root', 'tbf', 'rate', spec.rate, 'burst', spec.burst, 'latency', '50ms']);
    if (r.code !== 0) throw new RubatoError('RUBATO_NETNS', `tc tbf on ${this.dev} failed: ${r.stderr.trim()}`);
  }

  /** Deleting the namespace removes the veth pair (and its qdisc) too. */
  async destroy(): Promise<void> { await delNamespace(this.ns); }
}
