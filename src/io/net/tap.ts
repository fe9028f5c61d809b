// A TAP device on a host's Linux bridge: where a protected guest's frames meet the LAN. `ns` names
// a network namespace (the test topologies' hosts); without it the TAP lives where Rubato runs.

import { runCommand, RubatoError } from '../../util/index.ts';
import { ip } from './netns.ts';

export interface TapSite {
  bridge: string;
  ns?: string;
}

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
}

export async function addTap(site: TapSite, tap: string): Promise<void> {
  await checkBridge(site);
  await ip(inNs(site, ['tuntap', 'add', 'dev', tap, 'mode', 'tap']));
  try {
    await ip(inNs(site, ['link', 'set', tap, 'master', site.bridge]));
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
