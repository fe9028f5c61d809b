// A replication link with a speed class: a namespace for the standby, a veth pair from this
// (root) namespace into it, and tbf on our end shaping the checkpoint stream (primary → standby).
// The kernel here has tbf but no netem: classes differ in bandwidth only, not in delay.

import { randomInt } from 'node:crypto';
import { connect } from 'node:net';
import { addNamespace, delNamespace, ip } from './netns.ts';
import { runCommand, spawnTracked, RubatoError } from '../../util/index.ts';

export const LINK_CLASSES = {
  unlimited: null,
  '10gbit': { rate: '10gbit', burst: '2mb' },
  '1gbit': { rate: '1gbit', burst: '256kb' },
  /** A slow standby (10 MB/s): the primary's back-pressure and memory bound under it. */
  '10mbyte': { rate: '80mbit', burst: '64kb' },
} as const;
export type LinkClass = keyof typeof LINK_CLASSES;

export class ShapedLink {
  private constructor(
    readonly ns: string,
    readonly dev: string,
    readonly localIp: string,
    readonly remoteIp: string,
  ) {}

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
    const r = await runCommand('tc', [
      'qdisc',
      'add',
      'dev',
      this.dev,
      'root',
      'tbf',
      'rate',
      spec.rate,
      'burst',
      spec.burst,
      'latency',
      '50ms',
    ]);
    if (r.code !== 0) throw new RubatoError('RUBATO_NETNS', `tc tbf on ${this.dev} failed: ${r.stderr.trim()}`);
  }

  /**
   * TCP goodput of the link as it is shaped now, MB/s: a bulk transfer of `ms` into a sink in the
   * namespace, counted by the sink from its first byte to its last. What a class really carries
   * (tbf counts headers; TCP and the 2 cores take their share), for the simulator to replay with.
   */
  async goodputMBps(ms = 1500): Promise<number> {
    const port = randomInt(20000, 60000);
    const sinkJs = `const s=require('net').createServer((c)=>{let n=0,t0=0,t1=0;c.on('data',(d)=>{const t=performance.now();if(!n)t0=t;t1=t;n+=d.length});c.on('end',()=>{process.stdout.write(JSON.stringify({n,ms:t1-t0})+'\\n');c.end();s.close()})});s.listen(${port},'${this.remoteIp}',()=>process.stdout.write('ready\\n'))`;
    const sink = spawnTracked('goodput-sink', 'ip', ['netns', 'exec', this.ns, process.execPath, '-e', sinkJs]);
    try {
      let out = '';
      let onOut = () => {};
      sink.child.stdout?.on('data', (d: Buffer) => {
        out += d.toString();
        onOut();
      });
      const line = (re: RegExp) =>
        new Promise<string>((resolve, reject) => {
          const t = setTimeout(
            () =>
              reject(
                new RubatoError(
                  'RUBATO_NETNS',
                  `goodput sink on ${this.ns} did not answer (${out.trim() || 'no output'})`,
                ),
              ),
            ms + 10_000,
          );
          onOut = () => {
            const m = out.match(re);
            if (m) {
              clearTimeout(t);
              resolve(m[0]);
            }
          };
          onOut();
        });
      await line(/ready/);
      const chunk = Buffer.alloc(1 << 20, 0x5a);
      await new Promise<void>((resolve, reject) => {
        const sock = connect(port, this.remoteIp);
        sock.on('error', reject);
        const end = Date.now() + ms;
        const pump = () => {
          while (Date.now() < end)
            if (!sock.write(chunk)) {
              sock.once('drain', pump);
              return;
            }
          sock.end(() => resolve());
        };
        sock.on('connect', pump);
      });
      const r = JSON.parse(await line(/\{.*\}/)) as { n: number; ms: number };
      return r.ms > 0 ? r.n / r.ms / 1000 : 0;
    } finally {
      await sink.stop(1000);
    }
  }

  /** Deleting the namespace removes the veth pair (and its qdisc) too. */
  async destroy(): Promise<void> {
    await delNamespace(this.ns);
  }
}
