// A TAP device on a host's Linux bridge: where a protected guest's frames meet the LAN. `ns` names
// a network namespace (the test topologies' hosts); without it the TAP lives where Rubato runs.

import { readFileSync } from 'node:fs';
import { logger, processWithFd, runCommand, RubatoError } from '../../util/index.ts';
import { ip } from './netns.ts';

export interface TapSite {
  bridge: string;
  ns?: string;
  /** The VLAN the TAP's bridge port carries untagged (the bridge filters VLANs); absent: the bridge's default. */
  vlan?: number;
}

const log = logger('tap');
const inNs = (site: TapSite, args: string[]) => (site.ns ? ['-n', site.ns, ...args] : args);

/** Checks that the bridge exists (one clear line naming it otherwise). */
export async function checkBridge(site: TapSite): Promise<void> {
  const r = await runCommand('ip', inNs(site, ['-d', 'link', 'show', 'dev', site.bridge]));
  if (r.code !== 0 || !/\bbridge\b/.test(r.stdout)) {
    throw new RubatoError(
      'RUBATO_BRIDGE_MISSING',
      `bridge ${site.bridge} does not exist on this host${site.ns ? ` (namespace ${site.ns})` : ''}: create it (ip link add ${site.bridge} type bridge; ip link set ${site.bridge} up) and attach the LAN to it`,
      { bridge: site.bridge },
    );
  }
  // A NIC on a VLAN needs a bridge that filters VLANs (a kernel without it cannot tag the port at all).
  if (site.vlan && !/\bvlan_filtering 1\b/.test(r.stdout))
    throw new RubatoError(
      'RUBATO_BRIDGE_MISSING',
      `bridge ${site.bridge} does not filter VLANs, and a NIC is on VLAN ${site.vlan}: ip link set ${site.bridge} type bridge vlan_filtering 1 (the kernel needs CONFIG_BRIDGE_VLAN_FILTERING)`,
      { bridge: site.bridge, vlan: site.vlan },
    );
}

/** The PID of a process that has TAP `tap` open (from /proc/PID/fdinfo's `iff:` line), or null. */
export function tapHolder(tap: string): number | null {
  const want = new RegExp(`^iff:\\s+${tap.replace(/[.]/g, '\\.')}$`, 'm');
  return processWithFd((pid, fd) => want.test(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8')));
}

/**
 * A TAP of this name left behind by a controller that was killed is removed (said once); one that a
 * live process holds is another guest's: refused, naming the process.
 */
async function clearStaleTap(site: TapSite, tap: string): Promise<void> {
  const exists = await runCommand('ip', inNs(site, ['link', 'show', 'dev', tap]));
  if (exists.code !== 0) return;
  const holder = tapHolder(tap);
  if (holder !== null)
    throw new RubatoError(
      'RUBATO_TAP_BUSY',
      `TAP ${tap} is in use by process ${holder}: a guest of this name already runs on this host`,
      { tap, pid: holder },
    );
  log.warn(`removing TAP ${tap}, left behind by a controller that did not end in order`);
  await delTap(site, tap);
}

export async function addTap(site: TapSite, tap: string): Promise<void> {
  await checkBridge(site);
  await clearStaleTap(site, tap);
  await ip(inNs(site, ['tuntap', 'add', 'dev', tap, 'mode', 'tap']));
  try {
    await ip(inNs(site, ['link', 'set', tap, 'master', site.bridge]));
    if (site.vlan) {
      const bridge = (args: string[]) =>
        runCommand(site.ns ? 'ip' : 'bridge', site.ns ? ['netns', 'exec', site.ns, 'bridge', ...args] : args);
      const add = await bridge(['vlan', 'add', 'dev', tap, 'vid', String(site.vlan), 'pvid', 'untagged']);
      if (add.code !== 0)
        throw new RubatoError('RUBATO_NETNS', `VLAN ${site.vlan} on ${tap}: ${add.stderr.trim()}`, {
          tap,
          vlan: site.vlan,
        });
      await bridge(['vlan', 'del', 'dev', tap, 'vid', '1']);
    }
    await ip(inNs(site, ['link', 'set', tap, 'up']));
  } catch (e) {
    await delTap(site, tap);
    throw e;
  }
}

export async function delTap(site: TapSite, tap: string): Promise<void> {
  await ip(inNs(site, ['link', 'del', tap])).catch(() => {
    /* already gone with its namespace or its helper */
  });
}
