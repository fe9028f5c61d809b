// Hosts on one machine: network namespaces joined by a veth pair (the replication link). Every
// namespace made here is tracked and deleted on success, on failure and at exit; never by name
// pattern, only the ones this process created.

import { execFileSync } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { runCommand, RubatoError } from '../../util/index.ts';

const made = new Set<string>();
let hooked = false;

export async function ip(args: string[]): Promise<void> {
  const r = await runCommand('ip', args);
  if (r.code !== 0) throw new RubatoError('RUBATO_NETNS', `ip ${args.join(' ')} failed: ${r.stderr.trim()}`);
}

export interface Host {
  ns: string;
  ip: string;
  dev: string;
}

export class TwoHosts {
  private constructor(
    readonly primary: Host,
    readonly standby: Host,
  ) {}

  /** Makes two namespaces and a veth pair between them with a /30 of its own. */
  static async create(tag = 'demo'): Promise<TwoHosts> {
    hookExit();
    const id = `${process.pid % 10000}${randomInt(100, 999)}`;
    const subnet = randomInt(0, 63) * 4;
    const p: Host = { ns: `rubato-${tag}-p-${id}`, ip: `10.231.${randomInt(0, 255)}.${subnet + 1}`, dev: `rbp${id}` };
    const s: Host = { ns: `rubato-${tag}-s-${id}`, ip: p.ip.replace(/\.\d+$/, `.${subnet + 2}`), dev: `rbs${id}` };
    try {
      for (const h of [p, s]) {
        await ip(['netns', 'add', h.ns]);
        made.add(h.ns);
      }
      await ip(['link', 'add', p.dev, 'netns', p.ns, 'type', 'veth', 'peer', 'name', s.dev, 'netns', s.ns]);
      for (const h of [p, s]) {
        await ip(['-n', h.ns, 'addr', 'add', `${h.ip}/30`, 'dev', h.dev]);
        await ip(['-n', h.ns, 'link', 'set', h.dev, 'up']);
        await ip(['-n', h.ns, 'link', 'set', 'lo', 'up']);
      }
    } catch (e) {
      await new TwoHosts(p, s).destroy();
      throw e;
    }
    return new TwoHosts(p, s);
  }

  /**
   * A third machine both hosts reach apart from the replication link (the witness's place): a veth
   * pair from this machine's root namespace into each host. Returns the address to serve on (the
   * root end of the primary's pair; the standby routes to it through its own pair). Deleting the
   * namespaces removes the pairs.
   */
  async attachWitness(): Promise<string> {
    const net = `10.232.${randomInt(0, 255)}`;
    const base = randomInt(0, 31) * 8;
    const at = (n: number) => `${net}.${base + n}`;
    const pairs = [
      { h: this.primary, root: at(1), inner: at(2) },
      { h: this.standby, root: at(5), inner: at(6) },
    ];
    for (const [i, q] of pairs.entries()) {
      const dev = `rw${i}${q.h.dev.slice(3)}`;
      await ip(['link', 'add', dev, 'type', 'veth', 'peer', 'name', `${dev}i`, 'netns', q.h.ns]);
      await ip(['addr', 'add', `${q.root}/30`, 'dev', dev]);
      await ip(['link', 'set', dev, 'up']);
      await ip(['-n', q.h.ns, 'addr', 'add', `${q.inner}/30`, 'dev', `${dev}i`]);
      await ip(['-n', q.h.ns, 'link', 'set', `${dev}i`, 'up']);
    }
    await ip(['-n', this.standby.ns, 'route', 'add', `${at(1)}/32`, 'via', at(5)]);
    return at(1);
  }

  /** A partition: the primary's end of the link goes down; no FIN or RST reaches the standby. */
  async cutLink(): Promise<void> {
    await ip(['-n', this.primary.ns, 'link', 'set', this.primary.dev, 'down']);
  }

  async destroy(): Promise<void> {
    for (const h of [this.primary, this.standby]) {
      if (!made.has(h.ns)) continue;
      await runCommand('ip', ['netns', 'del', h.ns]);
      made.delete(h.ns);
    }
  }
}

export function liveNamespaces(): string[] {
  return [...made];
}

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', () => {
    for (const ns of made) {
      try {
        execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
      } catch {
        /* gone */
      }
    }
  });
}

/** Makes a tracked namespace with loopback up. */
export async function addNamespace(name: string): Promise<string> {
  hookExit();
  await ip(['netns', 'add', name]);
  made.add(name);
  await ip(['-n', name, 'link', 'set', 'lo', 'up']);
  return name;
}

export async function delNamespace(name: string): Promise<void> {
  if (!made.has(name)) return;
  await runCommand('ip', ['netns', 'del', name]);
  made.delete(name);
}
