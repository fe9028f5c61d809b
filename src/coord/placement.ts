// Where each VM's primary and standby go: a pure function of the cluster's state, run by the
// leader agent. The witness is the truth about where a VM runs live: a VM's primary is its owner
// when it has one (after a failover the owner moved, and the placement follows it). A VM that
// ran before and has no owner right now keeps its placement (its standby is claiming it, or both
// copies are gone and that is the operator's call): only a VM that never ran is placed afresh.
// Standbys go to the least-loaded other host (roles counted over all VMs, ties by name), never on
// a draining host, and stay where they are while that host is up and eligible.

export interface PlacementInput {
  /** Hosts whose agents are up. */
  live: readonly string[];
  draining: ReadonlySet<string>;
  /** VM → the host holding its image (its first primary), if any. */
  vms: ReadonlyMap<string, { home: string | null }>;
  placements: ReadonlyMap<string, { primary: string; standby: string | null }>;
  owners: ReadonlyMap<string, { host: string }>;
  /** VM → highest generation ever claimed (0 or absent: never ran). */
  generations: ReadonlyMap<string, number>;
}

export interface PlacementPlan {
  /** The placement of every VM that has one (changed or not). */
  placements: Map<string, { primary: string; standby: string | null }>;
  /** VMs whose placement changed (to be written). */
  changed: string[];
  /** Placements of VMs that no longer exist (to be deleted). */
  removed: string[];
}

export function place(input: PlacementInput): PlacementPlan {
  const live = [...input.live].sort();
  const isLive = new Set(live);
  const eligible = live.filter((h) => !input.draining.has(h));
  const load = new Map<string, number>(live.map((h) => [h, 0]));
  const standbys = new Map<string, number>(live.map((h) => [h, 0]));
  const bump = (h: string | null, isStandby = false) => {
    if (h === null || !load.has(h)) return;
    load.set(h, load.get(h)! + 1);
    if (isStandby) standbys.set(h, standbys.get(h)! + 1);
  };
  /** Fewest standbys (for a standby), then fewest roles, then the next host after `from` in name order (a ring). */
  const leastLoaded = (from: string | null, forStandby = false): string | null => {
    const ring = (h: string) =>
      from === null ? 0 : (live.indexOf(h) - live.indexOf(from) + live.length) % live.length;
    const key = (h: string) => [forStandby ? standbys.get(h)! : 0, load.get(h)!, ring(h)];
    let best: string | null = null;
    for (const h of eligible) {
      if (h === from) continue;
      const [a, b] = [key(h), best === null ? null : key(best)];
      if (b === null || a[0]! < b[0]! || (a[0] === b[0] && (a[1]! < b[1]! || (a[1] === b[1] && a[2]! < b[2]!))))
        best = h;
    }
    return best;
  };
  const names = [...input.vms.keys()].sort();
  const primary = new Map<string, string>();
  const standby = new Map<string, string | null>();
  // What stays where it is counts first (primaries are where the guests run; standbys keep their
  // replicas), then new primaries, then new standbys, each on the least-loaded eligible host.
  const fresh: string[] = [];
  for (const vm of names) {
    const owner = input.owners.get(vm);
    const prev = input.placements.get(vm);
    const ran = (input.generations.get(vm) ?? 0) > 0;
    if (owner) primary.set(vm, owner.host);
    else if (prev && (ran || isLive.has(prev.primary))) primary.set(vm, prev.primary);
    else {
      fresh.push(vm);
      continue;
    }
    bump(primary.get(vm)!);
  }
  for (const vm of names) {
    const p = primary.get(vm);
    const prev = input.placements.get(vm)?.standby ?? null;
    if (p === undefined || prev === null || prev === p || !isLive.has(prev) || input.draining.has(prev)) continue;
    standby.set(vm, prev);
    bump(prev, true);
  }
  for (const vm of fresh) {
    const home = input.vms.get(vm)!.home;
    const p = home !== null && eligible.includes(home) ? home : leastLoaded(null);
    if (p === null) continue;
    primary.set(vm, p);
    bump(p);
  }
  for (const vm of names) {
    const p = primary.get(vm);
    if (p === undefined || standby.has(vm)) continue;
    const s = leastLoaded(p, true);
    standby.set(vm, s);
    bump(s, true);
  }
  const placements = new Map<string, { primary: string; standby: string | null }>();
  const changed: string[] = [];
  for (const vm of names) {
    const p = primary.get(vm);
    if (p === undefined) continue;
    const next = { primary: p, standby: standby.get(vm) ?? null };
    placements.set(vm, next);
    const prev = input.placements.get(vm);
    if (!prev || prev.primary !== next.primary || prev.standby !== next.standby) changed.push(vm);
  }
  const removed = [...input.placements.keys()].filter((vm) => !input.vms.has(vm));
  return { placements, changed, removed };
}
